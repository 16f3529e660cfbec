"""Checks made before an event is sent, for what Stripe only reports asynchronously.

Stripe accepts a meter event for a customer that does not exist (v1 and the v2 stream) and, on the v2 stream, for an
event name without a meter, and reports the error later (v1.billing.meter.error_report_triggered). The outbox entry
would already be acknowledged and the usage silently missing from the invoice. So the settler asks first, once per
customer (cached for `CUSTOMER_TTL_S`) and, for v2, once per `METER_TTL_S` for the meter; a customer or meter that does
not exist sends the event to the dead letters with the reason. Each meter an event goes to is checked: the units meter
(settle_event_name) and the token meter (settle_token_event_name).

A restricted key (rk_...) may lack the permission to read customers or meters (HTTP 403): then the check is skipped
with one warning, and Stripe's asynchronous error report is the only signal left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from spendgate.settle.errors import is_not_found, is_permission_denied

if TYPE_CHECKING:
    import stripe

log = logging.getLogger(__name__)

CUSTOMER_TTL_S: Final[float] = 3600.0
METER_TTL_S: Final[float] = 300.0
MAX_CACHED_CUSTOMERS: Final[int] = 100_000
METER_PAGE_LIMIT: Final[int] = 100


class Preflight:
    """Blocking checks (run them in the settler's thread pool). Each returns a dead-letter reason, or None when the
    event may go; a Stripe error it cannot interpret (429, 500, connection) propagates, for the settler to retry."""

    def __init__(
        self,
        client: stripe.StripeClient,
        event_name: str,
        *,
        check_meter: bool,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.event_name = event_name
        self.check_meter = check_meter
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._customers_ok: dict[str, float] = {}  # customer -> until (monotonic)
        self._meters_ok: dict[str, float] = {}  # event name -> until (monotonic): the units and the token meter
        self._customers_unreadable = False
        self._meters_unreadable = False
        self.api_calls = 0

    def customer_known(self, stripe_customer_id: str) -> bool:
        """True when a recent check found the customer (no API call needed)."""
        with self._lock:
            if self._customers_unreadable:
                return True
            until = self._customers_ok.get(stripe_customer_id)
            return until is not None and self._monotonic() < until

    def meter_known(self, event_name: str | None = None) -> bool:
        """True when no check is needed for this event name's meter (default: the units meter's)."""
        name = self.event_name if event_name is None else event_name
        with self._lock:
            if not self.check_meter or self._meters_unreadable:
                return True
            return self._monotonic() < self._meters_ok.get(name, 0.0)

    def customer_problem(self, stripe_customer_id: str) -> str | None:
        if self.customer_known(stripe_customer_id):
            return None
        self.api_calls += 1
        try:
            customer = self._client.v1.customers.retrieve(stripe_customer_id)
        except Exception as error:
            if is_not_found(error):
                return (
                    f"Stripe has no customer {stripe_customer_id!r} (it answered: "
                    f"{getattr(error, 'user_message', error)})"
                    ": fix the budget's stripe_customer_id or create the customer in this Stripe account, then requeue"
                )
            if is_permission_denied(error):
                self._unreadable("customers", error)
                return None
            raise
        if getattr(customer, "deleted", False):
            return f"Stripe customer {stripe_customer_id!r} is deleted: bill this usage to another customer"
        with self._lock:
            if len(self._customers_ok) >= MAX_CACHED_CUSTOMERS:
                self._customers_ok.clear()
            self._customers_ok[stripe_customer_id] = self._monotonic() + CUSTOMER_TTL_S
        return None

    def meter_problem(self, event_name: str | None = None) -> str | None:
        name = self.event_name if event_name is None else event_name
        if self.meter_known(name):
            return None
        try:
            found = self._active_meter_exists(name)
        except Exception as error:
            if is_permission_denied(error):
                self._unreadable("meters", error)
                return None
            raise
        if not found:
            setting = "settle_event_name" if name == self.event_name else "settle_token_event_name"
            return (
                f"Stripe has no active meter for event_name {name!r}: create one (Billing > Meters) or fix "
                f"the {setting} setting, then requeue"
            )
        with self._lock:
            self._meters_ok[name] = self._monotonic() + METER_TTL_S
        return None

    def _active_meter_exists(self, event_name: str) -> bool:
        params: dict[str, object] = {"status": "active", "limit": METER_PAGE_LIMIT}
        while True:
            self.api_calls += 1
            page = self._client.v1.billing.meters.list(params)  # type: ignore[arg-type]
            if any(meter.event_name == event_name for meter in page.data):
                return True
            if not page.has_more or not page.data:
                return False
            params["starting_after"] = page.data[-1].id

    def _unreadable(self, what: str, error: BaseException) -> None:
        with self._lock:
            if what == "customers":
                first, self._customers_unreadable = not self._customers_unreadable, True
            else:
                first, self._meters_unreadable = not self._meters_unreadable, True
        if first:
            log.warning(
                "the Stripe key may not read %s (%s): events are sent without checking that their %s exists; Stripe "
                "reports a missing one only asynchronously (meter error report webhooks)",
                what,
                getattr(error, "user_message", error),
                "customer" if what == "customers" else "meter",
            )

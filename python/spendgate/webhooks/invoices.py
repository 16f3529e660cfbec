"""The invoice-spike guard: on Stripe's `invoice.created`, compare the draft with the customer's previous invoice, raise
an `invoice_spike` alert when it is more than `invoice_spike_percent` larger, and with `invoice_spike_action = "hold"`
keep Stripe from finalizing it (auto_advance false) until an operator releases it (Admin.ReleaseInvoice, CLI
`spendgate invoices release INVOICE`, which sets auto_advance back to true).

What is compared. The draft's `total` ("Total after discounts and taxes", stripe/_invoice.py) against the `total` of the
customer's previous invoice: the newest of the customer's invoices (GET /v1/invoices?customer=..., which Stripe sorts
newest first) that is not this draft, not another draft, not void, and not created after the draft. `total` and not
`amount_due`: amount_due is reduced by the customer's credit balance, so a month paid from credits would make the next
one look like a spike, and a draft's amount_due does not show the balance applied at finalization yet.
- No previous invoice (a first invoice, or none within MAX_INVOICES_SCANNED): no alert.
- Another currency than the draft's: not comparable, no alert (logged).
- A previous total of 0 (a free month, a trial): any draft above 0 is a spike (it is infinitely larger: the customer
  paid nothing and now gets a bill, which is the surprise the guard is for); a draft of 0 is not. The alert then has no
  `increase_percent` value. No division happens anywhere: the test is draft * 100 > previous * (100 + percent).

Once per invoice. The guard keeps, per draft, what it decided and did (a document in the engine's LMDB, the newest
MAX_GUARDED_INVOICES): a replayed or repeated `invoice.created` (the webhook handlers already drop a replayed event id)
never raises a second alert nor holds again, and never holds a draft an operator released. The alert is queued before
the record that says it was raised (ticket order), so a durable record implies a durable alert; a crash between the two
can repeat the alert on Stripe's resend (at least once), never lose it. A failed hold (Stripe unreachable) answers 503
so that Stripe resends; the resend holds without alerting again.

Stripe is called through the real SDK (spendgate.settle.stripe_client conventions: no SDK retries, a timeout), in a
thread: the calls block.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from spendgate import _core
from spendgate.webhooks.handlers import TRANSIENT_KINDS

if TYPE_CHECKING:
    import stripe

    from spendgate.config import Settings

log = logging.getLogger("spendgate.webhooks.invoices")

INVOICE_CREATED: Final[str] = "invoice.created"
ALERT_KIND: Final[str] = "invoice_spike"
ACTIONS: Final[tuple[str, ...]] = ("alert", "hold")
# The engine document the guard's records live in (Engine.put_document).
STATE_DOCUMENT: Final[str] = "invoice_guard"
STATE_VERSION: Final[int] = 1
# Drafts remembered (oldest forgotten first): far more than the drafts of one billing cycle's replay window.
MAX_GUARDED_INVOICES: Final[int] = 10_000
# Invoices of a customer looked through for the previous one (void ones and other drafts are skipped), and per page.
MAX_INVOICES_SCANNED: Final[int] = 100
INVOICE_PAGE_LIMIT: Final[int] = 20
# Timeout of one Stripe call made by the guard.
REQUEST_TIMEOUT_S: Final[float] = 10.0
# Statuses of an invoice that counts as a previous one: finalized, not voided.
FINALIZED_STATUSES: Final[frozenset[str]] = frozenset({"open", "paid", "uncollectible"})


class RetryLater(Exception):
    """Not now: the caller retries later (a webhook answers 503, so that Stripe resends)."""


class StripeUnavailable(RetryLater):
    """Stripe could not be asked now (connection, 429, 5xx)."""


class InvoiceNotFound(Exception):
    """Stripe has no such invoice."""


class StripeInvoices:
    """The three invoice calls the guard makes, over a stripe.StripeClient; blocking (run them in a thread)."""

    def __init__(self, client: stripe.StripeClient) -> None:
        self._client = client

    def page(self, customer: str, starting_after: str | None) -> tuple[list[dict[str, Any]], bool]:
        params: dict[str, Any] = {"customer": customer, "limit": INVOICE_PAGE_LIMIT}
        if starting_after:
            params["starting_after"] = starting_after
        listed = self._call(lambda: self._client.v1.invoices.list(params))  # type: ignore[arg-type]
        return [invoice.to_dict() for invoice in listed.data], bool(listed.has_more)

    def retrieve(self, invoice_id: str) -> dict[str, Any]:
        invoice = self._call(lambda: self._client.v1.invoices.retrieve(invoice_id))
        return invoice.to_dict()  # type: ignore[no-any-return]

    def set_auto_advance(self, invoice_id: str, value: bool) -> dict[str, Any]:
        updated = self._call(lambda: self._client.v1.invoices.update(invoice_id, {"auto_advance": value}))
        return updated.to_dict()  # type: ignore[no-any-return]

    @staticmethod
    def _call(call: Callable[[], Any]) -> Any:
        import stripe  # noqa: PLC0415

        try:
            return call()
        except (stripe.APIConnectionError, stripe.RateLimitError) as error:
            raise StripeUnavailable(str(error)) from None
        except stripe.StripeError as error:
            status = error.http_status or 0
            if status >= 500:
                raise StripeUnavailable(str(error)) from None
            if status == 404:
                raise InvoiceNotFound(getattr(error, "user_message", None) or str(error)) from None
            raise


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """The comparison of a draft with the previous invoice."""

    spike: bool
    reason: str  # for the log and the webhook's answer
    previous_id: str = ""
    previous_total: int | None = None
    increase_percent: int | None = None  # None: no previous, or a previous of 0


def compare(draft_total: int, draft_currency: str, previous: Mapping[str, Any] | None, spike_percent: int) -> Verdict:
    """Whether the draft is more than spike_percent larger than `previous` (see the module docstring)."""
    if previous is None:
        return Verdict(False, "no previous invoice (a first invoice): nothing to compare")
    previous_id = str(previous.get("id") or "")
    previous_total = _int(previous.get("total"))
    if str(previous.get("currency") or "") != draft_currency:
        return Verdict(
            False,
            f"the previous invoice {previous_id} is in {previous.get('currency')!r}, the draft in "
            f"{draft_currency!r}: not comparable",
            previous_id,
            previous_total,
        )
    if previous_total <= 0:
        spike = draft_total > 0
        return Verdict(
            spike,
            f"the previous invoice {previous_id} was 0 and the draft is {draft_total}",
            previous_id,
            previous_total,
        )
    increase = (draft_total - previous_total) * 100 // previous_total
    spike = draft_total * 100 > previous_total * (100 + spike_percent)
    return Verdict(
        spike,
        f"{draft_total} against {previous_total} of {previous_id}: {increase:+d}%",
        previous_id,
        previous_total,
        increase,
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclasses.dataclass(frozen=True, slots=True)
class Release:
    """What Admin.ReleaseInvoice did."""

    invoice_id: str
    stripe_customer_id: str
    status: str
    auto_advance: bool
    was_held: bool
    total: int
    currency: str


class GuardState:
    """The guard's records, by draft invoice id, oldest first (see the module docstring)."""

    def __init__(self) -> None:
        self.invoices: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def record(self, invoice_id: str) -> dict[str, Any] | None:
        return self.invoices.get(invoice_id)

    def put(self, invoice_id: str, record: dict[str, Any]) -> None:
        self.invoices[invoice_id] = record
        self.invoices.move_to_end(invoice_id)
        while len(self.invoices) > MAX_GUARDED_INVOICES:
            self.invoices.popitem(last=False)

    def to_json(self) -> str:
        return json.dumps({"version": STATE_VERSION, "invoices": list(self.invoices.items())}, separators=(",", ":"))

    @classmethod
    def load(cls, engine: _core.Engine) -> GuardState:
        state = cls()
        body = engine.document(STATE_DOCUMENT)
        if body is None:
            return state
        try:
            document = json.loads(body)
        except ValueError as error:
            raise ValueError(f"cannot read the invoice guard's document {STATE_DOCUMENT!r}: {error}") from None
        if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
            raise ValueError(
                f"the document {STATE_DOCUMENT!r} is not an invoice guard state of version {STATE_VERSION}"
            )
        for invoice_id, record in document.get("invoices", []):
            state.put(str(invoice_id), dict(record))
        return state


class InvoiceGuard:
    """One per sidecar: the webhook handlers call on_invoice_created, Admin.ReleaseInvoice calls release."""

    def __init__(
        self,
        engine: _core.Engine,
        wait_durable: Callable[[int], Awaitable[None]],
        *,
        spike_percent: int,
        action: str,
        invoices: StripeInvoices | None,
    ) -> None:
        """invoices: None without STRIPE_API_KEY (then drafts are not compared, and release refuses)."""
        assert action in ACTIONS, action
        assert spike_percent >= 0, spike_percent
        self._engine = engine
        self._wait_durable = wait_durable
        self.spike_percent = spike_percent
        self.action = action
        self._invoices = invoices
        self._state = GuardState.load(engine)
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self._invoices is not None

    def records(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """The newest `limit` records that were spikes, newest first (for the operator page)."""
        spikes = [(i, dict(r)) for i, r in reversed(self._state.invoices.items()) if r.get("spike")]
        return spikes[:limit]

    # -- invoice.created --------------------------------------------------------------------------------------------

    async def on_invoice_created(self, event_id: str, invoice: Mapping[str, Any], alert_customer_id: str) -> str:
        """Compare, alert, hold (each at most once per draft). Returns what was done. Raises StripeUnavailable when
        Stripe cannot be asked now (answer 503: Stripe resends)."""
        invoice_id = str(invoice.get("id") or "")
        customer = _id_of(invoice.get("customer"))
        if not invoice_id or not customer:
            return "invoice without an id or a customer: nothing to compare"
        if invoice.get("status") != "draft":
            return f"{invoice_id} is {invoice.get('status')!r}, not a draft: nothing to hold"
        if self._invoices is None:
            log.error(
                "webhook %s: draft invoice %s of %s not compared with the previous one: set STRIPE_API_KEY so "
                "that the invoice-spike guard can list the customer's invoices",
                event_id,
                invoice_id,
                customer,
            )
            return f"{invoice_id} not compared (no STRIPE_API_KEY)"
        async with self._lock:
            record = self._state.record(invoice_id)
            if record is None:
                record = await self._judge(event_id, invoice, invoice_id, customer, alert_customer_id)
            elif record.get("spike"):
                log.info(
                    "webhook %s: draft %s was compared already (a spike, alert raised): not alerting again",
                    event_id,
                    invoice_id,
                )
            if not record.get("spike"):
                return f"{invoice_id}: {record['reason']}: no alert"
            done = f"{invoice_id}: invoice_spike ({record['reason']})"
            if self.action != "hold":
                return done + "; alert only (invoice_spike_action = alert)"
            if record.get("released_ms"):
                return done + "; released by an operator: not held again"
            if record.get("held"):
                return done + "; already held"
            await self._hold(event_id, invoice_id, record)
            return done + "; held: auto_advance false until `spendgate invoices release " + invoice_id + "`"

    async def _judge(
        self, event_id: str, invoice: Mapping[str, Any], invoice_id: str, customer: str, alert_customer_id: str
    ) -> dict[str, Any]:
        """The first comparison of this draft: remember it, and raise the alert for a spike (before the record)."""
        draft_total = _int(invoice.get("total"))
        currency = str(invoice.get("currency") or "")
        previous = await asyncio.to_thread(self._previous, customer, invoice_id, _int(invoice.get("created")))
        verdict = compare(draft_total, currency, previous, self.spike_percent)
        record: dict[str, Any] = {
            "customer": customer,
            "alert_customer_id": alert_customer_id,
            "draft_total": draft_total,
            "currency": currency,
            "previous_id": verdict.previous_id,
            "previous_total": verdict.previous_total,
            "spike": verdict.spike,
            "reason": verdict.reason,
            "ts_ms": time.time_ns() // 1_000_000,
            "held": False,
            "released_ms": 0,
        }
        log.info(
            "webhook %s: draft invoice %s of %s: %s%s",
            event_id,
            invoice_id,
            customer,
            verdict.reason,
            ": INVOICE SPIKE" if verdict.spike else "",
        )
        try:
            if verdict.spike:
                self._engine.raise_alert(
                    ALERT_KIND,
                    alert_customer_id,
                    self._message(invoice_id, record, verdict),
                    self._values(record, verdict),
                )
            self._state.put(invoice_id, record)
            await self._save()
        except _core.EngineError as error:
            self._state.invoices.pop(invoice_id, None)  # not durable: Stripe's resend judges it again
            if error.kind in TRANSIENT_KINDS:
                raise RetryLater(f"cannot store the alert now: {error.kind}: {error.message}") from None
            raise
        return record

    def _message(self, invoice_id: str, record: Mapping[str, Any], verdict: Verdict) -> str:
        increase = (
            f"{verdict.increase_percent}% more than" if verdict.increase_percent is not None else "above the 0 of"
        )
        then = (
            f"it is held (auto_advance false) until `spendgate invoices release {invoice_id}`"
            if self.action == "hold"
            else "Stripe finalizes it as usual (invoice_spike_action = alert)"
        )
        return (
            f"draft invoice {invoice_id} of Stripe customer {record['customer']}: {record['draft_total']} "
            f"{record['currency']} is {increase} the previous invoice {verdict.previous_id} "
            f"({verdict.previous_total}); invoice_spike_percent {self.spike_percent}; {then}"
        )

    def _values(self, record: Mapping[str, Any], verdict: Verdict) -> dict[str, int]:
        values = {
            "draft_total": int(record["draft_total"]),
            "previous_total": int(verdict.previous_total or 0),
            "spike_percent": self.spike_percent,
            "held": int(self.action == "hold"),
        }
        if verdict.increase_percent is not None:
            values["increase_percent"] = verdict.increase_percent
        return values

    def _previous(self, customer: str, invoice_id: str, created: int) -> dict[str, Any] | None:
        """The customer's previous invoice (see the module docstring), or None. Blocking."""
        assert self._invoices is not None
        after: str | None = None
        scanned = 0
        while scanned < MAX_INVOICES_SCANNED:
            page, more = self._invoices.page(customer, after)
            for invoice in page:
                scanned += 1
                if invoice.get("id") == invoice_id or invoice.get("status") not in FINALIZED_STATUSES:
                    continue
                if created and _int(invoice.get("created")) > created:
                    continue  # created after the draft: not a previous invoice
                return invoice
            if not more or not page:
                return None
            after = str(page[-1]["id"])
        log.warning(
            "invoice-spike guard: none of the newest %d invoices of %s is a finalized one before draft %s; "
            "treating it as a first invoice",
            MAX_INVOICES_SCANNED,
            customer,
            invoice_id,
        )
        return None

    async def _hold(self, event_id: str, invoice_id: str, record: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self._stripe().set_auto_advance, invoice_id, False)
        except InvoiceNotFound:
            log.error(
                "webhook %s: cannot hold draft %s: Stripe has no such invoice (deleted meanwhile?)",
                event_id,
                invoice_id,
            )
            return
        record["held"] = True
        record["held_ms"] = time.time_ns() // 1_000_000
        self._state.put(invoice_id, record)
        await self._save()
        log.warning(
            "invoice-spike guard: held draft invoice %s of %s (auto_advance false): Stripe will not finalize "
            "it until `spendgate invoices release %s`",
            invoice_id,
            record["customer"],
            invoice_id,
        )

    # -- release ----------------------------------------------------------------------------------------------------

    async def release(self, invoice_id: str) -> Release:
        """Set the draft's auto_advance back to true. EngineError: failed_precondition (no key, not a draft),
        not_found (no such invoice), invalid_argument, unavailable (Stripe, now)."""
        if not invoice_id.startswith("in_"):
            raise _core.EngineError("invalid_argument", f"{invoice_id!r} is not a Stripe invoice id (in_...)")
        stripe_invoices = self._stripe()
        async with self._lock:
            try:
                invoice = await asyncio.to_thread(stripe_invoices.retrieve, invoice_id)
                if invoice.get("status") != "draft":
                    raise _core.EngineError(
                        "failed_precondition",
                        f"invoice {invoice_id} is {invoice.get('status')!r}, not a draft: it is "
                        "finalized already, so there is nothing to release",
                    )
                updated = await asyncio.to_thread(stripe_invoices.set_auto_advance, invoice_id, True)
            except InvoiceNotFound:
                raise _core.EngineError("not_found", f"Stripe has no invoice {invoice_id}") from None
            except StripeUnavailable as error:
                raise _core.EngineError("unavailable", f"Stripe cannot be asked now, try again: {error}") from None
            record = self._state.record(invoice_id)
            was_held = bool(record and record.get("held") and not record.get("released_ms"))
            if record is not None:
                record["released_ms"] = time.time_ns() // 1_000_000
                self._state.put(invoice_id, record)
                try:
                    await self._save()
                except RetryLater as error:  # Stripe has it released; a retry records it (and sets it again)
                    record["released_ms"] = 0
                    raise _core.EngineError("unavailable", f"{error}; try again") from None
        log.warning(
            "invoice-spike guard: draft invoice %s released (auto_advance true)%s",
            invoice_id,
            "" if was_held else "; the guard had not held it",
        )
        return Release(
            invoice_id,
            _id_of(updated.get("customer")),
            str(updated.get("status") or ""),
            bool(updated.get("auto_advance")),
            was_held,
            _int(updated.get("total")),
            str(updated.get("currency") or ""),
        )

    # -- internals --------------------------------------------------------------------------------------------------

    def _stripe(self) -> StripeInvoices:
        if self._invoices is None:
            raise _core.EngineError(
                "failed_precondition",
                "the sidecar has no STRIPE_API_KEY, so it cannot change "
                "invoices: set it (a restricted key needs Invoices write access)",
            )
        return self._invoices

    async def _save(self) -> None:
        """The records, durably. RetryLater when the engine cannot now."""
        try:
            await self._wait_durable(self._engine.put_document(STATE_DOCUMENT, self._state.to_json()))
        except _core.EngineError as error:
            if error.kind in TRANSIENT_KINDS:
                raise RetryLater(
                    f"cannot store the invoice guard's records now: {error.kind}: {error.message}"
                ) from None
            raise


def _id_of(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) else ""


def build_guard(
    settings: Settings, engine: _core.Engine, wait_durable: Callable[[int], Awaitable[None]]
) -> InvoiceGuard:
    """The guard for these settings (without STRIPE_API_KEY it compares nothing and cannot release)."""
    invoices = None
    if settings.stripe_api_key:
        from spendgate.settle.stripe_client import make_client  # noqa: PLC0415 - the SDK only when needed

        invoices = StripeInvoices(
            make_client(settings.stripe_api_key, settings.stripe_api_base, timeout_s=REQUEST_TIMEOUT_S)
        )
    return InvoiceGuard(
        engine,
        wait_durable,
        spike_percent=settings.invoice_spike_percent,
        action=settings.invoice_spike_action,
        invoices=invoices,
    )

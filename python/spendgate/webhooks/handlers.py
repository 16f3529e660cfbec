"""What each Stripe event does to the budgets. The HTTP side (spendgate.webhooks.server) verifies the signature first;
everything here runs only for an authentic event.

Each event, and what it does:

- `customer.subscription.created` / `.updated`: limit = `webhook_plan_limits[price id or lookup_key of the first
  item]`, on the customer's budget (created, with customer_id = the Stripe customer id, if there is none); every budget
  billed to the customer gets the subscription's current period as its period (see Periods). An active or trialing
  subscription also unfreezes a budget that `.deleted` froze.
- `customer.subscription.deleted`: freeze the customer's budgets ("Stripe: subscription sub_... deleted").
- `invoice.payment_failed`: `webhook_payment_failed_action`: `flag` (log and count) or `freeze` (remembering the
  invoice).
- `invoice.created`: the invoice-spike guard (spendgate.webhooks.invoices): compare the draft with the customer's
  previous invoice; past `invoice_spike_percent`, an `invoice_spike` alert, and with `invoice_spike_action = hold` the
  draft's auto_advance set to false (released by `spendgate invoices release`).
- `invoice.paid`: a subscription invoice whose subscription line starts a period later than a budget's current one
  rolls the budget over to it (see Periods); and unfreeze a budget that `invoice.payment_failed` froze, once every
  invoice that froze it is paid.
- `v1.billing.meter.error_report_triggered`, `v1.billing.meter.no_meter_found` (thin events): log, count per error
  code, link the sample identifiers to dead letters and ledger reservations.

Webhooks never unfreeze a budget they did not freeze: one already frozen (an operator's Admin.FreezeBudget) is left
frozen, and a limit is never set on a budget named like the Stripe customer that bills another one.

Periods. A subscription's current period is `items.data[].current_period_start/end` since API version 2025-03-31.basil
("current_period_start and current_period_end fields are no longer available on the subscription resource",
docs.stripe.com/changelog/basil/2025-03-31/deprecate-subscription-current-period-start-and-end); older versions put
them on the subscription: both shapes are read (the first item's, as for the plan). It becomes the budget's period as a
fixed period {anchor_ms: start, length_ms: end - start} (Engine.update_budget: a period that starts later than the
budget's current one starts now, the old one closed with its spend kept; one that started no later only moves the
current period's end). On `invoice.paid` the subscription line's `period` (lines.data[] with parent.type
subscription_item_details, or type subscription before basil) is the new period: licensed prices bill in advance, so a
renewal invoice's subscription line covers the period starting now, while the invoice's own period_start/period_end are
"the earliest/latest timestamp at which invoice items can be associated with this invoice" (the SDK's Invoice docs): the
previous period, the wrong one. A metered price's line, billed in arrears, covers the previous period too: of an
invoice's subscription lines the latest-starting one counts. invoice.paid only rolls over (a period that starts later
than the budget's current one); subscription events also align.

Stripe does not deliver events in order, so a period is applied only when it can be current: it has not ended yet, and,
on a budget already on a fixed period, it does not start before that period. An older event therefore never rolls a
budget back, and a replayed or repeated one changes nothing (the same period again only sets the same end).

Idempotency. Every action is idempotent given the state below, and the ids of processed events are kept (the newest
MAX_PROCESSED_EVENTS), so a replayed event (same id) changes nothing. That state (processed ids, the invoices that
froze a budget, the subscriptions whose deletion froze one) is a document in the engine's LMDB, queued after the engine
changes it records and durable before Stripe gets its 200: it survives a restart, it is in every backup, and a durable
state that holds it holds those changes. A crash before it is durable makes Stripe resend the event, and the resend
finds the change already made.

Budgets are found by their stripe_customer_id through Engine.list_budgets, which returns at most LIST_LIMIT budgets:
past that, only a budget whose customer_id is the Stripe customer id is found, and no budget is created for a customer
that might exist beyond the limit.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from spendgate import _core

if TYPE_CHECKING:
    from spendgate.webhooks.invoices import InvoiceGuard

log = logging.getLogger("spendgate.webhooks")

# Ids of processed events kept for replay detection; also the bound on remembered paid invoices.
MAX_PROCESSED_EVENTS: Final[int] = 10_000
# Meter error reports kept in memory for operators (the metrics and operator page of the next issue).
MAX_RECENT_ERROR_REPORTS: Final[int] = 100
# The most budgets Engine.list_budgets returns in one call.
LIST_LIMIT: Final[int] = 10_000
# Older releases kept the state in this file in the data dir (outside LMDB, so outside backups); it is imported once.
STATE_FILE_NAME: Final[str] = "webhook-state.json"
# The engine document (Engine.put_document) the state lives in.
STATE_DOCUMENT: Final[str] = "webhook_state"
STATE_VERSION: Final[int] = 1

SUBSCRIPTION_CHANGED: Final[frozenset[str]] = frozenset(
    {"customer.subscription.created", "customer.subscription.updated"}
)
SUBSCRIPTION_DELETED: Final[str] = "customer.subscription.deleted"
INVOICE_PAID: Final[str] = "invoice.paid"
INVOICE_PAYMENT_FAILED: Final[str] = "invoice.payment_failed"
INVOICE_CREATED: Final[str] = "invoice.created"
# Thin (v2) events about meter events Stripe refused after accepting them (stripe/events/_v1_billing_meter_*).
METER_ERROR_EVENTS: Final[frozenset[str]] = frozenset(
    {"v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"}
)
# Subscription statuses in which the customer is paying (https://docs.stripe.com/api/subscriptions/object#subscription_object-status).
PAYING_STATUSES: Final[frozenset[str]] = frozenset({"active", "trialing"})
# The engine's bounds on a fixed period's length (rust/src/period.rs MIN_PERIOD_MS, MAX_PERIOD_MS): 1 s to 5 years.
MIN_PERIOD_MS: Final[int] = 1_000
MAX_PERIOD_MS: Final[int] = 5 * 366 * 86_400_000
# Engine errors worth a retry by Stripe (answered 503); any other is logged, counted and answered 200.
TRANSIENT_KINDS: Final[frozenset[str]] = frozenset({"unavailable", "resource_exhausted", "internal"})
# A spendgate meter event identifier: `sg-<reservation id>`, maybe `-requeue<n>` or the settler's `-agg...` suffix.
_IDENTIFIER_RE: Final = re.compile(r"^sg-(?P<reservation_id>rsv_[0-9A-Za-z]+)")


class TransientError(Exception):
    """The event could not be handled now; Stripe should resend it (HTTP 503)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    action: str


@dataclass
class WebhookStats:
    """Counters for the metrics (events by type and outcome, meter errors by code), and the latest error reports."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    recent_error_reports: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_RECENT_ERROR_REPORTS)
    )

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n


class WebhookState:
    """What the handlers remember across events and restarts (see the module docstring)."""

    def __init__(self) -> None:
        self.processed: collections.OrderedDict[str, None] = collections.OrderedDict()
        # budget customer_id -> ids of the unpaid invoices whose payment failure froze it
        self.payment_failed: dict[str, list[str]] = {}
        # invoices known paid (so that a late payment_failed for a paid invoice does not freeze)
        self.paid_invoices: collections.OrderedDict[str, None] = collections.OrderedDict()
        # budget customer_id -> the subscription whose deletion froze it
        self.frozen_by_deletion: dict[str, str] = {}

    @staticmethod
    def _remember(ids: collections.OrderedDict[str, None], item: str) -> None:
        ids[item] = None
        ids.move_to_end(item)
        while len(ids) > MAX_PROCESSED_EVENTS:
            ids.popitem(last=False)

    def mark_processed(self, event_id: str) -> None:
        self._remember(self.processed, event_id)

    def mark_paid(self, invoice_id: str) -> None:
        self._remember(self.paid_invoices, invoice_id)

    def to_json(self) -> str:
        return json.dumps({
            "version": STATE_VERSION, "processed": list(self.processed), "payment_failed": self.payment_failed,
            "paid_invoices": list(self.paid_invoices), "frozen_by_deletion": self.frozen_by_deletion,
        }, separators=(",", ":"))  # fmt: skip

    @classmethod
    def from_json(cls, text: str, where: str) -> WebhookState:
        state = cls()
        try:
            document = json.loads(text)
        except ValueError as error:
            raise ValueError(f"cannot read the webhook state {where}: {error}; move it away to start afresh") from None
        if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
            raise ValueError(f"{where} is not a webhook state of version {STATE_VERSION}; move it away to start afresh")
        for event_id in document.get("processed", []):
            state.mark_processed(str(event_id))
        for invoice_id in document.get("paid_invoices", []):
            state.mark_paid(str(invoice_id))
        state.payment_failed = {str(k): [str(i) for i in v] for k, v in document.get("payment_failed", {}).items()}
        state.frozen_by_deletion = {str(k): str(v) for k, v in document.get("frozen_by_deletion", {}).items()}
        return state

    @classmethod
    def load(cls, engine: _core.Engine, legacy_path: Path | None = None) -> WebhookState:
        """The state from the engine's LMDB; on a data dir that still has the file of older releases, from that file
        (the first save then moves it into LMDB, and the file is renamed `.imported`)."""
        body = engine.document(STATE_DOCUMENT)
        if body is not None:
            return cls.from_json(body, f"document {STATE_DOCUMENT!r} in LMDB")
        if legacy_path is not None and legacy_path.exists():
            try:
                text = legacy_path.read_text(encoding="utf-8")
            except OSError as error:
                raise ValueError(
                    f"cannot read the webhook state {legacy_path}: {error}; move it away to start afresh"
                ) from None
            return cls.from_json(text, str(legacy_path))
        return cls()

    def save(self, engine: _core.Engine) -> int:
        """Queue the state for LMDB, after the engine changes it records (ticket order): a durable state (after a
        crash, in a backup) that holds it holds those changes too. Returns the ticket to wait for."""
        return engine.put_document(STATE_DOCUMENT, self.to_json())


class WebhookHandlers:
    """The actions, one event at a time (an asyncio lock serialises them: webhooks are few, and order matters)."""

    def __init__(
        self,
        engine: _core.Engine,
        wait_durable: Callable[[int], Awaitable[None]],
        *,
        plan_limits: Mapping[str, int],
        payment_failed_action: str,
        legacy_state_path: Path | None = None,
        fetch_event: Callable[[str], Mapping[str, Any]] | None = None,
        invoice_guard: InvoiceGuard | None = None,
    ) -> None:
        """fetch_event(id): the full v2 event behind a thin notification (a blocking Stripe call, run in a thread);
        None when no STRIPE_API_KEY is set (then meter error reports are logged without their details).
        invoice_guard: what invoice.created does (None: nothing, the event is ignored)."""
        assert payment_failed_action in ("flag", "freeze"), payment_failed_action
        self._engine = engine
        self._wait_durable = wait_durable
        self._plan_limits = dict(plan_limits)
        self._payment_failed_action = payment_failed_action
        self._legacy_path = legacy_state_path
        self._fetch_event = fetch_event
        self._invoice_guard = invoice_guard
        self._state = WebhookState.load(engine, legacy_state_path)
        self._lock = asyncio.Lock()
        self.stats = WebhookStats()

    def _retire_legacy_file(self) -> None:
        """The state now lives in LMDB: keep the old file, renamed, so that it is never read again."""
        if self._legacy_path is not None and self._legacy_path.exists():
            self._legacy_path.rename(self._legacy_path.with_name(self._legacy_path.name + ".imported"))
            self._legacy_path = None

    # -- entry points ------------------------------------------------------------------------------------------------

    async def handle_event(self, event: Mapping[str, Any]) -> Outcome:
        """A verified snapshot event (`object: "event"`)."""
        return await self._handle(event, self._dispatch_snapshot)

    async def handle_thin(self, notification: Mapping[str, Any]) -> Outcome:
        """A verified thin event notification (`object: "v2.core.event"`)."""
        return await self._handle(notification, self._dispatch_thin)

    async def _handle(
        self, event: Mapping[str, Any], dispatch: Callable[[str, str, Mapping[str, Any]], Awaitable[Outcome | None]]
    ) -> Outcome:
        event_id, event_type = str(event.get("id") or ""), str(event.get("type") or "")
        if not event_id or not event_type:
            return Outcome(400, "an event needs an id and a type")
        async with self._lock:
            if event_id in self._state.processed:
                self.stats.count("replayed")
                log.info("webhook %s (%s): already processed; nothing to do", event_id, event_type)
                return Outcome(200, "replay: already processed")
            try:
                outcome = await dispatch(event_id, event_type, event)
            except _core.EngineError as error:  # not worth a resend (TransientError is): say so, and answer 200
                self.stats.count("failed")
                log.error("webhook %s (%s) failed: %s: %s", event_id, event_type, error.kind, error.message)
                return Outcome(200, f"failed: {error.kind}: {error.message}")
            if outcome is None:  # a type we do not act on: acknowledged, not remembered
                self.stats.count(f"ignored.{event_type}")
                return Outcome(200, f"ignored: spendgate does not act on {event_type}")
            self._state.mark_processed(event_id)
            try:
                await self._wait_durable(self._state.save(self._engine))
            except _core.EngineError as error:
                del self._state.processed[event_id]  # so that Stripe's resend runs the (idempotent) actions again
                raise TransientError(f"cannot save the webhook state: {error.kind}: {error.message}") from None
            self._retire_legacy_file()
            self.stats.count(f"handled.{event_type}")
            return outcome

    async def _dispatch_snapshot(self, event_id: str, event_type: str, event: Mapping[str, Any]) -> Outcome | None:
        data = event.get("data")
        obj = data.get("object") if isinstance(data, Mapping) else None
        if not isinstance(obj, Mapping):
            return Outcome(400, f"{event_type} without data.object") if _acts_on(event_type) else None
        customer = _id_of(obj.get("customer"))
        if _acts_on(event_type) and not customer:
            self.stats.count("no_customer")
            log.warning(
                "webhook %s (%s): no customer on the %s; nothing to do", event_id, event_type, obj.get("object")
            )
            return Outcome(200, "no customer: nothing to do")
        if event_type in SUBSCRIPTION_CHANGED:
            return await self._subscription_changed(event_id, event_type, obj, customer)
        if event_type == SUBSCRIPTION_DELETED:
            return await self._subscription_deleted(event_id, obj, customer)
        if event_type == INVOICE_PAYMENT_FAILED:
            return await self._payment_failed(event_id, obj, customer)
        if event_type == INVOICE_PAID:
            return await self._invoice_paid(event_id, obj, customer)
        if event_type == INVOICE_CREATED and self._invoice_guard is not None:
            return await self._invoice_created(event_id, obj, customer)
        return None

    async def _dispatch_thin(self, event_id: str, event_type: str, note: Mapping[str, Any]) -> Outcome | None:
        if event_type in METER_ERROR_EVENTS:
            return await self._meter_error_report(event_id, event_type, note)
        return None

    # -- subscriptions -----------------------------------------------------------------------------------------------

    async def _subscription_changed(
        self, event_id: str, event_type: str, sub: Mapping[str, Any], customer: str
    ) -> Outcome:
        item = _first_item(sub)
        price = _mapping(item.get("price"))
        keys = [key for key in (price.get("id"), price.get("lookup_key")) if isinstance(key, str) and key]
        status = str(sub.get("status") or "")
        period = _subscription_period(sub, item)
        log.info(
            "webhook %s: subscription %s of %s is %s, plan %s, current period %s", event_id, sub.get("id"), customer,
            status or "?", " / ".join(keys) or "?", period.describe() if period else "unknown",
        )  # fmt: skip
        actions: list[str] = []
        aligned: set[str] = set()
        budgets, complete = self._budgets_of(customer)
        limit = next((self._plan_limits[key] for key in keys if key in self._plan_limits), None)
        if limit is None:
            self.stats.count("plan_unmapped")
            log.warning(
                "webhook %s: plan %s of %s is not in webhook_plan_limits; its budget limit is unchanged",
                event_id, " / ".join(keys) or "(none)", customer,
            )  # fmt: skip
            actions.append(f"plan {' / '.join(keys) or '(none)'} not in webhook_plan_limits: limit unchanged")
        else:
            target = _pick_budget(budgets, customer)
            if target is None and budgets:
                self.stats.count("customer_ambiguous")
                names = ", ".join(b.customer_id for b in budgets)
                log.error(
                    "webhook %s: Stripe customer %s is billed for several budgets (%s) and none has that id; set "
                    "their limits with `spendgate budget set`", event_id, customer, names,
                )  # fmt: skip
                actions.append(f"several budgets bill {customer} ({names}): limit unchanged")
            elif target is None and not complete:
                self.stats.count("customer_unresolved")
                log.error(
                    "webhook %s: no budget with stripe_customer_id %s among the first %d budgets, and more exist; not "
                    "creating one (it may exist further on): set it with `spendgate budget set`",
                    event_id, customer, LIST_LIMIT,
                )  # fmt: skip
                actions.append(f"no budget found for {customer} among the first {LIST_LIMIT}: nothing created")
            elif target is None and self._bills_someone_else(customer):
                self.stats.count("customer_conflict")
                log.error(
                    "webhook %s: budget %s exists but bills another Stripe customer; not changing it (set its "
                    "stripe_customer_id, or the limit, with `spendgate budget set`)", event_id, customer,
                )  # fmt: skip
                actions.append(f"budget {customer} bills another Stripe customer: limit unchanged")
            else:
                budget_id = target.customer_id if target is not None else customer
                applied = period if period is not None and period.applies_to(target) else None
                spec = applied.spec if applied is not None else None
                outcome = await self._engine_call(
                    self._update, budget_id, limit, None if target is not None else customer, spec
                )
                verb = "created" if outcome.created else "set"
                log.info(
                    "webhook %s: %s budget %s limit %d (plan %s)", event_id, verb, budget_id, limit, " / ".join(keys)
                )
                actions.append(f"{verb} budget {budget_id} limit {limit}")
                if applied is not None:
                    aligned.add(budget_id)
                    actions.append(self._period_action(event_id, outcome, applied))
                if outcome.created:
                    budgets = [outcome.balance]
        if period is not None:
            for budget in budgets:
                if budget.customer_id not in aligned:
                    actions.append(await self._align(event_id, budget, period, roll_only=False))
        if status in PAYING_STATUSES:
            for budget in budgets:
                if budget.customer_id in self._state.frozen_by_deletion:
                    await self._freeze(budget.customer_id, False, f"Stripe: subscription {sub.get('id')} is {status}")
                    del self._state.frozen_by_deletion[budget.customer_id]
                    log.info(
                        "webhook %s: unfroze budget %s: %s is %s again", event_id, budget.customer_id, customer, status
                    )
                    actions.append(f"unfroze {budget.customer_id}")
        return Outcome(200, "; ".join(a for a in actions if a))

    async def _subscription_deleted(self, event_id: str, sub: Mapping[str, Any], customer: str) -> Outcome:
        budgets, _ = self._budgets_of(customer)
        if not budgets:
            log.info(
                "webhook %s: subscription %s of %s deleted; no budget bills that customer",
                event_id,
                sub.get("id"),
                customer,
            )
            return Outcome(200, f"no budget bills {customer}")
        for budget in budgets:
            if self._frozen_by_someone_else(budget):
                log.info(
                    "webhook %s: budget %s was already frozen (not by a webhook); a new subscription will not "
                    "unfreeze it",
                    event_id,
                    budget.customer_id,
                )
                continue
            await self._freeze(budget.customer_id, True, f"Stripe: subscription {sub.get('id')} deleted")
            self._state.frozen_by_deletion[budget.customer_id] = str(sub.get("id") or "")
            # Deletion is now why it is frozen: paying an old invoice must not unfreeze it.
            self._state.payment_failed.pop(budget.customer_id, None)
        names = ", ".join(b.customer_id for b in budgets)
        log.warning(
            "webhook %s: subscription %s of %s deleted: froze budget %s", event_id, sub.get("id"), customer, names
        )
        return Outcome(200, f"froze {names}")

    # -- invoices ----------------------------------------------------------------------------------------------------

    async def _payment_failed(self, event_id: str, invoice: Mapping[str, Any], customer: str) -> Outcome:
        invoice_id = str(invoice.get("id") or "")
        self.stats.count("payment_failed")
        if self._payment_failed_action == "flag":
            log.warning(
                "webhook %s: payment of invoice %s by %s failed (attempt %s, %s %s due); flagged only "
                "(webhook_payment_failed_action = flag)", event_id, invoice_id, customer,
                invoice.get("attempt_count", "?"), invoice.get("amount_due", "?"), invoice.get("currency", ""),
            )  # fmt: skip
            return Outcome(200, f"flagged: payment of {invoice_id} failed")
        if invoice_id in self._state.paid_invoices:
            log.info("webhook %s: invoice %s failed earlier but is paid since; not freezing", event_id, invoice_id)
            return Outcome(200, f"{invoice_id} is already paid: not frozen")
        budgets, _ = self._budgets_of(customer)
        if not budgets:
            log.warning(
                "webhook %s: payment of invoice %s by %s failed; no budget bills that customer",
                event_id,
                invoice_id,
                customer,
            )
            return Outcome(200, f"no budget bills {customer}")
        for budget in budgets:
            if self._frozen_by_someone_else(budget):
                log.info(
                    "webhook %s: budget %s was already frozen (not by a webhook); invoice.paid will not unfreeze it",
                    event_id,
                    budget.customer_id,
                )
                continue
            await self._freeze(budget.customer_id, True, f"Stripe: payment of invoice {invoice_id} failed")
            failed = self._state.payment_failed.setdefault(budget.customer_id, [])
            if invoice_id not in failed:
                failed.append(invoice_id)
        names = ", ".join(b.customer_id for b in budgets)
        log.warning(
            "webhook %s: payment of invoice %s by %s failed: froze budget %s until it is paid",
            event_id,
            invoice_id,
            customer,
            names,
        )
        return Outcome(200, f"froze {names}")

    async def _invoice_paid(self, event_id: str, invoice: Mapping[str, Any], customer: str) -> Outcome:
        invoice_id = str(invoice.get("id") or "")
        period = _invoice_subscription_period(invoice)
        log.info(
            "webhook %s: invoice %s of %s paid (subscription period %s)",
            event_id,
            invoice_id,
            customer,
            period.describe() if period else "none: not a subscription invoice",
        )
        self._state.mark_paid(invoice_id)
        actions: list[str] = []
        if period is not None:
            for budget in self._budgets_of(customer)[0]:
                actions.append(await self._align(event_id, budget, period, roll_only=True))
        for budget_id, failed in list(self._state.payment_failed.items()):
            if invoice_id not in failed:
                continue
            failed.remove(invoice_id)
            if failed:
                log.warning(
                    "webhook %s: budget %s stays frozen: invoice %s still unpaid",
                    event_id,
                    budget_id,
                    ", ".join(failed),
                )
                actions.append(f"{budget_id} stays frozen ({', '.join(failed)} unpaid)")
                continue
            del self._state.payment_failed[budget_id]
            if budget_id in self._state.frozen_by_deletion:
                actions.append(f"{budget_id} stays frozen (subscription deleted)")
                continue
            await self._freeze(budget_id, False, f"Stripe: invoice {invoice_id} paid")
            log.info("webhook %s: invoice %s paid: unfroze budget %s", event_id, invoice_id, budget_id)
            actions.append(f"unfroze {budget_id}")
        return Outcome(200, "; ".join(a for a in actions if a) or f"{invoice_id} paid: nothing to change")

    async def _invoice_created(self, event_id: str, invoice: Mapping[str, Any], customer: str) -> Outcome:
        from spendgate.webhooks.invoices import RetryLater  # noqa: PLC0415 - with the guard only

        assert self._invoice_guard is not None
        budget = _pick_budget(self._budgets_of(customer)[0], customer)  # the alert names the budget billed
        try:
            action = await self._invoice_guard.on_invoice_created(
                event_id, invoice, budget.customer_id if budget is not None else customer
            )
        except RetryLater as error:
            raise TransientError(f"invoice {invoice.get('id')}: not now: {error}") from None
        self.stats.count("invoice_created")
        return Outcome(200, action)

    # -- meter errors ------------------------------------------------------------------------------------------------

    async def _meter_error_report(self, event_id: str, event_type: str, note: Mapping[str, Any]) -> Outcome:
        related = _mapping(note.get("related_object"))
        meter = str(related.get("id") or "?")
        self.stats.count("meter_error_reports")
        details: Mapping[str, Any] | None = None
        if self._fetch_event is not None:
            details = await self._fetch(event_id)
        if details is None:
            log.error(
                "Stripe meter error report %s (%s) for meter %s%s", event_id, event_type, meter,
                "" if self._fetch_event else ": set STRIPE_API_KEY to fetch which events Stripe refused",
            )  # fmt: skip
            self.stats.recent_error_reports.append({"event_id": event_id, "type": event_type, "meter": meter})
            return Outcome(200, "meter error report logged (no details)")
        data = _mapping(details.get("data"))
        reason = _mapping(data.get("reason"))
        letters = self._dead_letters_by_identifier()
        codes: dict[str, int] = {}
        samples: list[dict[str, Any]] = []
        for error_type in reason.get("error_types") or ():
            code = str(error_type.get("code") or "unknown")
            count = int(error_type.get("error_count") or 0)
            codes[code] = codes.get(code, 0) + count
            self.stats.count(f"meter_errors.{code}", count)
            for sample in error_type.get("sample_errors") or ():
                request = _mapping(sample.get("request"))
                identifier = str(request.get("identifier") or "")
                samples.append(_link(identifier, code, str(sample.get("error_message") or ""), letters))
        total = int(reason.get("error_count") or sum(codes.values()))
        report = {
            "event_id": event_id,
            "type": event_type,
            "meter": meter,
            "error_count": total,
            "codes": codes,
            "samples": samples,
            "window": [data.get("validation_start"), data.get("validation_end")],
        }
        self.stats.recent_error_reports.append(report)
        log.error(
            "Stripe refused %d meter event(s) on meter %s between %s and %s (report %s): %s. Samples: %s",
            total, meter, data.get("validation_start"), data.get("validation_end"), event_id,
            ", ".join(f"{code} x{count}" for code, count in codes.items()) or "no codes",
            "; ".join(_describe(sample) for sample in samples) or "none",
        )  # fmt: skip
        return Outcome(200, f"meter error report: {total} refused events")

    async def _fetch(self, event_id: str) -> Mapping[str, Any] | None:
        import stripe  # noqa: PLC0415 - only here and for verification

        assert self._fetch_event is not None
        try:
            return await asyncio.to_thread(self._fetch_event, event_id)
        except (stripe.APIConnectionError, stripe.RateLimitError) as error:
            raise TransientError(f"cannot fetch event {event_id} from Stripe now: {error}") from None
        except stripe.StripeError as error:
            if (error.http_status or 0) >= 500:
                raise TransientError(f"cannot fetch event {event_id} from Stripe now: {error}") from None
            log.warning("cannot fetch meter error report %s from Stripe: %s", event_id, error)
            return None

    def _dead_letters_by_identifier(self) -> dict[str, _core.DeadLetterEntry]:
        by_identifier: dict[str, _core.DeadLetterEntry] = {}
        for letter in self._engine.dead_letters(LIST_LIMIT):
            by_identifier[letter["identifier"]] = letter
            if letter.get("sent_as"):
                by_identifier[str(letter["sent_as"])] = letter
        return by_identifier

    # -- the engine --------------------------------------------------------------------------------------------------

    def _budgets_of(self, stripe_customer: str) -> tuple[list[_core.BalanceView], bool]:
        """The budgets billed to this Stripe customer, and whether every budget was searched."""
        views = self._engine.list_budgets("", LIST_LIMIT)
        complete = len(views) < LIST_LIMIT
        matches = [view for view in views if view.stripe_customer_id == stripe_customer]
        if not matches and not complete:
            try:
                view = self._engine.balance(stripe_customer)
            except _core.EngineError:
                view = None
            if view is not None and view.stripe_customer_id == stripe_customer:
                matches = [view]
        return matches, complete

    def _bills_someone_else(self, customer_id: str) -> bool:
        """A budget named like this Stripe customer exists and bills another one (set_budget would re-point it)."""
        try:
            return self._engine.balance(customer_id).stripe_customer_id != customer_id
        except _core.EngineError as error:
            if error.kind == "not_found":
                return False
            raise

    def _frozen_by_someone_else(self, budget: _core.BalanceView) -> bool:
        """Frozen, but not by a webhook (an operator's Admin.FreezeBudget): webhooks must never unfreeze it."""
        ours = budget.customer_id in self._state.payment_failed or budget.customer_id in self._state.frozen_by_deletion
        return budget.frozen and not ours

    async def _freeze(self, customer_id: str, frozen: bool, reason: str) -> None:
        """Freeze or unfreeze with the reason the budget shows (the engine raises the frozen/unfrozen alert)."""
        await self._engine_call(self._engine.freeze, customer_id, frozen, reason)

    def _update(
        self, customer_id: str, limit: int, stripe_customer_id: str | None, period: _core.PeriodSpec | None
    ) -> _core.SetBudgetOutcome:
        return self._engine.update_budget(
            customer_id, limit=limit, stripe_customer_id=stripe_customer_id, period=period
        )

    async def _align(self, event_id: str, budget: _core.BalanceView, period: StripePeriod, *, roll_only: bool) -> str:
        """Give the budget this period if it can be current (see Periods); roll_only: only if it starts later than the
        budget's current one. Returns what was done, or "" for nothing."""
        if not period.applies_to(budget) or (roll_only and period.start_ms <= budget.period_start_ms):
            log.info(
                "webhook %s: budget %s stays on its period %s (Stripe's %s is not newer)",
                event_id,
                budget.customer_id,
                _span(budget.period_start_ms, budget.period_end_ms),
                period.describe(),
            )
            return ""
        outcome = await self._engine_call(self._engine.update_budget, budget.customer_id, period=period.spec)
        return self._period_action(event_id, outcome, period)

    def _period_action(self, event_id: str, outcome: _core.SetBudgetOutcome, period: StripePeriod) -> str:
        view = outcome.balance
        verb = "rolled over to" if outcome.rolled else "aligned with"
        self.stats.count("period_rolled" if outcome.rolled else "period_aligned")
        log.info(
            "webhook %s: budget %s %s Stripe's period %s: now %s",
            event_id,
            view.customer_id,
            verb,
            period.describe(),
            _span(view.period_start_ms, view.period_end_ms),
        )
        return f"{view.customer_id} {verb} period {period.describe()}"

    async def _engine_call(
        self, method: Callable[..., _core.SetBudgetOutcome], *args: Any, **kwargs: Any
    ) -> _core.SetBudgetOutcome:
        try:
            outcome = method(*args, **kwargs)
            await self._wait_durable(outcome.ticket)
        except _core.EngineError as error:
            if error.kind in TRANSIENT_KINDS:
                raise TransientError(f"{error.kind}: {error.message}") from None
            raise
        return outcome


@dataclass(frozen=True, slots=True)
class StripePeriod:
    """A Stripe billing period [start, end), in Unix milliseconds."""

    start_ms: int
    end_ms: int

    @classmethod
    def of(cls, start_s: Any, end_s: Any) -> StripePeriod | None:
        """From Stripe's Unix seconds; None unless both are whole numbers whose span the engine takes."""
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in (start_s, end_s)):
            return None
        if not MIN_PERIOD_MS <= (end_s - start_s) * 1000 <= MAX_PERIOD_MS:
            return None
        return cls(start_s * 1000, end_s * 1000)

    @property
    def spec(self) -> _core.PeriodSpec:
        return {"kind": "fixed", "anchor_ms": self.start_ms, "length_ms": self.end_ms - self.start_ms}

    def applies_to(self, budget: _core.BalanceView | None, now_ms: int | None = None) -> bool:
        """It can be the current period of the budget (None: of a budget about to be created): not over, and not
        older than a fixed period the budget is on (an event delivered late or out of order must not move it back)."""
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        if self.end_ms <= now:
            return False
        return budget is None or budget.period.get("kind") != "fixed" or self.start_ms >= budget.period_start_ms

    def describe(self) -> str:
        return _span(self.start_ms, self.end_ms)


def _subscription_period(sub: Mapping[str, Any], item: Mapping[str, Any]) -> StripePeriod | None:
    """The current period: on the (first) item since 2025-03-31.basil, on the subscription before."""
    if "current_period_start" in item:
        return StripePeriod.of(item.get("current_period_start"), item.get("current_period_end"))
    return StripePeriod.of(sub.get("current_period_start"), sub.get("current_period_end"))


def _invoice_subscription_period(invoice: Mapping[str, Any]) -> StripePeriod | None:
    """The latest-starting period among a subscription invoice's subscription lines (see Periods), or None."""
    parent = _mapping(invoice.get("parent"))
    subscription = _id_of(_mapping(parent.get("subscription_details")).get("subscription")) or _id_of(
        invoice.get("subscription")
    )  # before basil: invoice.subscription
    if not subscription:
        return None
    lines = _mapping(invoice.get("lines")).get("data")
    periods = []
    for line in lines if isinstance(lines, list) else ():
        line = _mapping(line)
        line_parent = _mapping(line.get("parent"))
        if line_parent.get("type") == "subscription_item_details" or line.get("type") == "subscription":
            period = _mapping(line.get("period"))
            found = StripePeriod.of(period.get("start"), period.get("end"))
            if found is not None:
                periods.append(found)
    return max(periods, key=lambda p: p.start_ms, default=None)


def _span(start_ms: int, end_ms: int) -> str:
    return f"{_when(start_ms // 1000)} .. {_when(end_ms // 1000) if end_ms < 2**63 - 1 else 'never'}"


def _mapping(value: Any) -> Mapping[str, Any]:
    """A JSON object from an event, or an empty one where the event has something else (or nothing)."""
    return value if isinstance(value, Mapping) else {}


def _acts_on(event_type: str) -> bool:
    return event_type in SUBSCRIPTION_CHANGED or event_type in (
        SUBSCRIPTION_DELETED,
        INVOICE_PAID,
        INVOICE_PAYMENT_FAILED,
        INVOICE_CREATED,
    )


def _id_of(value: Any) -> str:
    """An object reference: an id, or an expanded object with an id."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) else ""


def _first_item(sub: Mapping[str, Any]) -> Mapping[str, Any]:
    items = sub.get("items")
    data = items.get("data") if isinstance(items, Mapping) else None
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        return data[0]
    return {}


def _pick_budget(budgets: list[_core.BalanceView], customer: str) -> _core.BalanceView | None:
    """The one budget a plan limit applies to: the only one, or the one whose id is the Stripe customer id."""
    if len(budgets) == 1:
        return budgets[0]
    return next((budget for budget in budgets if budget.customer_id == customer), None)


def _when(ts: Any) -> str:
    if isinstance(ts, int):
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return "?"


def _link(identifier: str, code: str, message: str, letters: Mapping[str, Any]) -> dict[str, Any]:
    """One sample error, with the dead letter and the reservation it belongs to where the identifier tells."""
    sample: dict[str, Any] = {"identifier": identifier, "code": code, "message": message}
    letter = letters.get(identifier)
    if letter is not None:
        sample["dead_letter_seq"] = letter["seq"]
        sample["customer_id"] = letter["customer_id"]
    match = _IDENTIFIER_RE.match(identifier)
    if match:
        sample["reservation_id"] = match["reservation_id"]
    return sample


def _describe(sample: Mapping[str, Any]) -> str:
    where = []
    if "dead_letter_seq" in sample:
        where.append(f"dead letter seq {sample['dead_letter_seq']} of {sample['customer_id']}")
    if "reservation_id" in sample:
        if "dead_letter_seq" not in sample:
            where.append(
                f"the event of reservation {sample['reservation_id']}: Stripe accepted it, then refused it, so "
                "it is not on the invoice (reconcile shows it as UNDER)"
            )
        else:
            where.append(f"reservation {sample['reservation_id']}")
    elif "dead_letter_seq" not in sample:
        where.append("not a spendgate identifier")
    return f"{sample['identifier'] or '?'} ({sample['code']}: {sample['message']}; {', '.join(where)})"

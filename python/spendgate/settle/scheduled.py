"""Reconciliation on a schedule: every `reconcile_interval_ms` the sidecar compares each active customer's current
period in the ledger with Stripe's meter event summaries, with the same code as `spendgate reconcile`
(spendgate.settle.reconcile: ledger_rows, find_meter, stripe_total, judge), and raises a `reconcile_divergence` alert
for a customer that differs by more than `reconcile_tolerance_percent`.

Who. An active customer is a Stripe customer billed by a budget that has spent or holds something in its current
period. Its window is [the earliest current-period start of its budgets, rounded up to a minute; the next minute):
Stripe's summaries take whole minutes, and both sides are read over the same window (as `spendgate reconcile` does).

What is allowed for (as `spendgate reconcile` does, plus one rule):
- pending usage (committed, not yet acknowledged by Stripe: still in the outbox) is not expected at Stripe: Stripe is
  compared with the settled part only;
- in flight (sent at least once, not acknowledged): may be at Stripe already, so an excess up to it is not a divergence;
- not visible yet: Stripe's summaries are eventually consistent, so usage Stripe acknowledged within the last
  `reconcile_visibility_allowance_ms` may be missing from them; a shortfall up to it is not a divergence;
- `reconcile_tolerance_percent` of the settled usage, either way.
Commits priced from tokens are compared on the token meter, in tokens, when settle_token_event_name is set.

Alerts. A customer (and meter) raises one alert when it becomes divergent, and another only when its difference
changes; a customer back within tolerance is forgotten. This is remembered in memory: after a restart, a divergence
that persists is alerted once more. The alert's values carry both figures (`stripe`, `settled`) and
the rest (`ledger`, `pending`, `in_flight`, `difference`, the window).

Bounds. At most `reconcile_max_customers` Stripe customers a run, in id order, each run going on after the last one
compared (so every customer gets its turn); at most `reconcile_max_requests_per_second` Stripe calls a second (one or
two per customer, and one a run to find each meter); the budgets looked at are the first LIST_LIMIT (10,000) the
engine lists. The ledger is read once a run (spendgate.store_reader, in a child
process). Metrics: spendgate_reconcile_runs_total{outcome}, spendgate_reconcile_divergent_customers,
spendgate_reconcile_last_success_timestamp_seconds. The operator page shows each customer's last result and its age.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from spendgate import _core
from spendgate.settle import reconcile
from spendgate.store_reader import StoreReader, StoreReadError

if TYPE_CHECKING:
    import stripe

    from spendgate.config import Settings
    from spendgate.server.metrics import Metrics

log = logging.getLogger("spendgate.reconcile")

ALERT_KIND: Final[str] = "reconcile_divergence"
# The first run comes this soon after the start (or after one interval, when that is shorter).
FIRST_RUN_DELAY_MS: Final[int] = 60_000
# Budgets looked at per run (Engine.list_budgets returns at most this many).
LIST_LIMIT: Final[int] = 10_000
UNITS: Final[str] = "units"
TOKENS: Final[str] = "tokens"


@dataclasses.dataclass(frozen=True, slots=True)
class CustomerResult:
    """One customer's comparison on one meter, as the page and the alert show it."""

    stripe_customer_id: str
    budgets: tuple[str, ...]
    unit: str  # "units" (settle_event_name) or "tokens" (settle_token_event_name)
    window_start_s: int
    window_end_s: int
    ledger: int
    settled: int
    pending: int
    in_flight: int
    recent: int
    stripe: int
    status: str
    ts_ms: int

    @property
    def divergent(self) -> bool:
        return self.status in reconcile.MISMATCHES

    @property
    def difference(self) -> int:
        return self.stripe - self.settled

    def as_dict(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body.update(
            divergent=self.divergent,
            difference=self.difference,
            window_start=_iso(self.window_start_s),
            window_end=_iso(self.window_end_s),
        )
        return body


@dataclasses.dataclass(frozen=True, slots=True)
class RunSummary:
    compared: int
    divergent: int
    not_visible: int
    in_flight: int
    errors: int
    requests: int


class Pacer:
    """At most `per_second` calls a second: wait() sleeps until the next call may go (blocking; the run's thread)."""

    def __init__(
        self,
        per_second: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        assert per_second >= 1
        self._gap_s = 1.0 / per_second
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0
        self.calls = 0

    def wait(self) -> None:
        now = self._clock()
        if now < self._next:
            self._sleep(self._next - now)
            now = self._next
        self._next = now + self._gap_s
        self.calls += 1


class _PacedClient:
    """The parts of stripe.StripeClient that reconcile uses, each call paced."""

    def __init__(self, client: stripe.StripeClient, pacer: Pacer) -> None:
        self.v1 = _Paced(client.v1, pacer)


class _Paced:
    def __init__(self, target: Any, pacer: Pacer) -> None:
        self._target = target
        self._pacer = pacer

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if callable(value):

            def paced(*args: Any, **kwargs: Any) -> Any:
                self._pacer.wait()
                return value(*args, **kwargs)

            return paced
        return _Paced(value, self._pacer)


class ScheduledReconcile:
    """The schedule (run()), one run (run_once()), and the last results (last_result(), for the page)."""

    def __init__(
        self,
        engine: _core.Engine,
        settings: Settings,
        wait_durable: Callable[[int], Awaitable[None]],
        *,
        metrics: Metrics | None = None,
        client: stripe.StripeClient | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._wait_durable = wait_durable
        self._metrics = metrics
        self.interval_ms = settings.reconcile_interval_ms
        self.enabled = self.interval_ms > 0 and (client is not None or bool(settings.stripe_api_key))
        self._client = client
        self._cursor = ""  # the last Stripe customer compared: the next run goes on after it
        self._results: dict[tuple[str, str], CustomerResult] = {}
        self._alerted: dict[tuple[str, str], int] = {}  # (customer, unit) -> the difference last alerted
        self._results_lock = threading.Lock()  # the page reads while a run writes

    def last_result(self, stripe_customer_id: str) -> dict[str, Any] | None:
        """The last units result of this Stripe customer (else its tokens result), or None."""
        with self._results_lock:
            found = self._results.get((stripe_customer_id, UNITS)) or self._results.get((stripe_customer_id, TOKENS))
        return found.as_dict() if found is not None else None

    def divergent_customers(self) -> int:
        with self._results_lock:
            return len({key[0] for key, result in self._results.items() if result.divergent})

    # -- the schedule -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: wait, run, wait an interval, ... A failed run is logged and counted; the next one comes on time."""
        if not self.enabled:
            return
        log.info(
            "scheduled reconcile on: every %d ms, tolerance %d%%, at most %d customers a run and %d Stripe "
            "calls a second",
            self.interval_ms,
            self._settings.reconcile_tolerance_percent,
            self._settings.reconcile_max_customers,
            self._settings.reconcile_max_requests_per_second,
        )
        await asyncio.sleep(min(self.interval_ms, FIRST_RUN_DELAY_MS) / 1000)
        while True:
            started = time.monotonic()
            try:
                await self.run_once()
            except (reconcile.ReconcileError, StoreReadError, OSError) as error:
                self._count_run("error")
                log.warning("scheduled reconcile failed (the next run is in %d ms): %s", self.interval_ms, error)
            except _core.EngineError as error:
                self._count_run("error")
                log.error("scheduled reconcile stops: the engine is unavailable: %s", error.message)
                return
            except Exception:  # a bug: say so loudly, and keep the schedule (one bad run must not end them all)
                self._count_run("error")
                log.exception("scheduled reconcile failed unexpectedly (the next run is in %d ms)", self.interval_ms)
            elapsed_ms = (time.monotonic() - started) * 1000
            await asyncio.sleep(max(0.0, self.interval_ms - elapsed_ms) / 1000)

    async def run_once(self) -> RunSummary:
        """One run: choose the customers, compare them (in a thread: the ledger read and Stripe block), alert."""
        windows, budgets = self._select(time.time())
        if not windows:
            self._publish([], set())
            self._count_run("ok")
            return RunSummary(0, 0, 0, 0, 0, 0)
        results, errors, requests = await asyncio.to_thread(self._compare, windows, budgets)
        for result in results:
            if result.divergent:
                await self._alert(result)
        self._publish(results, set(windows))
        self._count_run("ok")
        summary = RunSummary(
            compared=len(windows),
            divergent=sum(r.divergent for r in results),
            not_visible=sum(r.status == reconcile.STATUS_NOT_VISIBLE for r in results),
            in_flight=sum(r.status == reconcile.STATUS_IN_FLIGHT for r in results),
            errors=len(errors),
            requests=requests,
        )
        log.info(
            "scheduled reconcile: %d customers compared, %d divergent, %d not visible at Stripe yet (settled "
            "within reconcile_visibility_allowance_ms), %d in flight, %d errors, %d Stripe calls%s",
            summary.compared,
            summary.divergent,
            summary.not_visible,
            summary.in_flight,
            summary.errors,
            summary.requests,
            "".join(f"; error: {e}" for e in errors),
        )
        return summary

    # -- one run ----------------------------------------------------------------------------------------------------

    def _select(self, now_s: float) -> tuple[dict[str, reconcile.Period], dict[str, tuple[str, ...]]]:
        """The windows of this run's Stripe customers (at most reconcile_max_customers, after the cursor), and their
        budgets."""
        end_s = (int(now_s) // 60 + 1) * 60  # the next minute, as `spendgate reconcile` (Stripe takes no later end)
        starts: dict[str, int] = {}
        budgets: dict[str, list[str]] = {}
        for view in self._engine.list_budgets("", LIST_LIMIT):
            if not view.stripe_customer_id or not (view.spent or view.reserved):
                continue
            start_s = -(-view.period_start_ms // 60_000) * 60
            customer = view.stripe_customer_id
            starts[customer] = min(start_s, starts.get(customer, start_s))
            budgets.setdefault(customer, []).append(view.customer_id)
        ordered = sorted(customer for customer, start_s in starts.items() if start_s < end_s)
        limit = self._settings.reconcile_max_customers
        chosen = [c for c in ordered if c > self._cursor][:limit]
        if len(chosen) < limit:  # wrap around to the start
            chosen += [c for c in ordered if c <= self._cursor and c not in chosen][: limit - len(chosen)]
        self._cursor = chosen[-1] if chosen and len(ordered) > limit else ""
        windows = {c: reconcile.Period(starts[c], end_s, end_s) for c in chosen}
        return windows, {c: tuple(sorted(budgets[c])) for c in chosen}

    def _compare(
        self, windows: Mapping[str, reconcile.Period], budgets: Mapping[str, tuple[str, ...]]
    ) -> tuple[list[CustomerResult], list[str], int]:
        """The comparisons of one run (blocking): (results, errors, Stripe calls made)."""
        settings = self._settings
        pacer = Pacer(settings.reconcile_max_requests_per_second)
        client: Any = _PacedClient(self._stripe_client(), pacer)
        now_ms = time.time_ns() // 1_000_000
        recent_after_ms = now_ms - settings.reconcile_visibility_allowance_ms
        token_name = settings.settle_token_event_name
        with StoreReader(settings.data_dir) as store:
            rows = reconcile.ledger_rows(
                store, None, (), reconcile.units_of(bool(token_name)), windows=windows, recent_after_ms=recent_after_ms
            )
            token_rows = (
                reconcile.ledger_rows(
                    store, None, (), reconcile.tokens_of, windows=windows, recent_after_ms=recent_after_ms
                )
                if token_name
                else {}
            )
        errors: list[str] = []
        results = self._compare_meter(client, settings.settle_event_name, UNITS, rows, windows, budgets, now_ms, errors)
        token_rows = {c: row for c, row in token_rows.items() if row.ledger or row.stripe}
        if token_rows:
            results += self._compare_meter(client, token_name, TOKENS, token_rows, windows, budgets, now_ms, errors)
        return results, errors, pacer.calls

    def _compare_meter(
        self,
        client: Any,
        event_name: str,
        unit: str,
        rows: Mapping[str, reconcile.Row],
        windows: Mapping[str, reconcile.Period],
        budgets: Mapping[str, tuple[str, ...]],
        now_ms: int,
        errors: list[str],
    ) -> list[CustomerResult]:
        try:
            meter = reconcile.find_meter(client, event_name)
            reconcile.check_sum(meter)
        except reconcile.ReconcileError as error:
            errors.append(str(error))
            return []
        results = []
        tolerance = self._settings.reconcile_tolerance_percent
        for customer in sorted(rows):
            row, window = rows[customer], windows[customer]
            try:
                row.stripe = reconcile.stripe_total(client, str(meter["id"]), customer, window.start_s, window.end_s)
            except reconcile.ReconcileError as error:  # one customer Stripe does not know must not hide the others
                errors.append(str(error))
                continue
            row.status = reconcile.judge(row, tolerance, live=True)  # the ledger was read first, Stripe now
            results.append(
                CustomerResult(
                    stripe_customer_id=customer,
                    budgets=budgets.get(customer, ()),
                    unit=unit,
                    window_start_s=window.start_s,
                    window_end_s=window.end_s,
                    ledger=row.ledger,
                    settled=row.settled,
                    pending=row.pending,
                    in_flight=row.in_flight,
                    recent=row.recent,
                    stripe=round(row.stripe),
                    status=row.status,
                    ts_ms=now_ms,
                )
            )
        return results

    def _stripe_client(self) -> stripe.StripeClient:
        if self._client is None:
            self._client = reconcile.make_client(self._settings)
        return self._client

    # -- alerts, results, metrics -----------------------------------------------------------------------------------

    async def _alert(self, result: CustomerResult) -> None:
        key = (result.stripe_customer_id, result.unit)
        if self._alerted.get(key) == result.difference:
            return  # alerted already for this very difference
        budgets = result.budgets
        alert_customer = budgets[0] if len(budgets) == 1 else result.stripe_customer_id
        meter = self._settings.settle_event_name if result.unit == UNITS else self._settings.settle_token_event_name
        share = f"{result.difference / result.settled * 100:+.2f}%" if result.settled else "n/a"
        why = (
            "Stripe counts more than the ledger: the customer would be over-billed (`spendgate reconcile --fix` "
            "shows the hours)"
            if result.status == reconcile.STATUS_OVER
            else "Stripe counts less than the ledger settled: usage is missing from the invoice (look for meter error "
            "reports and dead letters)"
        )
        message = (
            f"Stripe's meter {meter} shows {result.stripe} {result.unit} for {result.stripe_customer_id} from "
            f"{_iso(result.window_start_s)} to {_iso(result.window_end_s)}, the ledger settled {result.settled} "
            f"({result.difference:+}, {share}; pending {result.pending}, in flight {result.in_flight}); "
            f"tolerance {self._settings.reconcile_tolerance_percent}%: {why}"
        )
        values = {
            "stripe": result.stripe,
            "settled": result.settled,
            "ledger": result.ledger,
            "pending": result.pending,
            "in_flight": result.in_flight,
            "difference": result.difference,
            "window_start_s": result.window_start_s,
            "window_end_s": result.window_end_s,
            "tolerance_percent": self._settings.reconcile_tolerance_percent,
        }
        await self._wait_durable(self._engine.raise_alert(ALERT_KIND, alert_customer, message, values))
        self._alerted[key] = result.difference
        log.warning("reconcile divergence: %s", message)

    def _publish(self, results: Sequence[CustomerResult], compared: set[str]) -> None:
        with self._results_lock:
            for result in results:
                self._results[(result.stripe_customer_id, result.unit)] = result
                if not result.divergent:
                    self._alerted.pop((result.stripe_customer_id, result.unit), None)
            # Customers no longer active (nothing spent in their current period) leave the results: bounded by the
            # budgets, and a stale divergence must not count in the gauge.
            active = {c for c, _ in self._results if c in compared} | self._still_active()
            for key in [k for k in self._results if k[0] not in active]:
                del self._results[key]
                self._alerted.pop(key, None)
        if self._metrics is not None:
            self._metrics.reconcile_divergent.set(self.divergent_customers())

    def _still_active(self) -> set[str]:
        return {
            view.stripe_customer_id
            for view in self._engine.list_budgets("", LIST_LIMIT)
            if view.stripe_customer_id and (view.spent or view.reserved)
        }

    def _count_run(self, outcome: str) -> None:
        if self._metrics is None:
            return
        self._metrics.reconcile_runs.labels(outcome=outcome).inc()
        if outcome == "ok":
            self._metrics.reconcile_last_success.set(time.time())


def _iso(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%MZ")

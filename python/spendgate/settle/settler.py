"""The settler: drains the outbox to Stripe Billing Meters, exactly once.

One round:
1. `outbox_pending(batch)`: the oldest durable entries (each is a committed usage; Commit wrote it in the same LMDB
   transaction as the ledger entry).
2. Events: an entry already claimed (`sent_as` set) is rebuilt exactly as first sent (aggregate.claimed_events); the
   others become one event each (a token entry: one per token type), or, with pre-aggregation, one per Stripe customer
   per closed window (token entries: per customer, model and token type). Events that settle the same entries share a
   claim (aggregate.py).
3. Rules that need no network (rules.py: 24-hour resend safety, the 35-day / 5-minute timestamp window, the value's
   digits, a missing customer id) and checks of what Stripe validates only asynchronously (preflight.py): a failed one
   sends the claim's entries to the dead letters with the reason, before any of its events is sent.
4. Claim: `outbox_claim(seqs, claim)` fixes the claim on its entries, and the settler waits until that is durable
   BEFORE the first send. A crash after a send therefore always resends the same events (identifiers, values,
   timestamps), which Stripe drops as duplicates.
5. Send, from a small pool of threads (the SDK blocks), retrying 429 / 5xx / connection errors with exponential backoff
   and full jitter, honouring Stripe-Should-Retry (errors.py).
6. Acknowledge (`outbox_ack`) a claim's entries only once Stripe accepted every one of its events, or answered them as
   duplicates; a claim with an event accepted and another failing is resent whole next round (the accepted one is then
   a duplicate). Dead-letter what Stripe refused for good, raising a `settlement_dead_letter` alert per entry. One bad
   event never holds back the others: each event (v1) or batch (v2, bisected on a refusal) stands alone.

Between rounds: at once while there is work; `settle_interval_ms` when the outbox is empty; while Stripe fails, rounds
back off (full jitter up to `settle_backoff_max_ms`) and send a single probe call until one succeeds.

Failing, and recovering, are seen as they happen:
- Every failed attempt of a call updates the status's `last_error` at once, and a request past its timeout (the SDK's
  timeout, or a call the watchdog finds running OVERDUE_GRACE_MS past it) declares settlement failing at once (the
  status, the "failing" warning, the `timeout` Stripe error metric): one hung round must not hide for minutes. A
  timed-out call is not retried within its round (the next round resends it, the claim makes that safe), so a hanging
  Stripe holds a round for one request timeout, not settle_max_attempts of them.
- While failing, the pause between rounds (and the claims' own backoff) ends early when a cheap probe (a one-meter
  list) is answered: probes go at most every PROBE_INTERVAL_MS, each waiting at most PROBE_TIMEOUT_MS, so settlement
  resumes within about PROBE_INTERVAL_MS of Stripe answering again instead of after a backoff of up to 30 s. When a
  probe is answered but the round after it still fails (PROBE_MISLEADS_MAX times in a row: Stripe answers reads and
  refuses the events), the probes say nothing about this failure and the rounds keep their plain backoff until it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol

from spendgate import _core
from spendgate.settle import rules
from spendgate.settle.aggregate import (
    EventNames,
    MeterEvent,
    claimed_events,
    fresh_events,
)
from spendgate.settle.errors import (
    TIMEOUT_CODE,
    Classified,
    Verdict,
    classify,
    error_code,
    is_timeout,
    truncate_reason,
)
from spendgate.settle.monitor import OutboxMonitor
from spendgate.settle.pool import DaemonThreadPool
from spendgate.settle.preflight import Preflight

log = logging.getLogger("spendgate.settle")

# The engine takes at most this many seqs per call (outbox_pending, outbox_ack, ...).
MAX_ENGINE_BATCH: Final[int] = 10_000
# Dead letters of one customer in one round that get an alert each; past it, the round raises one alert with the count
# (a meter deleted by mistake must not bury the alert channel under one alert per commit).
MAX_DEAD_LETTER_ALERTS_PER_CUSTOMER: Final[int] = 100
DEAD_LETTER_ALERT: Final[str] = "settlement_dead_letter"
DEFAULT_TOKEN_EVENT_NAME: Final[str] = "token-billing-tokens"
# Stripe: event_name "The maximum length is 100 characters."
MAX_EVENT_NAME_CHARS: Final[int] = 100
# While settlement fails, at most one probe this often: settlement resumes within about this long of Stripe answering.
PROBE_INTERVAL_MS: Final[int] = 500
# The longest a probe waits for Stripe (a hanging Stripe must not hold it for a whole request timeout).
PROBE_TIMEOUT_MS: Final[int] = 2_000
# Rounds in a row that failed right after an answered probe before the probes are ignored until the failure ends.
PROBE_MISLEADS_MAX: Final[int] = 3
# Automatic pre-aggregation (settle_auto_aggregate): once a round's worth of entries (fetch_limit) waits in the outbox,
# one event per Stripe customer (and model) per AUTO_AGGREGATE_WINDOW_MS, until a quarter of a round's worth is left.
# One event per commit costs a request each on v1 (Stripe: 1,000/s; the settler: ~1.3 ms of the sidecar's CPU, under
# the GIL the RPCs need too), so at a high commit rate it both falls behind and slows the commits down (bench/RESULTS.md
# section 4); per customer per second it does neither. Aggregated, the outbox holds about a second of commits (the
# window that is still open): the gap between the two bounds keeps a sidecar committing a few hundred a second from
# switching back and forth.
AUTO_AGGREGATE_ON_ROUNDS: Final[float] = 1.0
AUTO_AGGREGATE_OFF_ROUNDS: Final[float] = 0.25
# Whole seconds: v1 timestamps are Unix seconds, so an aggregate carries the timestamp each of its members' own events
# would have had (and never moves usage across an invoice's period boundary, which falls on a second).
AUTO_AGGREGATE_WINDOW_MS: Final[int] = 1_000
# Entries read per round while aggregating (the engine's most per call), so that a round covers whole seconds; the
# events sent per round stay at fetch_limit (the rest of the claims wait for the next round).
AUTO_AGGREGATE_FETCH_ENTRIES: Final[int] = MAX_ENGINE_BATCH
# A call still running this long past settle_request_timeout_ms counts as timed out (the HTTP library bounds each
# connect and read by the timeout, not a whole request: a server trickling bytes could hold one longer).
OVERDUE_GRACE_MS: Final[int] = 1_000


class SettleMetrics(Protocol):
    """Where the settler reports to the sidecar's metrics (spendgate.server.metrics.Metrics is one)."""

    def stripe_error(self, code: str) -> None: ...

    def settle_duplicate(self, outcome: str, n: int = 1) -> None: ...

    def settle_probe(self, outcome: str) -> None: ...

    @property
    def settlement_lag(self) -> Any: ...  # a prometheus_client Histogram: .observe(seconds)


class Transport(Protocol):
    name: str
    event_name: str
    max_events_per_call: int
    validates_meter: bool

    def send(self, events: Sequence[MeterEvent]) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class SettleOptions:
    """The settle_* settings (see spendgate.config), checked for what the settler needs."""

    transport: str = "v1"
    event_name: str = "spendgate_usage"
    token_event_name: str = DEFAULT_TOKEN_EVENT_NAME
    batch_size: int = 100
    concurrency: int = 4
    interval_ms: int = 500
    aggregate_window_ms: int = 0
    max_attempts: int = 5
    backoff_base_ms: int = 100
    backoff_max_ms: int = 30_000
    request_timeout_ms: int = 30_000
    auto_aggregate: bool = True

    def __post_init__(self) -> None:
        if self.transport not in ("v1", "v2"):
            raise ValueError(f"settle_transport: expected v1 or v2, got {self.transport!r}")
        if not 1 <= self.batch_size <= 100:
            raise ValueError(
                f"settle_batch_size: expected 1..=100 (Stripe's v2 stream takes at most 100 events per request), "
                f"got {self.batch_size}"
            )
        for setting, name in (
            ("settle_event_name", self.event_name),
            ("settle_token_event_name", self.token_event_name),
        ):
            if len(name) > MAX_EVENT_NAME_CHARS:
                raise ValueError(f"{setting}: Stripe allows at most {MAX_EVENT_NAME_CHARS} characters, got {len(name)}")
        if self.token_event_name == self.event_name:
            raise ValueError(
                f"settle_token_event_name: {self.token_event_name!r} is also settle_event_name; token counts and units "
                'on one meter would be added up: name another meter, or set it to "" to settle token usage as units'
            )
        if self.concurrency < 1 or self.max_attempts < 1 or self.interval_ms < 1:
            raise ValueError("settle_concurrency, settle_max_attempts and settle_interval_ms must be >= 1")
        if self.backoff_max_ms < self.backoff_base_ms:
            raise ValueError(
                f"settle_backoff_max_ms ({self.backoff_max_ms}) must be >= settle_backoff_base_ms "
                f"({self.backoff_base_ms})"
            )

    @classmethod
    def from_settings(cls, settings: Any) -> SettleOptions:
        """From spendgate.config.Settings (duck-typed: config stays free of settle imports)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(settings, f"settle_{name}") for name in names})

    @property
    def event_names(self) -> EventNames:
        return EventNames(self.event_name, self.token_event_name)

    @property
    def aggregating(self) -> bool:
        """Whether an entry may leave in an aggregate (an identifier of its own is then not the only one it may have
        been sent under: see rules.restored_unsure)."""
        return self.aggregate_window_ms > 0 or self.auto_aggregate

    @property
    def fetch_limit(self) -> int:
        """Entries read per round: enough for `concurrency` calls of `batch_size` events."""
        return min(MAX_ENGINE_BATCH, self.batch_size * self.concurrency)


@dataclasses.dataclass
class SettlementStatus:
    """What GetSettlementStatus and `spendgate settle status` show (besides the engine's outbox stats)."""

    enabled: bool
    transport: str
    event_name: str
    aggregate_window_ms: int = 0
    last_success_ms: int = 0
    last_error: str = ""
    last_error_ms: int = 0
    delivered_events: int = 0
    delivered_entries: int = 0
    dead_lettered_entries: int = 0
    failing_since_ms: int = 0


@dataclasses.dataclass(slots=True)
class RoundResult:
    fetched: int = 0
    delivered: int = 0  # events
    dead: int = 0  # events
    skipped: int = 0  # zero-value events acknowledged without a call
    failed: int = 0  # events left for a later round
    waiting: int = 0  # entries in aggregation windows not yet closed, or backing off
    retry_in_s: float | None = None  # the earliest time a backing-off event may go again

    @property
    def progressed(self) -> bool:
        return self.delivered + self.dead + self.skipped > 0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Settler:
    def __init__(
        self,
        engine: _core.Engine,
        transport: Transport,
        options: SettleOptions,
        *,
        wait_durable: Callable[[int], Awaitable[None]],
        preflight: Preflight | None = None,
        status: SettlementStatus | None = None,
        monitor: OutboxMonitor | None = None,
        clock_ms: Callable[[], int] = wall_ms,
        rng: random.Random | None = None,
        metrics: SettleMetrics | None = None,
        probe: Callable[[], object] | None = None,
    ) -> None:
        """probe: a cheap blocking Stripe call (raises the SDK's error) sent while settlement fails; None: no probes."""
        self._engine = engine
        self._metrics = metrics
        self._transport = transport
        self.options = options
        self._wait_durable = wait_durable
        self._preflight = preflight
        self.status = status or SettlementStatus(
            True, transport.name, transport.event_name, options.aggregate_window_ms
        )
        self._monitor = monitor or OutboxMonitor(settling=True)
        self._clock_ms = clock_ms
        self._rng = rng or random.Random()
        self._pool = DaemonThreadPool(options.concurrency)
        self._probe = probe
        # Its own thread: the send threads may all be held by hanging requests.
        self._probe_pool = DaemonThreadPool(1, "spendgate-settle-probe") if probe is not None else None
        self._last_probe_s = float("-inf")  # loop time of the last probe
        self._probe_answered_last = False  # the pause before this round ended on an answered probe
        self._probe_misleads = 0  # rounds in a row that failed right after an answered probe
        self._overdue_s = (options.request_timeout_ms + OVERDUE_GRACE_MS) / 1000
        self.auto_aggregating = False  # settle_auto_aggregate: on while a backlog waits (see _auto_aggregate)
        self._waited = True  # the loop waited before this round (False right after a round that made progress)
        self._round_lock = asyncio.Lock()
        self._stalls = 0  # rounds in a row that made no progress because calls failed
        self._failures: dict[str, tuple[int, float]] = {}  # claim -> (failed rounds, not before: loop time)
        # Claims with an attempt Stripe did not answer (this round): their fate is unknown if they are refused later.
        self._unanswered: set[str] = set()
        self._closed = False

    # -- the loop -------------------------------------------------------------------------------------------------

    async def run(self, *, until_empty: bool = False) -> None:
        """Settle until cancelled (or, with until_empty, until the outbox is empty). Engine errors are logged and
        retried; a failed engine (the writer stopped for good) ends the loop."""
        while True:
            try:
                result = await self.run_once()
            except _core.EngineError as error:
                if self._engine.failure() is not None or error.kind == "unavailable":
                    log.error("settlement stops: the engine is unavailable: %s", error.message)
                    return
                log.error("settlement round failed in the engine: %s: %s; retrying", error.kind, error.message)
                result = RoundResult(failed=1)
            if until_empty and result.fetched == 0:
                return
            delay_s = self._delay_after(result)
            self._waited = delay_s > 0
            await self._pause(delay_s)

    def _delay_after(self, result: RoundResult) -> float:
        if result.failed and not result.delivered:
            # Zero-value entries acknowledged (or local dead letters) beside the failures are no sign that Stripe is
            # back: back off, or a steady trickle of them would resend the failing claims without pause.
            return self._backoff_s(self._stalls)
        if result.progressed:
            return 0.0
        idle = self.options.interval_ms / 1000
        if result.retry_in_s is not None:
            return max(0.01, min(idle, result.retry_in_s))
        return idle

    async def _pause(self, delay_s: float) -> None:
        """Sleep delay_s; while settlement fails, probe Stripe (at most every PROBE_INTERVAL_MS) and end the pause, and
        the claims' own backoff, at the first probe Stripe answers."""
        self._probe_answered_last = False
        if self._probe is None or self.status.failing_since_ms == 0 or self._probe_misleads >= PROBE_MISLEADS_MAX:
            await asyncio.sleep(delay_s)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay_s
        interval_s = PROBE_INTERVAL_MS / 1000
        while (now := loop.time()) < deadline:
            next_probe = self._last_probe_s + interval_s
            if next_probe >= deadline:
                await asyncio.sleep(deadline - now)
                return
            await asyncio.sleep(max(0.0, next_probe - now))
            self._last_probe_s = loop.time()
            if await self._probe_answered():
                self._probe_answered_last = True
                self._failures = {claim: (count, 0.0) for claim, (count, _) in self._failures.items()}
                return
        await asyncio.sleep(0)

    async def _probe_answered(self) -> bool:
        """One probe: True when Stripe answered it (a success, or any refusal but 429: a restricted key without the
        permission to read meters gets a 403, and Stripe is up), False when it failed as Stripe fails while down (5xx,
        429, no answer, a timeout)."""
        assert self._probe is not None and self._probe_pool is not None
        try:
            await asyncio.get_running_loop().run_in_executor(self._probe_pool, self._probe)
            answered = True
        except Exception as error:  # noqa: BLE001 - every failure is classified
            status = getattr(error, "http_status", None)
            answered = _is_stripe_error(error) and status is not None and status < 500 and status != 429
            if not answered:
                reason = classify(error).reason
                self.status.last_error, self.status.last_error_ms = f"probe: {reason}", self._clock_ms()
        if self._metrics is not None:
            self._metrics.settle_probe("answered" if answered else "failed")
        if answered:
            log.info("settlement: Stripe answered a probe; resuming at once")
        return answered

    async def run_once(self) -> RoundResult:
        """One round (see the module docstring)."""
        async with self._round_lock:  # never beside claim_for_backup: an entry keeps its first claim
            return await self._run_once()

    async def claim_for_backup(self) -> int:
        """Between rounds, claim each unclaimed entry under its own event (see claim_each); returns the count."""
        async with self._round_lock:
            count, ticket = claim_each(self._engine, self.options.event_names, self._clock_ms())
            await self._wait_durable(ticket)
            return count

    async def _run_once(self) -> RoundResult:
        stats = self._engine.outbox_stats()
        self._monitor.check(stats)
        auto = self._auto_aggregate(stats["depth"], may_stop=self._waited)
        fetch_limit = max(self.options.fetch_limit, AUTO_AGGREGATE_FETCH_ENTRIES) if auto else self.options.fetch_limit
        entries = self._engine.outbox_pending(fetch_limit)
        result = RoundResult(fetched=len(entries))
        if not entries:
            self._failures.clear()
            return result
        now_ms = self._clock_ms()
        names = self.options.event_names
        window_ms = self.options.aggregate_window_ms or (AUTO_AGGREGATE_WINDOW_MS if auto else 0)
        events = claimed_events(entries, names) + fresh_events(entries, window_ms, now_ms, names)
        claims = _by_claim(events)
        self._forget_failures_except(claims)
        if auto:
            claims = _first_claims(claims, self.options.fetch_limit)
        result.waiting = len(entries) - sum(claim[0].size for claim in claims.values())
        if window_ms and result.waiting:
            # Entries of a window still open: the next round when the first one closes, not an idle interval later.
            opens = [(e["ts_ms"] // window_ms + 1) * window_ms for e in entries if e["sent_as"] is None]
            closes_in_ms = min(opens, default=now_ms) - now_ms
            if closes_in_ms > 0:
                result.retry_in_s = closes_in_ms / 1000

        dead: list[tuple[Claim, str]] = []
        zero: list[Claim] = []
        ready: list[MeterEvent] = []
        loop_now = asyncio.get_running_loop().time()
        for claim_id, claim in claims.items():
            reason = next((r for e in claim if (r := self._local_problem(e, now_ms)) is not None), None)
            if reason is not None:
                dead.append((claim, reason))  # before any of its events is sent
            elif all(e.value == 0 for e in claim):
                zero.append(claim)  # nothing to bill: acknowledged without a call
            elif self._failures.get(claim_id, (0, 0.0))[1] > loop_now:
                result.waiting += claim[0].size
                wait_s = self._failures[claim_id][1] - loop_now
                result.retry_in_s = wait_s if result.retry_in_s is None else min(result.retry_in_s, wait_s)
            else:
                ready += [e for e in claim if e.value > 0]

        checked, checked_dead, checked_failed = await self._run_preflight(ready)
        outcomes: dict[str, list[tuple[MeterEvent, Classified | None]]] = {}
        failure: Classified | None
        for event, failure in [(e, Classified(Verdict.PERMANENT, r)) for e, r in checked_dead] + checked_failed:
            outcomes.setdefault(event.claim_id, []).append((event, failure))
        ready = [e for e in checked if e.claim_id not in outcomes]  # a claim goes out whole or not at all
        not_sent: list[MeterEvent] = []
        if ready:
            await self._claim(ready)
            sent, not_sent = await self._send_all(ready)
            for event, failure in sent:
                outcomes.setdefault(event.claim_id, []).append((event, failure))

        delivered: list[Claim] = []
        retry: list[tuple[Claim, Classified]] = []
        unsent = {e.claim_id for e in not_sent}
        for claim_id, results in outcomes.items():
            claim = claims[claim_id]
            refused = [(e, c) for e, c in results if c is not None and c.verdict is Verdict.PERMANENT]
            failures = [c for _, c in results if c is not None and c.verdict is not Verdict.DELIVERED]
            if refused:
                dead.append((claim, _refusal_reason(claim, refused[0], results)))
            elif failures:
                retry.append((claim, failures[0]))
            elif claim_id not in unsent:
                delivered.append(claim)
        await self._settle(delivered + zero, dead, {e["seq"]: e for e in entries})
        self._unanswered.clear()

        result.delivered = sum(len(c) for c in delivered)
        result.skipped, result.dead = sum(len(c) for c in zero), sum(len(c) for c, _ in dead)
        result.failed = sum(len(c) for c, _ in retry) + len(not_sent)
        self._record(result, delivered, dead, retry, {e["seq"]: e["ts_ms"] for e in entries})
        return result

    def _auto_aggregate(self, depth: int, *, may_stop: bool) -> bool:
        """settle_auto_aggregate: on at AUTO_AGGREGATE_ON_ROUNDS rounds' worth of entries waiting, off again at
        AUTO_AGGREGATE_OFF_ROUNDS (the gap keeps a depth near one bound from switching every round). It stops only in a
        round the loop waited for (may_stop): aggregating, that is the round when a window closes, whose depth is about
        a second of commits; the round right after one that sent the closed windows finds little but the open one,
        at any commit rate."""
        if not self.options.auto_aggregate or self.options.aggregate_window_ms > 0:
            return False
        on_at, off_at = (
            round(n * self.options.fetch_limit) for n in (AUTO_AGGREGATE_ON_ROUNDS, AUTO_AGGREGATE_OFF_ROUNDS)
        )
        if not self.auto_aggregating and depth >= on_at:
            self.auto_aggregating = True
            log.warning(
                "settlement: %d entries wait in the outbox: sending one event per Stripe customer (and model) "
                "per %d ms until fewer than %d wait (settle_auto_aggregate)",
                depth,
                AUTO_AGGREGATE_WINDOW_MS,
                off_at,
            )
        elif self.auto_aggregating and depth <= off_at and may_stop:
            self.auto_aggregating = False
            log.warning("settlement: %d entries wait in the outbox: one event per commit again", depth)
        return self.auto_aggregating

    # -- the steps ------------------------------------------------------------------------------------------------

    def _local_problem(self, event: MeterEvent, now_ms: int) -> str | None:
        return (
            rules.token_meter_off(event.event_name, event.claim_id, token_event=bool(event.dimensions))
            or rules.restored_unsure(
                event.restored, event.claimed, event.ts_ms, now_ms, aggregating=self.options.aggregating
            )
            or rules.resend_too_late(event.first_attempt_ms, now_ms)
            or rules.customer_missing(event.stripe_customer_id, event.customer_ids)
            or rules.timestamp_out_of_window(event.ts_ms, now_ms)
            or rules.value_refused(event.value)
        )

    async def _run_preflight(
        self, events: list[MeterEvent]
    ) -> tuple[list[MeterEvent], list[tuple[MeterEvent, str]], list[tuple[MeterEvent, Classified]]]:
        """(events that may go, events to dead-letter with the reason, events whose check failed for now)."""
        preflight = self._preflight
        if preflight is None or not events:
            return events, [], []
        meters = sorted({e.event_name for e in events if not preflight.meter_known(e.event_name)})
        meter_answers = [a[:2] for a in await asyncio.gather(*(self._call(preflight.meter_problem, n) for n in meters))]
        by_meter = dict(zip(meters, meter_answers, strict=True))
        ok, dead, failed = [], [], []
        for event in events:
            problem, failure = by_meter.get(event.event_name, (None, None))
            if failure is not None:
                failed.append((event, failure))
            elif problem is not None:
                dead.append((event, problem))
            else:
                ok.append(event)
        if not ok:
            return ok, dead, failed
        events = ok
        customers = sorted({e.stripe_customer_id for e in events if not preflight.customer_known(e.stripe_customer_id)})
        answers = [a[:2] for a in await asyncio.gather(*(self._call(preflight.customer_problem, c) for c in customers))]
        by_customer = dict(zip(customers, answers, strict=True))
        ok = []
        for event in events:
            problem, failure = by_customer.get(event.stripe_customer_id, (None, None))
            if failure is not None and failure.verdict is Verdict.PERMANENT:
                dead.append(
                    (event, f"Stripe refused to look up customer {event.stripe_customer_id!r}: {failure.reason}")
                )
            elif failure is not None:
                failed.append((event, failure))
            elif problem is not None:
                dead.append((event, problem))
            else:
                ok.append(event)
        return ok, dead, failed

    async def _claim(self, events: list[MeterEvent]) -> None:
        """Fix each claim on its entries (once for all the events that share it); wait until the first claims are
        durable before any send."""
        first_claims = 0
        for event in {e.claim_id: e for e in events}.values():
            ticket = self._engine.outbox_claim(list(event.seqs), event.claim_id)  # a resend: counts the attempt
            if not event.claimed:
                first_claims = max(first_claims, ticket)
        await self._wait_durable(first_claims)

    async def _send_all(
        self, events: list[MeterEvent]
    ) -> tuple[list[tuple[MeterEvent, Classified | None]], list[MeterEvent]]:
        """(each sent event with its failure or None, events not sent because the probe failed)."""
        per_call = self._transport.max_events_per_call
        calls = [events[i : i + per_call] for i in range(0, len(events), per_call)]
        outcomes: list[tuple[MeterEvent, Classified | None]] = []
        if self._stalls > 0:
            # Stripe failed last round: one probe call first, the rest only if it goes through.
            probe = await self._deliver(calls[0])
            outcomes += probe
            if any(c is not None and c.verdict not in (Verdict.DELIVERED, Verdict.PERMANENT) for _, c in probe):
                return outcomes, [e for call in calls[1:] for e in call]
            calls = calls[1:]
        for group in await asyncio.gather(*(self._deliver(call) for call in calls)):
            outcomes += group
        return outcomes, []

    async def _deliver(self, events: Sequence[MeterEvent]) -> list[tuple[MeterEvent, Classified | None]]:
        """Send one call's events, with retries; on a refusal of several events, bisect to find the refused one."""
        _, failure, attempts = await self._call(self._transport.send, events)
        if attempts > 1 and failure is not None:
            for event in events:  # an earlier attempt went unanswered: Stripe may have recorded it
                self._unanswered.add(event.claim_id)
        if failure is not None and failure.verdict is Verdict.DELIVERED:
            failure = self._duplicate(events, failure, attempts)
        if failure is None or failure.verdict is Verdict.DELIVERED:
            return [(e, None) for e in events]
        if failure.verdict is Verdict.PERMANENT and len(events) > 1:
            middle = len(events) // 2
            halves = await asyncio.gather(self._deliver(events[:middle]), self._deliver(events[middle:]))
            return halves[0] + halves[1]
        return [(e, failure) for e in events]

    def _duplicate(self, events: Sequence[MeterEvent], failure: Classified, attempts: int) -> Classified:
        """Stripe says it has these events already. That is a delivery only for events this sidecar may have sent
        before (an earlier round, an earlier attempt of this call, or the data dir a backup came from). On a first send
        it means another sender used the same identifier (a copied data dir shares its instance id): not delivered."""
        ours = attempts > 1 or all(e.claimed or e.restored for e in events)
        ids = ", ".join(e.identifier for e in events[:3]) + (" ..." if len(events) > 3 else "")
        if self._metrics is not None:
            self._metrics.settle_duplicate("delivered" if ours else "refused", len(events))
        if ours:
            log.warning(
                "Stripe already has %s (sent before and not acknowledged then): counted as delivered: %s",
                ids,
                failure.reason,
            )
            return failure
        log.error(
            "Stripe already has %s, which this sidecar never sent before: another sender uses its "
            "identifiers; not counted as delivered: %s",
            ids,
            failure.reason,
        )
        for event in events:
            self._unanswered.add(event.claim_id)
        return Classified(
            Verdict.PERMANENT,
            (
                f"Stripe already has an event with identifier {events[0].identifier}, which this sidecar (instance "
                f"{self._engine.instance_id}) was sending for the first time: another sidecar makes the same "
                "identifiers (a data dir copied instead of restored keeps its instance id). Run `spendgate reconcile`; "
                "requeue only if it shows this usage missing"
            ),
        )

    async def _call(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, Classified | None, int]:
        """fn(*args) in the thread pool, retried on RETRY (and on SESSION_EXPIRED) up to settle_max_attempts, except
        after a timeout (the next round resends). Returns (result, failure, attempts made)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._watched(fn, *args), None, attempt
            except Exception as error:  # noqa: BLE001 - every failure is classified; CancelledError passes
                failure = classify(error)
                timed_out = is_timeout(error)
                if failure.verdict is not Verdict.DELIVERED:
                    if self._metrics is not None:
                        self._metrics.stripe_error(error_code(error))
                    if failure.verdict is not Verdict.PERMANENT:
                        self._failed_attempt(failure.reason, timed_out=timed_out)
                if failure.verdict is Verdict.RETRY_LATER and not _is_stripe_error(error):
                    log.error("unexpected error while talking to Stripe", exc_info=error)
                retriable = failure.verdict in (Verdict.RETRY, Verdict.SESSION_EXPIRED) and not timed_out
                if not retriable or attempt >= self.options.max_attempts:
                    return None, failure, attempt
                await asyncio.sleep(self._backoff_s(attempt))

    async def _watched(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the thread pool; a watchdog declares settlement failing if the call runs OVERDUE_GRACE_MS
        past settle_request_timeout_ms (counted from when a thread took it, not from when it was queued)."""
        loop = asyncio.get_running_loop()
        started: list[float] = []

        def timed() -> Any:
            started.append(loop.time())
            return fn(*args)

        future = loop.run_in_executor(self._pool, timed)
        handle: list[asyncio.TimerHandle] = []

        def watch() -> None:
            if future.done():
                return
            if started and loop.time() - started[0] >= self._overdue_s:
                if self._metrics is not None:
                    self._metrics.stripe_error(TIMEOUT_CODE)
                self._failed_attempt(
                    f"a Stripe request has been running for {loop.time() - started[0]:.1f} s, past "
                    f"settle_request_timeout_ms ({self.options.request_timeout_ms} ms)",
                    timed_out=True,
                )
                return
            due = started[0] + self._overdue_s - loop.time() if started else self._overdue_s
            handle[:] = [loop.call_later(max(due, 0.001), watch)]

        handle.append(loop.call_later(self._overdue_s, watch))
        try:
            return await future
        finally:
            handle[0].cancel()

    def _failed_attempt(self, reason: str, *, timed_out: bool) -> None:
        """A call failed (for now): the status shows it at once; a timeout also declares settlement failing."""
        status = self.status
        status.last_error, status.last_error_ms = reason, self._clock_ms()
        if timed_out:
            self._declare_failing("a request to Stripe timed out")

    def _declare_failing(self, why: str, waiting: int | None = None) -> None:
        status = self.status
        if status.failing_since_ms:
            return
        status.failing_since_ms = self._clock_ms()
        try:
            depth = waiting if waiting is not None else self._engine.outbox_stats()["depth"]
        except _core.EngineError:
            depth = 0
        log.warning(
            "settlement to Stripe is failing (%s): %s; %d+ entries wait in the outbox (nothing is lost); retrying "
            "with backoff up to %d ms%s",
            why,
            status.last_error,
            depth,
            self.options.backoff_max_ms,
            f", probing every {PROBE_INTERVAL_MS} ms" if self._probe is not None else "",
        )

    async def _settle(
        self, delivered: list[Claim], dead: list[tuple[Claim, str]], entries: dict[int, _core.OutboxEntry]
    ) -> None:
        tickets = [0]
        seqs = [seq for claim in delivered for seq in claim[0].seqs]
        for i in range(0, len(seqs), MAX_ENGINE_BATCH):
            tickets.append(self._engine.outbox_ack(seqs[i : i + MAX_ENGINE_BATCH]))
        letters: dict[str, list[tuple[int, str]]] = {}  # customer -> (seq, reason) dead-lettered this round
        for claim, reason in dead:
            event = claim[0]
            if event.claimed and "spendgate reconcile" not in reason:
                # A resend refused now may have been recorded the first time (say, before the meter was archived): a
                # requeue, under a fresh identifier, would then count it twice.
                reason += (
                    f". It was sent before ({event.claim_id}), so Stripe may have it already: check `spendgate "
                    "reconcile` before requeueing"
                )
            reason = truncate_reason(reason)
            log.warning(
                "dead letter: %d outbox entr%s (seq %s, claim %s, customer %s, stripe customer %s, value %s): %s",
                event.size,
                "y" if event.size == 1 else "ies",
                _seqs_text(event.seqs),
                event.claim_id,
                ",".join(event.customer_ids),
                event.stripe_customer_id or "-",
                "+".join(str(e.value) for e in claim),
                reason,
            )
            fate_unknown = event.claimed or event.restored or event.claim_id in self._unanswered
            tickets.append(self._engine.outbox_dead_letter(list(event.seqs), reason, fate_unknown=fate_unknown))
            for seq in event.seqs:
                letters.setdefault(entries[seq]["customer_id"], []).append((seq, reason))
        tickets += self._alert_dead_letters(letters, entries)
        # Waiting here keeps the next round from reading (and resending) entries whose ack is still being written.
        await self._wait_durable(max(tickets))

    def _alert_dead_letters(
        self, letters: dict[str, list[tuple[int, str]]], entries: dict[int, _core.OutboxEntry]
    ) -> list[int]:
        """One `settlement_dead_letter` alert per dead-lettered entry ({seq, amount}), or, past
        MAX_DEAD_LETTER_ALERTS_PER_CUSTOMER entries of one customer in this round, one alert with their count."""
        tickets = []
        for customer_id, dead in letters.items():
            if len(dead) <= MAX_DEAD_LETTER_ALERTS_PER_CUSTOMER:
                for seq, reason in dead:
                    tickets.append(
                        self._engine.raise_alert(
                            DEAD_LETTER_ALERT, customer_id, reason, {"seq": seq, "amount": entries[seq]["amount"]}
                        )
                    )
                continue
            seqs = [seq for seq, _ in dead]
            amount = sum(entries[seq]["amount"] for seq in seqs)
            message = truncate_reason(
                f"{len(seqs)} outbox entries ({amount} units, seq {seqs[0]}..{seqs[-1]}) went to the dead letters; the "
                f"first one's reason: {dead[0][1]}"
            )
            values = {"count": len(seqs), "amount": amount, "first_seq": seqs[0], "last_seq": seqs[-1]}
            tickets.append(self._engine.raise_alert(DEAD_LETTER_ALERT, customer_id, message, values))
        return tickets

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def _record(
        self,
        result: RoundResult,
        delivered: list[Claim],
        dead: list[tuple[Claim, str]],
        retry: list[tuple[Claim, Classified]],
        ts_ms_of: dict[int, int],
    ) -> None:
        status, now_ms = self.status, self._clock_ms()
        loop_now = asyncio.get_running_loop().time()
        for claim in delivered:
            self._failures.pop(claim[0].claim_id, None)
        for claim, _ in dead:
            self._failures.pop(claim[0].claim_id, None)
        for claim, _ in retry:
            count = self._failures.get(claim[0].claim_id, (0, 0.0))[0] + 1
            self._failures[claim[0].claim_id] = (count, loop_now + self._backoff_s(count))
        if delivered:
            status.last_success_ms = now_ms
            for claim in delivered if self._metrics is not None else ():
                for seq in claim[0].seqs:  # each usage's own lag (an aggregate's timestamp is its newest member's)
                    self._metrics.settlement_lag.observe(  # type: ignore[union-attr]
                        max(0, now_ms - ts_ms_of.get(seq, claim[0].ts_ms)) / 1000
                    )
            status.delivered_events += sum(len(claim) for claim in delivered)
            status.delivered_entries += sum(claim[0].size for claim in delivered)
        status.dead_lettered_entries += sum(claim[0].size for claim, _ in dead)
        if retry:
            status.last_error, status.last_error_ms = retry[0][1].reason, now_ms
        if result.failed and not result.delivered:
            self._declare_failing("no event delivered in a round", result.fetched)
            self._stalls += 1
            if self._probe_answered_last:
                self._probe_misleads += 1
        elif result.delivered:  # Stripe took events (acknowledging zero-value ones alone asks nothing of Stripe)
            if status.failing_since_ms:
                log.warning(
                    "settlement to Stripe recovered after %d failed rounds (%.1f s)",
                    self._stalls,
                    (now_ms - status.failing_since_ms) / 1000,
                )
                status.failing_since_ms = 0
            self._stalls = 0
            self._probe_misleads = 0
        log.debug("settle round: %s", result)

    def _forget_failures_except(self, claims: dict[str, Claim]) -> None:
        """Drop the failure memory of claims no longer in the outbox's head (the memory stays as small as a round)."""
        for claim_id in [i for i in self._failures if i not in claims]:
            del self._failures[claim_id]

    def _backoff_s(self, attempt: int) -> float:
        """Exponential backoff with full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
        ceiling = min(self.options.backoff_max_ms, self.options.backoff_base_ms * 2 ** min(max(attempt - 1, 0), 30))
        return self._rng.uniform(0, ceiling) / 1000

    def close(self) -> None:
        """Stop the worker threads without waiting for a call in flight (abandoning it is safe: see pool.py)."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self._probe_pool is not None:
                self._probe_pool.shutdown(wait=False, cancel_futures=True)
            self._transport.close()


def claim_each(engine: _core.Engine, names: EventNames, now_ms: int) -> tuple[int, int]:
    """Claim each unclaimed entry of the outbox's head (at most MAX_ENGINE_BATCH) under the events it would have
    alone (its own identifier; a token entry's -tokens claim), before a backup: the backup then holds no entry the
    data dir could later send in an aggregate the backup does not know, so a restored copy resends each exactly as it
    may have gone (rules.restored_unsure). Returns (entries claimed, ticket)."""
    unclaimed = [e for e in engine.outbox_pending(MAX_ENGINE_BATCH) if e["sent_as"] is None]
    ticket = 0
    for claim in _by_claim(fresh_events(unclaimed, 0, now_ms, names)).values():
        ticket = max(ticket, engine.outbox_claim(list(claim[0].seqs), claim[0].claim_id))
    return len(unclaimed), ticket


def _is_stripe_error(error: BaseException) -> bool:
    import stripe  # noqa: PLC0415

    return isinstance(error, stripe.StripeError)


# The events that settle the same entries (one claim), in the order they go out.
Claim = list[MeterEvent]


def _by_claim(events: Sequence[MeterEvent]) -> dict[str, Claim]:
    claims: dict[str, Claim] = {}
    for event in events:
        claims.setdefault(event.claim_id, []).append(event)
    return claims


def _first_claims(claims: dict[str, Claim], max_events: int) -> dict[str, Claim]:
    """The first claims (resends first, then the oldest) up to max_events events (at least one claim)."""
    kept: dict[str, Claim] = {}
    events = 0
    for claim_id, claim in claims.items():
        if kept and events + len(claim) > max_events:
            break
        kept[claim_id] = claim
        events += len(claim)
    return kept


def _refusal_reason(
    claim: Claim, refused: tuple[MeterEvent, Classified], results: Sequence[tuple[MeterEvent, Classified | None]]
) -> str:
    """Why a claim goes to the dead letters; for a claim of several events, which of them Stripe has already."""
    event, failure = refused
    if len(claim) == 1:
        return failure.reason
    accepted = [e.identifier for e, c in results if c is None or c.verdict is Verdict.DELIVERED]
    note = (
        f"; of this claim's events Stripe accepted {', '.join(accepted)}, so a requeue (which resends them all "
        "under fresh identifiers) would count those twice: check `spendgate reconcile` first"
        if accepted
        else ""
    )
    return f"event {event.identifier}: {failure.reason}{note}"


def _seqs_text(seqs: Sequence[int]) -> str:
    if len(seqs) <= 5:
        return ",".join(map(str, seqs))
    return f"{seqs[0]},{seqs[1]},...,{seqs[-1]} ({len(seqs)})"

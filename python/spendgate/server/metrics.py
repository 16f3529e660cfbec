"""Prometheus metrics of one sidecar, on its own registry (not prometheus_client's global one, so that several sidecars
in one process, as in tests, never share or collide).

    metrics = Metrics()
    metrics.watch(engine, settlement)              # engine and outbox gauges, read at scrape time
    body, content_type = metrics.render()          # what GET /metrics returns

Recorded per call by the gRPC interceptor (spendgate.server.interceptors), from the reply, never in the servicers:
- spendgate_rpc_duration_seconds{method,decision}   histogram of every unary call (Reserve, Commit, Release, ...)
- spendgate_decisions_total{method,decision,reason} Reserve: granted/denied by reason (insufficient_budget,
                                                     too_many_holds, frozen); Commit: committed by within_hold,
                                                     over_reserved, hold_expired, replayed; Release: released or
                                                     expired; any call that failed: error by status code
Read from the engine when scraped (EngineCollector):
- spendgate_budgets, spendgate_active_holds, spendgate_expired_holds_total (reclaimed by the TTL reaper),
  spendgate_write_queue_depth, spendgate_write_batches_total, spendgate_write_ops_total,
  spendgate_breaker_trips_total (budgets the circuit breaker froze), spendgate_periods_rolled_total,
  spendgate_clock_steps_total (wall-clock steps past max_clock_step_ms), spendgate_clock_step_pending_seconds
- spendgate_outbox_depth, spendgate_outbox_max_entries, spendgate_outbox_oldest_age_seconds, spendgate_dead_letters
- spendgate_lmdb_map_size_bytes, spendgate_lmdb_map_used_bytes, spendgate_lmdb_map_used_ratio,
  spendgate_lmdb_map_high_water_bytes, spendgate_lmdb_map_capacity_bytes, spendgate_lmdb_file_bytes
- spendgate_settlement_enabled, spendgate_settlement_last_success_timestamp_seconds, spendgate_settlement_failing,
  spendgate_settlement_auto_aggregating
- spendgate_engine_up (0 once the engine failed or closed: the other engine gauges are then absent)

The API for events other code owns (call these; they are plain prometheus_client metrics):
- `metrics.stripe_errors.labels(code=...).inc()`      a failed Stripe call, by Stripe's error code, else the HTTP
                                                       status ("http_503"), else "timeout" (no answer within
                                                       settle_request_timeout_ms, or a call found running past it) or
                                                       "connection" (the settler calls it)
- `metrics.settle_probes.labels(outcome=...).inc()`    a probe while settlement fails: answered or failed (the settler)
- `metrics.settlement_lag.observe(seconds)`            commit-to-Stripe-acceptance time of a delivered usage (the
                                                       settler calls it)
- `metrics.alerts.labels(kind=...).inc()`              an alert raised (outbox filling, budget threshold, ...)
- `metrics.reconcile_runs.labels(outcome=...).inc()`, `metrics.reconcile_divergent.set(n)`,
  `metrics.reconcile_last_success.set(unix_s)`           the scheduled reconcile (spendgate.settle.scheduled)
- `metrics.proxy_calls.labels(api=..., outcome=...).inc()` a call through the HTTP proxy (spendgate.proxy calls it
                                                       through the `observe` hook the app gives it)
The settler reaches these through `SettleMetrics` (spendgate.settle.settler), which this class satisfies.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from spendgate import _core
from spendgate.v1 import spendgate_pb2 as pb

if TYPE_CHECKING:
    from spendgate.settle import SettlementService

# Reserve and Commit take tens of microseconds in the engine plus an fsync (about 0.3 ms) and the gRPC stack.
RPC_BUCKETS_S: Final[tuple[float, ...]] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
# Settlement: seconds (one settle interval) to days (Stripe down, or settlement off).
LAG_BUCKETS_S: Final[tuple[float, ...]] = (0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86_400, 7 * 86_400)
DENY_REASON_PREFIX: Final[str] = "DENY_REASON_"


class Metrics:
    """Every metric of one sidecar and the registry that holds them (see the module doc for the list)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.rpc_duration = Histogram(
            "spendgate_rpc_duration_seconds",
            "Time to answer a unary gRPC call, by method and decision.",
            ["method", "decision"],
            buckets=RPC_BUCKETS_S,
            registry=registry,
        )
        self.decisions = Counter(
            "spendgate_decisions",
            "Answers by method, decision and reason (see spendgate.server.metrics).",
            ["method", "decision", "reason"],
            registry=registry,
        )
        self.proxy_calls = Counter(
            "spendgate_proxy_calls",
            "Calls through the HTTP proxy, by API (chat, responses, messages) and outcome "
            "(committed_exact, committed_whole_hold, released, denied, refused).",
            ["api", "outcome"],
            registry=registry,
        )
        self.stripe_errors = Counter(
            "spendgate_stripe_errors",
            "Failed Stripe calls, by Stripe error code (or http_<status>, connection).",
            ["code"],
            registry=registry,
        )
        self.settle_duplicates = Counter(
            "spendgate_settle_duplicates",
            "Meter events Stripe answered as already recorded, by what the settler "
            "made of it: delivered (sent before by this sidecar) or refused (never sent by it: a copied data dir).",
            ["outcome"],
            registry=registry,
        )
        self.settle_probes = Counter(
            "spendgate_settle_probes",
            "Probes the settler sent to Stripe while settlement was failing, by outcome: "
            "answered (settlement resumes at once) or failed.",
            ["outcome"],
            registry=registry,
        )
        self.settlement_lag = Histogram(
            "spendgate_settlement_lag_seconds",
            "From a usage's commit to Stripe accepting it.",
            buckets=LAG_BUCKETS_S,
            registry=registry,
        )
        self.alerts = Counter("spendgate_alerts", "Alerts raised, by kind.", ["kind"], registry=registry)
        # The scheduled reconcile (spendgate.settle.scheduled); no per-customer labels: the alerts name them.
        self.reconcile_runs = Counter(
            "spendgate_reconcile_runs",
            "Scheduled reconciliations with Stripe, by outcome (ok, error).",
            ["outcome"],
            registry=registry,
        )
        self.reconcile_divergent = Gauge(
            "spendgate_reconcile_divergent_customers",
            "Stripe customers whose last scheduled reconciliation diverged past reconcile_tolerance_percent.",
            registry=registry,
        )
        self.reconcile_last_success = Gauge(
            "spendgate_reconcile_last_success_timestamp_seconds",
            "Unix time of the last scheduled reconciliation that ran to the end (0: none since start).",
            registry=registry,
        )
        self._collector: EngineCollector | None = None
        # Bounded: methods x decisions x reasons, each a small fixed set.
        self._call_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def watch(self, engine: _core.Engine, data_dir: str, settlement: SettlementService | None = None) -> None:
        """Report this engine's (and settlement's) gauges at every scrape. Once per Metrics."""
        assert self._collector is None, "watch() runs once"
        self._collector = EngineCollector(engine, data_dir, settlement)
        self.registry.register(self._collector)

    def unwatch(self) -> None:
        """Stop reading the engine (before it closes). Idempotent."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None

    def observe_call(self, method: str, decision: str, reason: str, duration_s: float) -> None:
        # The labelled children are looked up once per label set (labels() takes a lock and builds a key per call).
        key = (method, decision, reason)
        children = self._call_children.get(key)
        if children is None:
            children = self._call_children[key] = (
                self.rpc_duration.labels(method=method, decision=decision),
                self.decisions.labels(method=method, decision=decision, reason=reason),
            )
        children[0].observe(duration_s)
        children[1].inc()

    def stripe_error(self, code: str) -> None:
        self.stripe_errors.labels(code=code).inc()

    def settle_duplicate(self, outcome: str, n: int = 1) -> None:
        self.settle_duplicates.labels(outcome=outcome).inc(n)

    def settle_probe(self, outcome: str) -> None:
        self.settle_probes.labels(outcome=outcome).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def decision_of(method: str, reply: Any) -> tuple[str, str]:
    """(decision, reason) of a successful call's reply; ("ok", "none") for methods without decisions."""
    if method == "Reserve":
        if reply.granted:
            return "granted", "replayed" if reply.replayed else "new"
        return "denied", pb.DenyReason.Name(reply.reason).removeprefix(DENY_REASON_PREFIX).lower()
    if method == "Commit":
        reason = (
            "replayed"
            if reply.replayed
            else "hold_expired"
            if reply.hold_expired
            else "over_reserved"
            if reply.over_reserved
            else "within_hold"
        )
        return "committed", reason
    if method == "Release":
        return ("released" if reply.released else "expired"), "replayed" if reply.replayed else "new"
    return "ok", "none"


class EngineCollector(Collector):
    """Gauges read from the engine at scrape time: nothing polls, and a scrape sees the numbers of that moment."""

    def __init__(self, engine: _core.Engine, data_dir: str, settlement: SettlementService | None) -> None:
        self._engine = engine
        self._data_file = Path(data_dir) / "data.mdb"
        self._settlement = settlement

    def describe(self) -> list[Metric]:
        return []  # the families depend on the engine's state: not described up front

    def collect(self) -> Iterator[Metric]:
        try:
            stats, outbox = self._engine.stats(), self._engine.outbox_stats()
        except _core.EngineError:
            yield GaugeMetricFamily("spendgate_engine_up", "1 while the engine serves.", value=0)
            return
        yield GaugeMetricFamily("spendgate_engine_up", "1 while the engine serves.", value=1)
        yield from _engine_families(stats)
        yield from _outbox_families(outbox)
        yield from _lmdb_families(stats, self._data_file)
        if self._settlement is not None:
            yield from _settlement_families(self._settlement)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _engine_families(stats: dict[str, int]) -> Iterator[Metric]:
    yield _gauge("spendgate_budgets", "Budgets held.", stats["budgets"])
    yield _gauge("spendgate_active_holds", "Holds not yet committed, released or expired.", stats["active_holds"])
    yield CounterMetricFamily(
        "spendgate_expired_holds", "Holds the TTL reaper expired (their units reclaimed).", value=stats["expired_total"]
    )
    yield _gauge("spendgate_write_queue_depth", "Changes waiting for the LMDB writer.", stats["queue_depth"])
    yield CounterMetricFamily("spendgate_write_batches", "LMDB write transactions.", value=stats["batches_total"])
    yield CounterMetricFamily("spendgate_write_ops", "Changes written to LMDB.", value=stats["ops_total"])
    yield CounterMetricFamily(
        "spendgate_breaker_trips",
        "Budgets the circuit breaker froze (since the start).",
        value=stats["breaker_trips_total"],
    )
    yield CounterMetricFamily(
        "spendgate_periods_rolled", "Budget periods rolled over (since the start).", value=stats["periods_rolled_total"]
    )
    yield CounterMetricFamily(
        "spendgate_clock_steps",
        "Wall-clock steps against the monotonic clock larger than max_clock_step_ms (since the start).",
        value=stats["clock_steps_total"],
    )
    yield _gauge(
        "spendgate_clock_step_pending_seconds",
        "The wall-clock step that periods and the breaker do not "
        "follow yet (wall minus trusted time); 0 while the clocks agree.",
        stats["clock_step_pending_ms"] / 1000,
    )


def _outbox_families(outbox: _core.OutboxStats) -> Iterator[Metric]:
    yield _gauge("spendgate_outbox_depth", "Committed usages not yet accepted by Stripe.", outbox["depth"])
    yield _gauge("spendgate_outbox_max_entries", "The outbox's bound (max_outbox_entries).", outbox["max_entries"])
    oldest = outbox["oldest_ts_ms"]
    age_s = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
    yield _gauge("spendgate_outbox_oldest_age_seconds", "Age of the oldest outbox entry (0 when empty).", age_s)
    yield _gauge("spendgate_dead_letters", "Usages Stripe refused for good.", outbox["dead_letters"])


def _lmdb_families(stats: dict[str, int], data_file: Path) -> Iterator[Metric]:
    size, used, capacity = stats["map_size_bytes"], stats["map_used_bytes"], stats["map_capacity_bytes"]
    yield _gauge("spendgate_lmdb_map_size_bytes", "The LMDB map size now (it grows from map_size_mb).", size)
    yield _gauge("spendgate_lmdb_map_used_bytes", "Bytes of LMDB pages holding data (free pages not counted).", used)
    yield _gauge(
        "spendgate_lmdb_map_used_ratio",
        "Data over what the map may grow to (map_max_mb, or the disk).",
        used / capacity if capacity else 0.0,
    )
    yield _gauge(
        "spendgate_lmdb_map_high_water_bytes",
        "Bytes up to LMDB's highest page ever used.",
        stats["map_high_water_bytes"],
    )
    yield _gauge(
        "spendgate_lmdb_map_capacity_bytes",
        "The most the map may grow to now (map_max_mb, or the disk's free space past disk_reserve_mb).",
        capacity,
    )
    try:
        file_bytes = os.stat(data_file).st_size
    except OSError:
        return
    yield _gauge("spendgate_lmdb_file_bytes", "Size of data.mdb on disk.", file_bytes)


def _settlement_families(settlement: SettlementService) -> Iterator[Metric]:
    status = settlement.status
    yield _gauge(
        "spendgate_settlement_enabled", "1 when usage is sent to Stripe (STRIPE_API_KEY set).", int(status.enabled)
    )
    yield _gauge(
        "spendgate_settlement_last_success_timestamp_seconds",
        "Unix time of the last event Stripe accepted (0: none since start).",
        status.last_success_ms / 1000,
    )
    yield _gauge(
        "spendgate_settlement_failing", "1 while settlement fails without progress.", int(status.failing_since_ms > 0)
    )
    settler = settlement.settler
    yield _gauge(
        "spendgate_settlement_auto_aggregating",
        "1 while a backlog is sent as one event per Stripe customer per second (settle_auto_aggregate).",
        int(settler is not None and settler.auto_aggregating),
    )

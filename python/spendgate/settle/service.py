"""Settlement as a process runs it (`spendgate serve` in the background, `spendgate settle` in the foreground).

With STRIPE_API_KEY set, it runs the settler. Without it, settlement is off: it says so at start, and the outbox alarm
still watches the outbox grow (nothing is lost: every committed usage waits there until a settler runs with a key).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from spendgate import _core
from spendgate.settle.monitor import OutboxMonitor
from spendgate.settle.settler import (
    PROBE_TIMEOUT_MS,
    SettlementStatus,
    SettleMetrics,
    SettleOptions,
    Settler,
    Transport,
    claim_each,
    wall_ms,
)

log = logging.getLogger("spendgate.settle")

# How often the outbox alarm looks when settlement is off.
MONITOR_INTERVAL_S: Final[float] = 5.0


class SettlementConfigError(ValueError):
    """A settle_* setting or STRIPE_API_KEY cannot work; the message names it."""


class SettlementService:
    def __init__(
        self,
        engine: _core.Engine,
        settings: Any,
        wait_durable: Callable[[int], Awaitable[None]],
        *,
        transport: Transport | None = None,
        clock_ms: Callable[[], int] = wall_ms,
        metrics: SettleMetrics | None = None,
    ) -> None:
        """settings: spendgate.config.Settings. transport: for tests (default: from the settings). metrics: where
        Stripe errors and settlement lag are counted (the sidecar's spendgate.server.metrics.Metrics)."""
        try:
            self.options = SettleOptions.from_settings(settings)
        except ValueError as error:
            raise SettlementConfigError(f"setting {error}") from None
        self._engine = engine
        self._wait_durable = wait_durable
        api_key: str = settings.stripe_api_key
        self._api_base: str = settings.stripe_api_base
        self.enabled = bool(api_key) or transport is not None
        self.status = SettlementStatus(
            self.enabled, self.options.transport, self.options.event_name, self.options.aggregate_window_ms
        )
        self.monitor = OutboxMonitor(settling=self.enabled)
        self._key_kind = ""
        self.settler: Settler | None = None
        if not self.enabled:
            return
        preflight = None
        probe: Callable[[], object] | None = None
        if transport is None:
            from spendgate.settle import stripe_client  # noqa: PLC0415 - imports the SDK
            from spendgate.settle.preflight import Preflight  # noqa: PLC0415

            # The SDK logs every request at INFO: keep that for --log-level debug.
            if logging.getLogger("stripe").level == logging.NOTSET and not log.isEnabledFor(logging.DEBUG):
                logging.getLogger("stripe").setLevel(logging.WARNING)
            problem = stripe_client.api_key_problem(api_key)
            if problem is not None:
                raise SettlementConfigError(f"STRIPE_API_KEY: {problem}")
            self._key_kind = stripe_client.key_kind(api_key)
            client = stripe_client.make_client(
                api_key,
                self._api_base,
                timeout_s=self.options.request_timeout_ms / 1000,
                pool_connections=max(stripe_client.DEFAULT_POOL_CONNECTIONS, self.options.concurrency),
            )
            transport = make_transport(client, self.options)
            preflight = Preflight(client, self.options.event_name, check_meter=not transport.validates_meter)
            probe_timeout_s = min(PROBE_TIMEOUT_MS, self.options.request_timeout_ms) / 1000
            probe = make_probe(stripe_client.make_client(api_key, self._api_base, timeout_s=probe_timeout_s))
        self.settler = Settler(
            engine,
            transport,
            self.options,
            wait_durable=wait_durable,
            preflight=preflight,
            status=self.status,
            monitor=self.monitor,
            clock_ms=clock_ms,
            metrics=metrics,
            probe=probe,
        )

    def log_start(self) -> None:
        stats = self._engine.outbox_stats()
        if not self.enabled:
            log.warning(
                "settlement to Stripe is OFF: STRIPE_API_KEY is not set. Committed usage accumulates in the outbox "
                "(%d entries now; at max_outbox_entries=%d new Reserves are refused) and is sent once a settler runs "
                "with a key: restart with STRIPE_API_KEY set, or run `spendgate settle` while the sidecar is stopped",
                stats["depth"],
                stats["max_entries"],
            )
            return
        options = self.options
        log.info(
            "settlement to Stripe is on: transport %s, event_name %s, token usage %s, %s, %s, aggregation %s, %d "
            "entries in the outbox, %d dead letters",
            options.transport,
            options.event_name,
            f"on event_name {options.token_event_name}" if options.token_event_name else "as units",
            self._key_kind or "a test transport",
            f"STRIPE_API_BASE {self._api_base}" if self._api_base else "Stripe's own base addresses",
            f"per {options.aggregate_window_ms} ms window"
            if options.aggregate_window_ms
            else "per customer per second while a backlog waits (settle_auto_aggregate)"
            if options.auto_aggregate
            else "off",
            stats["depth"],
            stats["dead_letters"],
        )

    async def run(self, *, until_empty: bool = False) -> None:
        if self.settler is not None:
            await self.settler.run(until_empty=until_empty)
            return
        while True:
            try:
                self.monitor.check(self._engine.outbox_stats())
            except _core.EngineError as error:
                log.error("outbox alarm stops: the engine is unavailable: %s", error.message)
                return
            await asyncio.sleep(MONITOR_INTERVAL_S)

    def snapshot(self) -> dict[str, Any]:
        """What GetSettlementStatus reports: the settler's status and the engine's outbox stats."""
        stats = self._engine.outbox_stats()
        oldest = stats["oldest_ts_ms"]
        status = self.status
        return {
            "enabled": status.enabled,
            "transport": status.transport,
            "event_name": status.event_name,
            "aggregate_window_ms": status.aggregate_window_ms,
            "outbox_depth": stats["depth"],
            "max_outbox_entries": stats["max_entries"],
            "oldest_age_ms": max(0, wall_ms() - oldest) if oldest is not None else 0,
            "dead_letters": stats["dead_letters"],
            "last_success_ms": status.last_success_ms,
            "last_error": status.last_error,
            "last_error_ms": status.last_error_ms,
            "delivered_events": status.delivered_events,
            "delivered_entries": status.delivered_entries,
            "dead_lettered_entries": status.dead_lettered_entries,
            "failing_since_ms": status.failing_since_ms,
            "auto_aggregate": self.options.auto_aggregate and not self.options.aggregate_window_ms,
            "auto_aggregating": self.settler is not None and self.settler.auto_aggregating,
        }

    async def prepare_backup(self) -> int:
        """Before Admin.Backup: claim each unclaimed entry under its own event (settler.claim_each), between rounds."""
        if self.settler is not None:
            return await self.settler.claim_for_backup()
        count, ticket = claim_each(self._engine, self.options.event_names, wall_ms())
        await self._wait_durable(ticket)
        return count

    def close(self) -> None:
        if self.settler is not None:
            self.settler.close()


def make_probe(client: Any) -> Callable[[], object]:
    """The settler's probe while Stripe fails: a list of one meter, a read that changes nothing at Stripe."""
    return lambda: client.v1.billing.meters.list({"limit": 1})


def make_transport(client: Any, options: SettleOptions) -> Transport:
    if options.transport == "v2":
        from spendgate.settle.transport_v2 import V2Transport  # noqa: PLC0415

        return V2Transport(client, options.event_name, options.batch_size)
    from spendgate.settle.transport_v1 import V1Transport  # noqa: PLC0415

    return V1Transport(client, options.event_name)


async def settle_standalone(engine: _core.Engine, settings: Any, *, follow: bool) -> int:
    """`spendgate settle`: drain the outbox of a data dir the sidecar is not running on. Until the outbox is empty, or,
    with follow, until SIGTERM or SIGINT. Returns the exit code: 0 when it ended as asked, 1 when a signal interrupted
    a drain (what is left stays in the outbox, safe)."""
    import signal  # noqa: PLC0415

    from spendgate.server.durability import DurabilityWaiter  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    waiter = DurabilityWaiter(engine)
    service: SettlementService | None = None
    interrupted = False
    try:
        service = SettlementService(engine, settings, waiter.wait)
        service.log_start()
        task = loop.create_task(service.run(until_empty=not follow))

        def on_signal(sig: signal.Signals) -> None:
            nonlocal interrupted
            interrupted = True
            log.info("%s: stopping the settler", sig.name)
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await asyncio.wait([task])
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        stats = engine.outbox_stats()
        status = service.status
        print(
            f"settled {status.delivered_events} meter events ({status.delivered_entries} outbox entries); "
            f"dead-lettered {status.dead_lettered_entries} entries; the outbox holds {stats['depth']} entries and "
            f"there are {stats['dead_letters']} dead letters (`spendgate deadletter list` on the running sidecar)",
            flush=True,
        )
        return 1 if interrupted and not follow else 0
    finally:
        if service is not None:
            service.close()
        waiter.close()

"""The composition root of the server: one engine, one grpc.aio server, health and reflection.

    await serve(settings)          # runs until SIGTERM or SIGINT, drains, flushes, returns the exit code

Startup: open the engine (recovers from LMDB), bind, start, then set health SERVING: health is the readiness signal.
Shutdown: health NOT_SERVING, stop accepting and give in-flight calls `shutdown_grace_ms` to finish, stop watching the
writer, close the engine (which writes and fsyncs everything queued).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING, Final

import grpc
import grpc.aio
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from spendgate import _core
from spendgate.config import Settings
from spendgate.server.admin_service import AdminServicer
from spendgate.server.budget_service import BudgetServicer
from spendgate.server.durability import DurabilityWaiter
from spendgate.server.http import HttpServer, new_http_app
from spendgate.settle import SettlementService
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from spendgate.webhooks import WebhookReceiver

log = logging.getLogger("spendgate")

BUDGET_SERVICE: Final[str] = pb.DESCRIPTOR.services_by_name["Budget"].full_name
ADMIN_SERVICE: Final[str] = pb.DESCRIPTOR.services_by_name["Admin"].full_name
# The health service names set SERVING: "" is the whole server, as health checkers ask by default.
HEALTH_SERVICES: Final[tuple[str, ...]] = ("", BUDGET_SERVICE, ADMIN_SERVICE)
SHUTDOWN_SIGNALS: Final[tuple[signal.Signals, ...]] = (signal.SIGTERM, signal.SIGINT)
LOG_FORMAT: Final[str] = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Sidecar:
    """The running server. start() and stop() once each; `address` is where it listens."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = ""
        self._engine: _core.Engine | None = None
        self._waiter: DurabilityWaiter | None = None
        self._health: grpc_health.aio.HealthServicer | None = None
        self._server: grpc.aio.Server | None = None
        self._http: HttpServer | None = None  # Stripe webhooks (webhook_listen), on their own port
        self.webhooks: WebhookReceiver | None = None
        self._health_tasks: set[asyncio.Task[None]] = set()
        self._settlement: SettlementService | None = None
        self._settle_task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        assert self._engine is None, "start() runs once"
        settings = self.settings
        self._engine = _core.Engine(settings.data_dir, **settings.engine_kwargs())
        try:
            self._waiter = DurabilityWaiter(self._engine, on_failure=self._on_engine_failure)
            self._settlement = SettlementService(self._engine, settings, self._waiter.wait)
            self._health = grpc_health.aio.HealthServicer()
            self._server = self._build_server(self._engine, self._waiter, self._health)
            port = self._server.add_insecure_port(settings.listen)
            self.address = bound_address(settings.listen, port)
            if settings.webhook_listen:
                await self._start_webhooks(self._engine, self._waiter)
            if self._engine.failure() is None:
                for service in HEALTH_SERVICES:
                    await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
            await self._server.start()
            self._start_settlement()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "spendgate listening on %s, data_dir %s, durability %s", self.address, settings.data_dir, settings.durability
        )

    async def stop(self) -> None:
        """Drain and close. Idempotent; safe after a failed start()."""
        if self._stopped:
            return
        self._stopped = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()  # NOT_SERVING first, so that balancers look elsewhere
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_ms / 1000)
        if self._http is not None:
            await self._http.stop()  # lets in-flight webhooks finish (they wait for the engine) within the grace
        await self._stop_settlement()  # after the drain; before the engine closes
        if self._waiter is not None:
            self._waiter.close()  # before the engine: the engine closes the fd the waiter watches
        if self._engine is not None:
            self._engine.close()  # writes and fsyncs everything queued
            log.info("spendgate stopped; data_dir %s closed", self.settings.data_dir)
        # Drop our references to the engine: it releases the data dir's lock only when freed, not on close(). (grpc
        # keeps the servicers in reference cycles, so a reopen in this process also needs a gc pass, for now.)
        self._server = self._waiter = self._engine = None
        self._http = self.webhooks = None

    async def _start_webhooks(self, engine: _core.Engine, waiter: DurabilityWaiter) -> None:
        from spendgate.webhooks import WEBHOOK_PATH, add_webhook_routes, build_receiver  # noqa: PLC0415 - aiohttp

        settings = self.settings
        self.webhooks = build_receiver(settings, engine, waiter.wait)
        app = new_http_app()
        add_webhook_routes(app, self.webhooks)
        self._http = HttpServer(app, settings.webhook_listen, shutdown_grace_s=settings.shutdown_grace_ms / 1000)
        await self._http.start()
        log.info("spendgate webhooks listening on %s%s", self._http.url, WEBHOOK_PATH)

    def _build_server(
        self, engine: _core.Engine, waiter: DurabilityWaiter, health: grpc_health.aio.HealthServicer
    ) -> grpc.aio.Server:
        settings = self.settings
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # gRPC sets SO_REUSEPORT by default: a second sidecar on the same port would then start and silently
                # share the traffic. Off, the second one fails to bind, as it should.
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        pb_grpc.add_BudgetServicer_to_server(BudgetServicer(engine, waiter), server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(engine, waiter, self._settlement), server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if settings.reflection:
            names = (BUDGET_SERVICE, ADMIN_SERVICE, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        return server

    def _start_settlement(self) -> None:
        """The settler as a background task (or, without STRIPE_API_KEY, only the outbox alarm)."""
        assert self._settlement is not None
        self._settlement.log_start()
        self._settle_task = asyncio.get_running_loop().create_task(self._settlement.run(), name="spendgate-settle")
        self._settle_task.add_done_callback(_log_settle_exit)

    async def _stop_settlement(self) -> None:
        """Cancel the settler. A Stripe call in flight is abandoned safely: its event's identifier was claimed durably
        before the send, so the next start resends exactly the same event and Stripe drops the duplicate."""
        task, self._settle_task = self._settle_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        if self._settlement is not None:
            self._settlement.close()
            self._settlement = None

    def _on_engine_failure(self, failure: str) -> None:
        # The writer failing is final (the engine refuses every later call): NOT_SERVING for good, so that the
        # orchestrator restarts us; LMDB still holds every acknowledged change.
        log.critical("engine failed: %s; health is NOT_SERVING until the sidecar restarts", failure)
        if self._health is not None:
            task = asyncio.get_running_loop().create_task(self._health.enter_graceful_shutdown())
            self._health_tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._health_tasks.discard)


def _log_settle_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical(
            "the settler stopped on an unexpected error; outbox entries wait until a restart", exc_info=task.exception()
        )


def bound_address(listen: str, port: int) -> str:
    """`listen` with the port the server actually bound (differs when the setting asked for port 0)."""
    host, separator, asked = listen.rpartition(":")
    if separator and asked == "0":
        return f"{host}:{port}"
    return listen


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


async def serve(settings: Settings) -> int:
    """Run the sidecar until SIGTERM or SIGINT; returns the process exit code (0 after a clean drain)."""
    sidecar = Sidecar(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s: draining for up to %d ms", sig.name, settings.shutdown_grace_ms)
        stop_requested.set()

    for sig in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await sidecar.start()
        await stop_requested.wait()
    finally:
        await sidecar.stop()
        for sig in SHUTDOWN_SIGNALS:
            loop.remove_signal_handler(sig)
    return 0

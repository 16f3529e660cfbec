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
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
import grpc.aio
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from spendgate import _core, logs
from spendgate.config import ConfigError, Settings, allowed_hosts
from spendgate.datacare import check_servable
from spendgate.display import parse_display_unit
from spendgate.policy.metering import Meter
from spendgate.policy.price_book import PriceBook
from spendgate.server.admin_service import AdminServicer
from spendgate.server.alerts import AlertService
from spendgate.server.auth import TokenAuthInterceptor
from spendgate.server.budget_service import BudgetServicer
from spendgate.server.durability import DurabilityWaiter
from spendgate.server.http import HttpServer, new_http_app, parse_listen
from spendgate.server.interceptors import ObservingInterceptor
from spendgate.server.metrics import Metrics
from spendgate.server.ops_http import HttpAccess, OpsRoutes
from spendgate.server.security import (
    Tokens,
    TokenSource,
    check_exposure,
    http_access_summary,
    http_ssl_context,
    load_tokens,
    server_credentials,
)
from spendgate.server.sessions import Sessions
from spendgate.server.usage_http import UsageRoutes
from spendgate.service.budgets import BudgetService
from spendgate.service.usage_links import (
    UsageLinks,
    UsageLinkSigner,
    load_or_create_secret,
    secret_path,
)
from spendgate.service.virtual_keys import VirtualKeys
from spendgate.settle import SettlementService
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from spendgate.proxy import Proxy
    from spendgate.settle.scheduled import ScheduledReconcile
    from spendgate.webhooks import WebhookReceiver
    from spendgate.webhooks.invoices import InvoiceGuard

log = logging.getLogger("spendgate")

BUDGET_SERVICE: Final[str] = pb.DESCRIPTOR.services_by_name["Budget"].full_name
ADMIN_SERVICE: Final[str] = pb.DESCRIPTOR.services_by_name["Admin"].full_name
# The health service names set SERVING: "" is the whole server, as health checkers ask by default.
HEALTH_SERVICES: Final[tuple[str, ...]] = ("", BUDGET_SERVICE, ADMIN_SERVICE)
SHUTDOWN_SIGNALS: Final[tuple[signal.Signals, ...]] = (signal.SIGTERM, signal.SIGINT)
# Keepalive pings faster than min_ping_interval_ms that a connection may send before it is closed (gRPC's default).
MAX_PING_STRIKES: Final[int] = 2


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
        self.metrics = Metrics()  # one registry per sidecar; other code reports its events here (see metrics.py)
        self.token_source = TokenSource(settings, Tokens())
        self._ops_http: HttpServer | None = None  # /metrics and the operator page (http_listen)
        self.http_address = ""
        self._health_tasks: set[asyncio.Task[None]] = set()
        self._settlement: SettlementService | None = None
        self._settle_task: asyncio.Task[None] | None = None
        self._alerts: AlertService | None = None  # WatchAlerts streams and the alert webhook
        self._stopped = False
        self.prices: PriceBook = PriceBook(None)
        self._background: set[asyncio.Task[None]] = set()  # cancelled at stop
        self._sighup_installed = False
        self.virtual_keys: VirtualKeys | None = None  # the proxy's virtual keys (Admin.CreateVirtualKey, ...)
        self._proxy: Proxy | None = None  # the HTTP proxy (proxy_listen), and its server
        self._proxy_http: HttpServer | None = None
        self.proxy_address = ""
        self.invoice_guard: InvoiceGuard | None = None  # invoice.created and Admin.ReleaseInvoice
        self.reconciler: ScheduledReconcile | None = None  # reconcile_interval_ms
        self._admin: AdminServicer | None = None

    async def start(self) -> None:
        assert self._engine is None, "start() runs once"
        settings = self.settings
        # Refuse a bad token file, certificate or exposure before touching the data dir (ConfigError).
        self.token_source = TokenSource(settings, load_tokens(settings))
        _redact(self.tokens)
        check_exposure(settings, self.tokens)
        credentials = server_credentials(settings)
        # A bad price file fails the start, before the data dir is touched (a reload keeps the old table instead).
        self.prices = PriceBook(settings.price_table or None)
        check_servable(Path(settings.data_dir))  # not a half-restored data dir, nor a lost one recreated empty
        self._engine = _core.Engine(settings.data_dir, **settings.engine_kwargs())
        try:
            self._waiter = DurabilityWaiter(self._engine, on_failure=self._on_engine_failure)
            self._settlement = SettlementService(self._engine, settings, self._waiter.wait, metrics=self.metrics)
            self.metrics.watch(self._engine, settings.data_dir, self._settlement)
            self._alerts = AlertService(
                self._engine, self._waiter, settings, self.metrics, by_token=self.tokens.enabled
            )
            self.virtual_keys = VirtualKeys(self._engine, self._waiter.wait)  # the proxy's, managed by Admin RPCs
            self.invoice_guard = _invoice_guard(settings, self._engine, self._waiter)
            self.reconciler = _reconciler(settings, self._engine, self._waiter, self.metrics)
            self._health = grpc_health.aio.HealthServicer()
            self._server = self._build_server(self._engine, self._waiter, self._health)
            port = (
                self._server.add_secure_port(settings.listen, credentials)
                if credentials is not None
                else self._server.add_insecure_port(settings.listen)
            )
            self.address = bound_address(settings.listen, port)
            if settings.http_listen:
                await self._start_ops_http(self._engine, self._waiter)
            if settings.webhook_listen and not self._webhooks_share_the_http_port():
                await self._start_webhooks(self._engine, self._waiter)
            if settings.proxy_listen:
                await self._start_proxy(self._engine, self._waiter)
            if self._engine.failure() is None:
                for service in HEALTH_SERVICES:
                    await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
            await self._server.start()
            self._start_settlement()
            self._start_reconcile()
            self._start_price_reloads()
            self._install_sighup()
            assert self._alerts is not None
            self._alerts.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "spendgate listening on %s, data_dir %s, durability %s",
            self.address,
            settings.data_dir,
            settings.durability,
        )

    async def stop(self) -> None:
        """Drain and close. Idempotent; safe after a failed start()."""
        if self._stopped:
            return
        self._stopped = True
        if self._sighup_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup_installed = False
        for task in self._background:
            task.cancel()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()  # NOT_SERVING first, so that balancers look elsewhere
        if self._alerts is not None:
            await self._alerts.stop()  # ends the WatchAlerts streams first: open streams would hold the drain
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_ms / 1000)
        if self._http is not None:
            await self._http.stop()  # lets in-flight webhooks finish (they wait for the engine) within the grace
        if self._ops_http is not None:
            await self._ops_http.stop()
        await self._stop_proxy()  # in-flight proxied calls settle within the grace (their commits need the engine)
        await self._stop_settlement()  # after the drain; before the engine closes
        self.metrics.unwatch()  # a scrape must not read a closed engine
        if self._waiter is not None:
            self._waiter.close()  # before the engine: the engine closes the fd the waiter watches
        if self._engine is not None:
            self._engine.close()  # writes and fsyncs everything queued
            log.info("spendgate stopped; data_dir %s closed", self.settings.data_dir)
        # Drop our references to the engine: it releases the data dir's lock only when freed, not on close(). (grpc
        # keeps the servicers in reference cycles, so a reopen in this process also needs a gc pass, for now.)
        self._server = self._waiter = self._engine = None
        self._http = self.webhooks = self._ops_http = None

    async def _start_webhooks(self, engine: _core.Engine, waiter: DurabilityWaiter, app: Any = None) -> None:
        """Stripe webhooks on their own port, or on `app` (the HTTP port's) when both settings name one address."""
        from spendgate.webhooks import WEBHOOK_PATH, add_webhook_routes, build_receiver  # noqa: PLC0415 - aiohttp

        settings = self.settings
        self.webhooks = build_receiver(settings, engine, waiter.wait, self.invoice_guard)
        if app is not None:
            add_webhook_routes(app, self.webhooks)
            return
        app = new_http_app()
        add_webhook_routes(app, self.webhooks)
        self._http = HttpServer(app, settings.webhook_listen, shutdown_grace_s=settings.shutdown_grace_ms / 1000)
        await self._http.start()
        log.info("spendgate webhooks listening on %s%s", self._http.url, WEBHOOK_PATH)

    async def _start_proxy(self, engine: _core.Engine, waiter: DurabilityWaiter) -> None:
        """The OpenAI- and Anthropic-compatible proxy on proxy_listen, reserving through the same BudgetService."""
        from spendgate.proxy import Proxy, ProxySettings  # noqa: PLC0415 - only when the proxy is on

        settings = self.settings
        service = BudgetService(engine, waiter.wait, Meter(self.prices))
        counter = self.metrics.proxy_calls
        assert self.virtual_keys is not None
        self._proxy = Proxy(
            service,
            ProxySettings.of(settings),
            self.virtual_keys,
            observe=lambda api, outcome: counter.labels(api=api, outcome=outcome).inc(),
        )
        logs.add_secrets(self._proxy.provider_keys())
        await self._proxy.start()
        self._proxy_http = HttpServer(
            self._proxy.app(), settings.proxy_listen, shutdown_grace_s=settings.shutdown_grace_ms / 1000, name="proxy"
        )
        await self._proxy_http.start()
        self.proxy_address = self._proxy_http.address
        log.info("spendgate proxy on %s/v1 (OpenAI) and %s (Anthropic)", self._proxy_http.url, self._proxy_http.url)

    async def _stop_proxy(self) -> None:
        if self._proxy_http is not None:
            await self._proxy_http.stop()
            self._proxy_http = None
        if self._proxy is not None:
            await self._proxy.close()
            self._proxy = None

    def _webhooks_share_the_http_port(self) -> bool:
        settings = self.settings
        return bool(settings.http_listen) and parse_listen(settings.http_listen) == parse_listen(
            settings.webhook_listen
        )

    async def _start_ops_http(self, engine: _core.Engine, waiter: DurabilityWaiter) -> None:
        """/metrics and the operator page on http_listen (HTTPS with the gRPC certificate when TLS is on)."""
        settings = self.settings
        ssl_context = http_ssl_context(settings)
        app = new_http_app()
        access = HttpAccess(
            self.token_source,
            Sessions(ttl_ms=settings.http_session_ttl_ms, max_sessions=settings.http_max_sessions),
            client_certs=bool(settings.tls_client_ca_file),
            allowed_hosts=allowed_hosts(settings),
            secure_cookie=ssl_context is not None,
        )
        unit = parse_display_unit(settings.display_unit)
        routes = OpsRoutes(
            engine,
            self.metrics,
            access,
            settlement=self._settlement,
            metrics_require_token=settings.metrics_require_token,
            operator_page=settings.http_operator_page,
            frame_ancestors=settings.http_frame_ancestors,
            display_unit=unit,
        )
        routes.invoice_guard, routes.reconciler = self.invoice_guard, self.reconciler
        routes.add_to(app)
        signer = self._usage_link_signer()
        UsageRoutes(engine, waiter.wait, signer, unit, frame_ancestors=settings.usage_page_frame_ancestors).add_to(app)
        if settings.webhook_listen and self._webhooks_share_the_http_port():
            await self._start_webhooks(engine, waiter, app)
        self._ops_http = HttpServer(
            app, settings.http_listen, shutdown_grace_s=settings.shutdown_grace_ms / 1000, ssl_context=ssl_context
        )
        await self._ops_http.start()
        self.http_address = self._ops_http.address
        url = self._ops_http.url
        if self._admin is not None:
            self._admin.usage_links = UsageLinks(signer, settings.usage_link_base_url.rstrip("/") or url)
        if settings.http_operator_page:
            log.info(
                "spendgate operator page on %s/ (it needs %s) and metrics on %s/metrics",
                url,
                http_access_summary(settings, self.tokens),
                url,
            )
        else:
            log.info("spendgate metrics on %s/metrics (the operator page is off: http_operator_page)", url)

    def _usage_link_signer(self) -> UsageLinkSigner:
        """The key of usage-page links: usage_link_secret_file, or one the sidecar keeps in its data dir (made the
        first time). Raises ConfigError for an unreadable or short key."""
        settings = self.settings
        path = secret_path(settings.usage_link_secret_file, settings.data_dir)
        try:
            return UsageLinkSigner(load_or_create_secret(path, create=not settings.usage_link_secret_file))
        except ValueError as error:
            raise ConfigError(f"setting 'usage_link_secret_file': {error}", "usage_link_secret_file") from None

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
                *connection_options(settings),
            ],
            interceptors=self._interceptors(),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        budget = BudgetServicer(engine, waiter, Meter(self.prices), self._alerts)
        pb_grpc.add_BudgetServicer_to_server(budget, server)
        admin = AdminServicer(engine, waiter, self._settlement, backup_dir=self.settings.backup_dir)
        admin.virtual_keys = self.virtual_keys
        admin.invoice_guard = self.invoice_guard
        self._admin = admin  # its usage_links are set once the HTTP port is bound (they need its address)
        pb_grpc.add_AdminServicer_to_server(admin, server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if settings.reflection:
            names = (BUDGET_SERVICE, ADMIN_SERVICE, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        return server

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The observer first (outermost), so that refused calls get a request id and are counted too. Without
        tokens configured there is nothing to check, and the token interceptor (a coroutine per call) is left out."""
        interceptors: list[grpc.aio.ServerInterceptor] = [ObservingInterceptor(self.metrics)]
        if self.tokens.enabled:
            interceptors.append(TokenAuthInterceptor(self.token_source))
        return interceptors

    def _start_reconcile(self) -> None:
        """The scheduled reconcile as a background task (cancelled at stop), when it is on."""
        if self.reconciler is None or not self.reconciler.enabled:
            return
        task = asyncio.get_running_loop().create_task(self.reconciler.run(), name="spendgate-reconcile")
        self._background.add(task)

    def _start_price_reloads(self) -> None:
        """SIGHUP reloads the price file, and so does a change to it (polled every price_reload_interval_ms)."""
        if not self.settings.price_table:
            return
        loop = asyncio.get_running_loop()
        if self.settings.price_reload_interval_ms > 0:
            task = loop.create_task(self.prices.watch(self.settings.price_reload_interval_ms), name="spendgate-prices")
            self._background.add(task)

    @property
    def tokens(self) -> Tokens:
        """The tokens in force (SIGHUP re-reads them)."""
        return self.token_source.current

    def _install_sighup(self) -> None:
        """SIGHUP re-reads the price file and the tokens (their files: rotation without a restart). One handler for
        both: the loop keeps one handler per signal."""
        if not (self.settings.price_table or self.tokens.enabled):
            return
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (RuntimeError, ValueError) as error:  # not the main thread (a sidecar embedded in a test's thread)
            log.warning("SIGHUP reloads are off: %s", error)
            return
        self._sighup_installed = True

    def _on_sighup(self) -> None:
        if self.settings.price_table:
            self.prices.on_sighup()
        if self.tokens.enabled:
            self.reload_tokens()

    def reload_tokens(self) -> bool:
        """Re-read app_tokens(_file) and admin_tokens(_file). A bad file keeps the tokens in force (logged). Sessions
        made from a token no longer configured end at their next request."""
        try:
            tokens = self.token_source.reload()
        except ConfigError as error:
            log.error("SIGHUP: tokens not reloaded, the old ones stay in force: %s", error)
            return False
        _redact(tokens)
        streams = self._alerts.hub.end_removed_tokens(tokens) if self._alerts is not None else 0
        log.info(
            "SIGHUP: tokens reloaded (%d app, %d admin); sessions of removed admin tokens are over, %d WatchAlerts "
            "streams opened with them ended",
            len(tokens.app),
            len(tokens.admin),
            streams,
        )
        return True

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
        if self._alerts is not None:
            self._alerts.end_watches("the sidecar's storage failed; resume against the restarted sidecar")
        if self._health is not None:
            task = asyncio.get_running_loop().create_task(self._health.enter_graceful_shutdown())
            self._health_tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._health_tasks.discard)


def _invoice_guard(settings: Settings, engine: _core.Engine, waiter: DurabilityWaiter) -> InvoiceGuard:
    from spendgate.webhooks.invoices import build_guard  # noqa: PLC0415 - the webhooks package needs aiohttp

    return build_guard(settings, engine, waiter.wait)


def _reconciler(
    settings: Settings, engine: _core.Engine, waiter: DurabilityWaiter, metrics: Metrics
) -> ScheduledReconcile:
    from spendgate.settle.scheduled import ScheduledReconcile  # noqa: PLC0415 - imports the SDK when on

    return ScheduledReconcile(engine, settings, waiter.wait, metrics=metrics)


def _redact(tokens: Tokens) -> None:
    logs.add_secrets(token.decode() for token in (*tokens.app, *tokens.admin))


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


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """The per-connection limits as gRPC server options (0 turns the idle and age limits off)."""
    options = [
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Keepalive enforcement: a client pinging faster than this gets GOAWAY (too_many_pings) after the strikes.
        ("grpc.http2.min_ping_interval_without_data_ms", settings.min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if settings.max_connection_idle_ms:
        options.append(("grpc.max_connection_idle_ms", settings.max_connection_idle_ms))
    if settings.max_connection_age_ms:
        options.append(("grpc.max_connection_age_ms", settings.max_connection_age_ms))
        options.append(("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_ms))
    return options


def configure_logging(level: str, log_format: str = "text", *, secrets: Iterable[str] = ()) -> None:
    """Structured (json) or text logs on stderr, with secrets redacted (spendgate.logs)."""
    logs.configure_logging(level, log_format, secrets=secrets)


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

"""Alerts reach the app: the hub that notices new durable alerts, and the Budget.WatchAlerts stream.

    alerts = AlertService(engine, waiter, settings, metrics)   # the hub, and the webhook sender when configured
    alerts.start()
    await alerts.watch(request, context)                      # the body of Budget.WatchAlerts
    await alerts.stop()                                       # ends every stream (UNAVAILABLE), stops the webhook

How a new alert is noticed: the engine stores alerts in LMDB in order, numbered by `seq`, and publishes the newest
durable seq (`engine.alert_seq()`) before it wakes the DurabilityWaiter. The hub listens to those wake-ups: when the
seq moved, it reads the new alerts once (`alerts_after`) and fans them out, so there is no polling and no delay.

Each watcher has a bounded queue (alert_watch_queue_capacity) of the alerts its filter wants. One that falls further
behind (its client does not read, so its writes wait on HTTP/2 flow control) gets nothing more from the hub, its queue
is freed at once, and it ends with RESOURCE_EXHAUSTED "... resume with after_seq=N" as soon as its pending write goes
through (the client sees the status after the alerts already on their way to it): it never blocks the others or grows
memory, and its alerts are durable, so it resumes without losing any. At shutdown every stream ends with UNAVAILABLE
"the sidecar is shutting down; resume with after_seq=N" before the server drains (a stream parked on a client that
reads nothing is cancelled at the end of the grace). N is the seq of the last alert the stream wrote, the last one the
client gets.

Slots: at most alert_max_watchers streams are open, and one client holds at most alert_max_watchers_per_client of
them, so that one app (or one leaking loop) cannot shut the others out. A client is its token when tokens are
configured, else its client certificate under mTLS, else its address (without the port: connections are cheap).

No gap and no duplicate across the replay/live boundary: a watcher registers, on the loop thread and without awaiting,
at the hub's `published_seq`: everything up to it comes from LMDB (the replay), everything after it from the hub, in
seq order; and a watcher drops any alert at or below the last seq it wrote.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
import grpc.aio
from prometheus_client import Counter, Gauge

from spendgate import _core
from spendgate.alerts import KINDS, START_SEQ_METADATA_KEY
from spendgate.config import Settings
from spendgate.server.auth import AUTHORIZATION_KEY
from spendgate.server.durability import DurabilityWaiter
from spendgate.server.security import BEARER_PREFIX, Tokens
from spendgate.v1 import spendgate_pb2 as pb

if TYPE_CHECKING:
    from spendgate.server.alert_webhook import AlertWebhook
    from spendgate.server.metrics import Metrics

log = logging.getLogger("spendgate.alerts")

# Quoted: grpc.aio.ServicerContext is generic only in the type stubs.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

# The one table from the engine's kind names to the contract's enum; both halves are checked to be complete.
ALERT_KIND_BY_NAME: Final[Mapping[str, pb.AlertKind]] = {
    "soft_limit_crossed": pb.ALERT_KIND_SOFT_LIMIT_CROSSED,
    "limit_reached": pb.ALERT_KIND_LIMIT_REACHED,
    "breaker_tripped": pb.ALERT_KIND_BREAKER_TRIPPED,
    "frozen": pb.ALERT_KIND_FROZEN,
    "unfrozen": pb.ALERT_KIND_UNFROZEN,
    "settlement_dead_letter": pb.ALERT_KIND_SETTLEMENT_DEAD_LETTER,
    "invoice_spike": pb.ALERT_KIND_INVOICE_SPIKE,
    "reconcile_divergence": pb.ALERT_KIND_RECONCILE_DIVERGENCE,
    "clock_step": pb.ALERT_KIND_CLOCK_STEP,
}
assert tuple(ALERT_KIND_BY_NAME) == KINDS, "spendgate.alerts.KINDS and this table name the same kinds"
assert set(ALERT_KIND_BY_NAME.values()) == set(pb.AlertKind.values()) - {pb.ALERT_KIND_UNSPECIFIED}, (
    "every spendgate.v1.AlertKind has an engine name"
)

# Server-wide alerts that no app owns (no customer): the operator's log shows them too.
LOGGED_KINDS: Final[frozenset[str]] = frozenset({"clock_step"})

# Alerts read from LMDB per engine call: by the hub per fan-out step (it yields to the loop between steps), and by a
# stream's replay per read.
FANOUT_BATCH_ALERTS: Final[int] = 1_000
REPLAY_BATCH_ALERTS: Final[int] = 500
# Customer ids one WatchAlerts may filter on (each at most MAX_ID_BYTES).
MAX_WATCH_CUSTOMER_IDS: Final[int] = 10_000


def alert_message(entry: _core.AlertEntry) -> pb.Alert:
    kind = ALERT_KIND_BY_NAME.get(entry["kind"])
    if kind is None:  # an engine newer than this server: deliver it rather than drop it
        log.warning(
            "alert %d has a kind this server does not know (%r): sent as UNSPECIFIED", entry["seq"], entry["kind"]
        )
        kind = pb.ALERT_KIND_UNSPECIFIED
    return pb.Alert(
        seq=entry["seq"],
        kind=kind,
        customer_id=entry["customer_id"],
        ts_ms=entry["ts_ms"],
        message=entry["message"],
        values=entry["values"],
    )


class WatchRefused(Exception):
    """A WatchAlerts request that cannot be served: the status and what to do about it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class Watcher:
    """One WatchAlerts stream's side of the hub: its filter, its bounded queue, and how it ended."""

    def __init__(self, customer_ids: frozenset[str], capacity: int, sent_seq: int, client_key: str = "") -> None:
        self.customer_ids = customer_ids
        self.client_key = client_key  # WatchClient.key: whose share it takes, and whose token it was opened with
        self.capacity = capacity
        self.sent_seq = sent_seq  # the last alert written in full (or where the stream starts)
        self._queue: collections.deque[pb.Alert] = collections.deque()
        self._ready = asyncio.Event()
        # (code, details without the resume hint) once the watcher must end.
        self.ended: tuple[grpc.StatusCode, str] | None = None

    def wants(self, customer_id: str) -> bool:
        return not self.customer_ids or customer_id in self.customer_ids

    def offer(self, message: pb.Alert) -> None:
        """A live alert (the hub calls this in seq order, for alerts this watcher wants)."""
        if self.ended is not None or message.seq <= self.sent_seq:
            return
        if len(self._queue) >= self.capacity:
            self.end(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this WatchAlerts stream fell more than {self.capacity} alerts behind (alert_watch_queue_capacity):"
                " read faster, or filter by customer_ids",
            )
            return
        self._queue.append(message)
        self._ready.set()

    def end(self, code: grpc.StatusCode, details: str) -> None:
        if self.ended is None:
            self.ended = (code, details)
            self._queue.clear()  # they are durable: the client gets them again when it resumes
            self._ready.set()

    async def next(self) -> pb.Alert | None:
        """The next live alert, or None once the watcher ended."""
        while not self._queue and self.ended is None:
            self._ready.clear()
            await self._ready.wait()
        return None if self.ended is not None else self._queue.popleft()


class AlertHub:
    """Notices new durable alerts (from the DurabilityWaiter's wake-ups) and fans them out to the watchers."""

    def __init__(
        self,
        engine: _core.Engine,
        *,
        queue_capacity: int,
        max_watchers: int,
        max_watchers_per_client: int | None = None,
        by_token: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        per_client = min(max_watchers, max_watchers_per_client or max_watchers)
        assert queue_capacity >= 1 and per_client >= 1, (queue_capacity, max_watchers, per_client)
        if max_watchers_per_client is not None and per_client == max_watchers > 1:
            log.warning(
                "alert_max_watchers_per_client (%d) is not below alert_max_watchers (%d): one client may take "
                "every WatchAlerts slot",
                per_client,
                max_watchers,
            )
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue_capacity = queue_capacity
        self._max_watchers = max_watchers
        self._max_per_client = per_client
        self._by_token = by_token  # tokens are configured (and checked): a client is its token
        self._metrics = metrics
        self._watchers: set[Watcher] = set()
        self._per_client: collections.Counter[str] = collections.Counter()
        self.published_seq = engine.alert_seq()
        self._scheduled = False
        self._closed: tuple[grpc.StatusCode, str] | None = None
        self._published: asyncio.Future[None] = self._loop.create_future()  # replaced at every publish
        registry = metrics.registry if metrics is not None else None  # None: not registered anywhere
        Gauge("spendgate_alert_watchers", "Open WatchAlerts streams.", registry=registry).set_function(
            lambda: len(self._watchers)
        )
        self._behind = Counter(
            "spendgate_alert_watchers_behind",
            "WatchAlerts streams ended for falling behind (alert_watch_queue_capacity).",
            registry=registry,
        )

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def notify(self) -> None:
        """A DurabilityWaiter listener: called on the loop after every wake-up of the writer. Cheap (one atomic read)
        when no alert came; otherwise the fan-out runs soon after, outside the waiter's callback."""
        if not self._scheduled and self._closed is None and self._engine.alert_seq() > self.published_seq:
            self._scheduled = True
            self._loop.call_soon(self._publish)

    def _publish(self) -> None:
        self._scheduled = False
        if self._closed is not None:
            return
        try:
            batch = self._engine.alerts_after(self.published_seq, FANOUT_BATCH_ALERTS)
        except _core.EngineError as error:  # the engine failed or closed: the app ends the watchers
            log.warning("alerts cannot be read (%s: %s); live alerts stop", error.kind, error.message)
            return
        for entry in batch:
            message = alert_message(entry)
            for watcher in self._watchers:
                if watcher.wants(message.customer_id):
                    watcher.offer(message)
            if self._metrics is not None:
                self._metrics.alerts.labels(kind=entry["kind"]).inc()
            if entry["kind"] in LOGGED_KINDS:
                log.warning("alert %s (seq %d): %s", entry["kind"], entry["seq"], entry["message"])
        if batch:
            self.published_seq = batch[-1]["seq"]
            self._published.set_result(None)
            self._published = self._loop.create_future()
        self.notify()  # more than one batch came: go on after the loop served others

    async def wait_published_after(self, seq: int) -> None:
        """Return once an alert with a seq above `seq` was published (or the hub closed)."""
        while self.published_seq <= seq and self._closed is None:
            await asyncio.shield(self._published)

    def end_removed_tokens(self, tokens: Tokens) -> int:
        """After a token reload: end the streams opened with a token that is no longer configured (UNAUTHENTICATED,
        resumable with a current token). Returns how many ended."""
        if not self._by_token:
            return 0
        current = {token_client_key(token) for token in (*tokens.app, *tokens.admin)}
        ended = 0
        for watcher in self._watchers:
            if watcher.client_key not in current and watcher.ended is None:
                watcher.end(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "the token this stream was opened with is no longer one "
                    "of the sidecar's tokens; resume with a current one",
                )
                ended += 1
        return ended

    def close(self, code: grpc.StatusCode, details: str) -> None:
        """End every stream with this status (and refuse new ones). Idempotent; the first reason stays."""
        if self._closed is None:
            self._closed = (code, details)
            for watcher in self._watchers:
                watcher.end(code, details)
            self._published.set_result(None)

    async def watch(self, request: pb.WatchAlertsRequest, context: Context) -> None:
        """The body of Budget.WatchAlerts: replay, then live, until the client leaves or the hub ends the stream."""
        client = watch_client(context, by_token=self._by_token)
        try:
            watcher = self._open(request, client)
        except WatchRefused as refused:
            await context.abort(refused.code, refused.details)
        # Counted until its handler ends, also while its last write waits on a client that does not read: so the
        # handlers parked that way are bounded by alert_max_watchers (and the client's share) too.
        self._watchers.add(watcher)
        self._per_client[client.key] += 1
        try:
            live_from = self.published_seq  # read in the same step as the registration: nothing falls between
            await context.send_initial_metadata(((START_SEQ_METADATA_KEY, str(watcher.sent_seq)),))
            await self._replay(context, watcher, live_from)
            while (message := await watcher.next()) is not None:
                await _send(context, watcher, message)
            await self._end(context, watcher)
        finally:
            self._watchers.discard(watcher)
            self._per_client[client.key] -= 1
            if self._per_client[client.key] <= 0:
                del self._per_client[client.key]

    async def _end(self, context: Context, watcher: Watcher) -> None:
        assert watcher.ended is not None
        code, details = watcher.ended
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._behind.inc()
        log.info("WatchAlerts ended (%s) after seq %d: %s", code.name, watcher.sent_seq, details)
        try:
            await context.abort(code, f"{details}; resume with after_seq={watcher.sent_seq}")
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - the status waited behind unread alerts, and the client left
            log.debug("WatchAlerts: the client left before its status was sent (%s)", error)
            raise asyncio.CancelledError from error  # grpc.aio ends a cancelled call quietly

    def _open(self, request: pb.WatchAlertsRequest, client: WatchClient) -> Watcher:
        """A watcher for this request, or WatchRefused with the status and what to do."""
        if request.from_start and request.after_seq:
            raise WatchRefused(grpc.StatusCode.INVALID_ARGUMENT, "pass after_seq or from_start, not both")
        newest = self._engine.alert_seq()
        if request.after_seq > newest:
            raise WatchRefused(
                grpc.StatusCode.OUT_OF_RANGE,
                f"after_seq {request.after_seq} is past the newest alert ({newest}) of this sidecar: a restored or"
                " another data dir? Resume with from_start, or after_seq at most the newest",
            )
        if len(request.customer_ids) > MAX_WATCH_CUSTOMER_IDS:
            raise WatchRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.customer_ids)} customer_ids; pass at most {MAX_WATCH_CUSTOMER_IDS} (or none for all)",
            )
        for customer_id in request.customer_ids:
            if not customer_id or len(customer_id.encode("utf-8")) > _core.MAX_ID_BYTES:
                raise WatchRefused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"customer_ids: {customer_id[:64]!r} is empty or longer than {_core.MAX_ID_BYTES} bytes",
                )
        if self._closed is not None:
            raise WatchRefused(
                grpc.StatusCode.UNAVAILABLE, f"{self._closed[1]}; resume with after_seq={request.after_seq}"
            )
        if len(self._watchers) >= self._max_watchers:
            raise WatchRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(self._watchers)} WatchAlerts streams are open, the most allowed (alert_max_watchers): close"
                " one, or share one stream in the app",
            )
        if self._per_client[client.key] >= self._max_per_client:
            raise WatchRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._per_client[client.key]} WatchAlerts streams are open for this client ({client.described}), "
                "the most one client may have (alert_max_watchers_per_client), so that others keep theirs: close one, "
                "or share one stream in the app",
            )
        start = 0 if request.from_start else request.after_seq or self.published_seq
        return Watcher(frozenset(request.customer_ids), self._queue_capacity, start, client.key)

    async def _replay(self, context: Context, watcher: Watcher, live_from: int) -> None:
        """The durable alerts in (watcher.sent_seq, live_from], oldest first; the live ones after come from the hub."""
        cursor = watcher.sent_seq
        while cursor < live_from and watcher.ended is None:
            batch = self._engine.alerts_after(cursor, REPLAY_BATCH_ALERTS)
            if not batch:
                return
            await asyncio.sleep(0)  # a filter may skip whole batches without a write: let the loop serve others
            if batch[0]["seq"] > cursor + 1 and cursor > 0:
                log.warning(
                    "WatchAlerts after seq %d: alerts %d..%d were pruned (the engine keeps the newest 100,000)",
                    cursor,
                    cursor + 1,
                    batch[0]["seq"] - 1,
                )
            for entry in batch:
                if entry["seq"] > live_from or watcher.ended is not None:
                    return
                cursor = entry["seq"]
                if watcher.wants(entry["customer_id"]):
                    await _send(context, watcher, alert_message(entry))


@dataclass(frozen=True, slots=True)
class WatchClient:
    """Whose share of the WatchAlerts slots a stream takes: `key` identifies, `described` is for the refusal."""

    key: str
    described: str


def token_client_key(token: bytes) -> str:
    return "token:" + hashlib.sha256(token).hexdigest()


def watch_client(context: Context, *, by_token: bool) -> WatchClient:
    """The caller of a WatchAlerts: its token when tokens are configured (the interceptor already checked it), else
    its client certificate under mTLS, else its address without the port (one process opens many connections)."""
    if by_token:
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_KEY:
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                token = text[len(BEARER_PREFIX) :].strip().encode("utf-8", "replace")
                return WatchClient(token_client_key(token), "its token")
    certificate = (context.auth_context() or {}).get("x509_pem_cert")
    if certificate:
        return WatchClient("cert:" + hashlib.sha256(certificate[0]).hexdigest(), "its client certificate")
    address = context.peer() or ""
    if address.startswith(("ipv4:", "ipv6:")):
        address = address.rpartition(":")[0]
    return WatchClient("peer:" + address, f"address {address}")


async def _send(context: Context, watcher: Watcher, message: pb.Alert) -> None:
    """Write one alert. The write waits while the client does not read (HTTP/2 flow control); the hub meanwhile ends a
    watcher that falls too far behind, and the stream then ends as soon as this write is through."""
    await context.write(message)
    watcher.sent_seq = max(watcher.sent_seq, message.seq)


class AlertService:
    """The hub and the optional webhook sender of one sidecar. Create it on the running loop."""

    def __init__(
        self,
        engine: _core.Engine,
        waiter: DurabilityWaiter,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        by_token: bool = False,
    ) -> None:
        from spendgate.server.alert_webhook import build_alert_webhook  # noqa: PLC0415 - aiohttp, only when serving

        self.hub = AlertHub(
            engine,
            queue_capacity=settings.alert_watch_queue_capacity,
            max_watchers=settings.alert_max_watchers,
            max_watchers_per_client=settings.alert_max_watchers_per_client,
            by_token=by_token,
            metrics=metrics,
        )
        self._waiter = waiter
        self.webhook: AlertWebhook | None = build_alert_webhook(settings, engine, self.hub, metrics)
        self._webhook_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._waiter.add_listener(self.hub.notify)
        self.hub.notify()  # alerts that became durable before we listened
        if self.webhook is not None:
            self.webhook.log_start()
            loop = asyncio.get_running_loop()
            self._webhook_task = loop.create_task(self.webhook.run(), name="spendgate-alert-webhook")
            self._webhook_task.add_done_callback(_log_webhook_exit)

    async def watch(self, request: pb.WatchAlertsRequest, context: Context) -> None:
        await self.hub.watch(request, context)

    def end_watches(self, details: str) -> None:
        """End every stream with UNAVAILABLE (the engine failed, or the sidecar stops)."""
        self.hub.close(grpc.StatusCode.UNAVAILABLE, details)

    async def stop(self) -> None:
        """End the streams and stop the webhook sender. An alert in flight to the webhook is sent again after the
        restart (its cursor moves only on a 2xx): at-least-once. Idempotent."""
        self.end_watches("the sidecar is shutting down")
        task, self._webhook_task = self._webhook_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])


def _log_webhook_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical(
            "the alert webhook sender stopped on an unexpected error; alerts wait for it until a restart",
            exc_info=task.exception(),
        )

"""The alert webhook: POST every alert, signed, in order, at least once, to `alert_webhook_url`.

One alert per request (body and signature: spendgate.alerts), one request at a time, in seq order, read from LMDB
after the durable delivery cursor (`engine.alert_cursor()`), so the sender needs no memory of its own:
- 2xx: delivered; the cursor moves past it (`set_alert_cursor`), then the next alert goes.
- 4xx other than 429: refused for good (a receiver that cannot parse it, a wrong path): logged, counted, skipped;
  the cursor moves past it, so one bad alert never blocks the rest.
- connection errors, timeouts, 429, 5xx (and 3xx: redirects are not followed): retried, with exponential backoff and
  full jitter from alert_webhook_backoff_base_ms up to alert_webhook_backoff_max_ms (or the receiver's Retry-After,
  within that bound). A transient failure never skips an alert: after alert_webhook_max_attempts tries in a row the
  sender logs an error and keeps trying every alert_webhook_backoff_max_ms at most, and later alerts wait (in LMDB).
After a crash or restart, delivery resumes after the durable cursor: the alert in flight (and any whose cursor move was
not yet durable) is sent again. So a receiver dedupes by the body's `id` (or `seq`).

The sender is one task on the server's loop with its own aiohttp session; the RPC path never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import aiohttp
from prometheus_client import Counter, Gauge

from spendgate import _core
from spendgate.alerts import SIGNATURE_HEADER, alert_id, signature_header, webhook_body
from spendgate.config import Settings

if TYPE_CHECKING:
    from spendgate.server.alerts import AlertHub
    from spendgate.server.metrics import Metrics

log = logging.getLogger("spendgate.alert_webhook")

# Alerts read from LMDB per read; they are then sent one by one.
DELIVERY_BATCH_ALERTS: Final[int] = 100
# Of a failed answer's body, this much goes to the log (the receiver's own words on why).
LOGGED_BODY_BYTES: Final[int] = 512
USER_AGENT: Final[str] = "spendgate-alert-webhook/1"
# Largest exponent of the backoff: 2**30 times the base is past any sane maximum, and keeps the number small.
MAX_BACKOFF_DOUBLINGS: Final[int] = 30


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    url: str
    secret: str
    timeout_ms: int = 10_000
    connect_timeout_ms: int = 5_000
    max_attempts: int = 8
    backoff_base_ms: int = 500
    backoff_max_ms: int = 60_000

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookOptions:
        # Settings checked the URL, the secret and the backoff bounds (config._alert_webhook_problems).
        return cls(
            url=settings.alert_webhook_url,
            secret=settings.alert_webhook_secret,
            timeout_ms=settings.alert_webhook_timeout_ms,
            connect_timeout_ms=settings.alert_webhook_connect_timeout_ms,
            max_attempts=settings.alert_webhook_max_attempts,
            backoff_base_ms=settings.alert_webhook_backoff_base_ms,
            backoff_max_ms=settings.alert_webhook_backoff_max_ms,
        )

    @property
    def shown_url(self) -> str:
        """The URL for logs: without a query or user info, which may carry credentials."""
        parsed = urllib.parse.urlsplit(self.url)
        host = parsed.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parsed.port is not None:
            netloc += f":{parsed.port}"
        return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


def build_alert_webhook(
    settings: Settings, engine: _core.Engine, hub: AlertHub, metrics: Metrics | None = None
) -> AlertWebhook | None:
    """The sender for these settings; None when alert_webhook_url is empty."""
    if not settings.alert_webhook_url:
        return None
    return AlertWebhook(engine, hub, WebhookOptions.from_settings(settings), metrics)


class _Answer:
    """What one POST came to."""

    DELIVERED: Final[str] = "delivered"
    REFUSED: Final[str] = "refused"  # 4xx other than 429: skip it
    RETRY: Final[str] = "retry"

    def __init__(self, outcome: str, why: str, retry_after_s: float | None = None) -> None:
        self.outcome = outcome
        self.why = why
        self.retry_after_s = retry_after_s


class AlertWebhook:
    """The sender. `run()` is its task (until cancelled); `delivered_seq` is the last alert answered 2xx or refused."""

    def __init__(
        self,
        engine: _core.Engine,
        hub: AlertHub,
        options: WebhookOptions,
        metrics: Metrics | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._hub = hub
        self.options = options
        self._rng = rng or random.Random()
        self.delivered_seq = 0
        registry = metrics.registry if metrics is not None else None
        self._outcomes = Counter(
            "spendgate_alert_webhook_requests",
            "Alert webhook POSTs by outcome: delivered (2xx), refused (4xx but 429: the alert is skipped), failed.",
            ["outcome"],
            registry=registry,
        )
        self._cursor_gauge = Gauge(
            "spendgate_alert_webhook_delivered_seq",
            "The last alert seq the webhook receiver answered.",
            registry=registry,
        )
        self._pending_gauge = Gauge(
            "spendgate_alert_webhook_pending", "Alerts not yet answered by the webhook receiver.", registry=registry
        )
        self._pending_gauge.set_function(lambda: max(0, self._hub.published_seq - self.delivered_seq))

    def log_start(self) -> None:
        log.info(
            "alert webhook on: POSTing alerts to %s, signed (%s header), resuming after alert %d",
            self.options.shown_url,
            SIGNATURE_HEADER,
            self._engine.alert_cursor(),
        )

    async def run(self) -> None:
        options = self.options
        timeout = aiohttp.ClientTimeout(total=options.timeout_ms / 1000, sock_connect=options.connect_timeout_ms / 1000)
        # One connection: requests go one at a time, in order; keep-alive saves a handshake per alert.
        connector = aiohttp.TCPConnector(limit=1)
        headers = {"User-Agent": USER_AGENT}
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers) as session:
            try:
                await self._deliver_forever(session)
            except _core.EngineError as error:  # the engine failed or closed under us: nothing more to read
                log.warning("alert webhook stopped: %s: %s", error.kind, error.message)

    async def _deliver_forever(self, session: aiohttp.ClientSession) -> None:
        cursor = self._engine.alert_cursor()
        self._set_delivered(cursor)
        while True:
            newest = self._engine.alert_seq()
            entries = self._engine.alerts_after(cursor, DELIVERY_BATCH_ALERTS)
            if not entries:
                await self._hub.wait_published_after(max(cursor, newest))
                if self._hub.closed:  # the sidecar stops, or its engine failed: nothing more will come
                    return
                continue
            if entries[0]["seq"] > cursor + 1:
                log.warning(
                    "alert webhook: alerts %d..%d were pruned before they were delivered (the engine keeps the newest"
                    " 100,000); going on from %d",
                    cursor + 1,
                    entries[0]["seq"] - 1,
                    entries[0]["seq"],
                )
            for entry in entries:
                await self._deliver(session, entry)
                cursor = entry["seq"]
                self._advance(cursor)

    async def _deliver(self, session: aiohttp.ClientSession, entry: _core.AlertEntry) -> None:
        """Return once the receiver answered 2xx, or refused the alert for good."""
        body = webhook_body(entry)
        attempt = 0
        while True:
            attempt += 1
            answer = await self._post(session, body)
            if answer.outcome == _Answer.DELIVERED:
                self._outcomes.labels(outcome="delivered").inc()
                if attempt > 1:
                    log.info("alert webhook: %s delivered after %d attempts", alert_id(entry), attempt)
                return
            if answer.outcome == _Answer.REFUSED:
                self._outcomes.labels(outcome="refused").inc()
                log.error(
                    "alert webhook: the receiver refused %s (%s, %s) for good: %s; skipped, delivery goes on",
                    alert_id(entry),
                    entry["kind"],
                    entry["customer_id"],
                    answer.why,
                )
                return
            self._outcomes.labels(outcome="failed").inc()
            delay_s = self._backoff_s(attempt, answer.retry_after_s)
            if attempt == self.options.max_attempts:
                log.error(
                    "alert webhook: %s failed %d times in a row (last: %s); retrying every %d ms at most, later"
                    " alerts wait",
                    alert_id(entry),
                    attempt,
                    answer.why,
                    self.options.backoff_max_ms,
                )
            else:
                log.warning(
                    "alert webhook: %s attempt %d failed (%s); retrying in %.2f s",
                    alert_id(entry),
                    attempt,
                    answer.why,
                    delay_s,
                )
            await asyncio.sleep(delay_s)

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> _Answer:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature_header(body, self.options.secret)}
        try:
            async with session.post(self.options.url, data=body, headers=headers, allow_redirects=False) as response:
                status = response.status
                if 200 <= status < 300:
                    return _Answer(_Answer.DELIVERED, str(status))
                said = (await response.content.read(LOGGED_BODY_BYTES)).decode("utf-8", "replace")
                why = f"HTTP {status} {said!r}"
                if 400 <= status < 500 and status != 429:
                    return _Answer(_Answer.REFUSED, why)
                return _Answer(_Answer.RETRY, why, _retry_after_s(response.headers.get("Retry-After")))
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            return _Answer(_Answer.RETRY, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)

    def _backoff_s(self, attempt: int, retry_after_s: float | None) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]; at least the receiver's Retry-After, within
        the max, when it gave one."""
        max_s = self.options.backoff_max_ms / 1000
        doublings = min(attempt - 1, MAX_BACKOFF_DOUBLINGS)
        jittered_s = self._rng.uniform(0.0, min(max_s, self.options.backoff_base_ms / 1000 * 2**doublings))
        if retry_after_s is None:
            return jittered_s
        return min(max_s, max(retry_after_s, jittered_s))  # "Retry-After: 0" must not make a tight loop

    def _advance(self, seq: int) -> None:
        self._set_delivered(seq)
        try:
            # Not awaited: a cursor move lost in a crash only means that alert is sent again (at-least-once).
            self._engine.set_alert_cursor(seq)
        except _core.EngineError as error:
            if error.kind != "resource_exhausted":
                raise
            # The write queue is full: the next delivery moves the cursor past this one too.
            log.debug("alert webhook: cursor move to %d deferred: %s", seq, error.message)

    def _set_delivered(self, seq: int) -> None:
        self.delivered_seq = seq
        self._cursor_gauge.set(seq)


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds (the delta-seconds form; an HTTP date is ignored: the backoff applies)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None

"""The OpenAI- and Anthropic-compatible HTTP proxy: reserve before the call, commit exactly after, never let a stream
escape its budget.

    proxy = Proxy(service, ProxySettings.of(settings), VirtualKeys(engine, waiter.wait))
    await proxy.start()                       # the upstream client session
    app = proxy.app()                         # served by the sidecar on proxy_listen (spendgate.server.app)
    ...
    await proxy.close()

One call: identify the customer (a virtual key, the x-spendgate-customer-id header, or the body behind a setting),
bound the call's worst case from its body (spendgate.proxy.estimate), Reserve it through the same BudgetService as
the gRPC Reserve, forward it, then Commit the usage the provider reported (spendgate.policy.providers converts), or
Release the hold when the provider failed before any output. A denial is the provider's own 429, sent before
anything is forwarded, with `x-should-retry: false`.

Streams are relayed event by event as they arrive (await write: a slow client slows the upstream read), with the
usage read on the way. A Chat stream whose client did not ask for usage is asked for it upstream, and the extra chunk
is dropped from what the client sees. A client that leaves mid-stream does not end the upstream read: it goes on,
unwritten, to the final usage (at most proxy_max_drains at once, each for at most proxy_drain_timeout_ms; past
either, the whole hold is committed). Whenever the exact usage cannot be known after the call reached the provider
(cut off, malformed, over time), the whole hold is committed: never less than the call may have cost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from spendgate._core import EngineError
from spendgate.config import ConfigError, Settings, allowed_hosts
from spendgate.policy.prices import PriceError, TokenUsage, UnknownModelError
from spendgate.policy.providers import usage_from_anthropic, usage_from_openai, usage_from_openai_responses
from spendgate.proxy.estimate import CHAT, MESSAGES, RESPONSES, EstimateError, bound_call
from spendgate.proxy.wire import ANTHROPIC, OPENAI, EventSplitter, UsageTracker, error_body, response_usage
from spendgate.server.http_guard import host_name, is_loopback_host
from spendgate.service.budgets import BudgetService, ReserveResult, TokenEstimate, Usage, reason_name
from spendgate.service.virtual_keys import VirtualKeys, looks_like_key

log = logging.getLogger("spendgate.proxy")

CUSTOMER_HEADER: Final[str] = "x-spendgate-customer-id"
RESERVATION_HEADER: Final[str] = "x-spendgate-reservation-id"
OWN_HEADER_PREFIX: Final[str] = "x-spendgate-"  # never forwarded upstream
NO_RETRY: Final[Mapping[str, str]] = {"x-should-retry": "false"}
# RFC 9110 7.6.1 hop-by-hop headers, and those this proxy sets itself.
HOP_BY_HOP: Final[frozenset[str]] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        "content-encoding",
    }
)
# Route -> (API, provider, path under the provider's base URL).
ROUTES: Final[Mapping[str, tuple[str, str, str]]] = {
    "/v1/chat/completions": (CHAT, OPENAI, "/chat/completions"),
    "/v1/responses": (RESPONSES, OPENAI, "/responses"),
    "/v1/messages": (MESSAGES, ANTHROPIC, "/v1/messages"),
}
CONVERTERS: Final[Mapping[str, Any]] = {
    CHAT: usage_from_openai,
    RESPONSES: usage_from_openai_responses,
    MESSAGES: usage_from_anthropic,
}
# A whole (not streamed) response is read into memory to find its usage; past this it is cut off.
MAX_RESPONSE_BYTES: Final[int] = 64 * 1024 * 1024
# An upstream error body relayed to the client is read up to this much.
MAX_ERROR_BODY_BYTES: Final[int] = 1024 * 1024
# At shutdown, how long close() waits for the commits of calls the shutdown cut off (each is one durable write).
SETTLE_ON_CLOSE_TIMEOUT_S: Final[float] = 10.0
# A call is cut off this long before its hold would expire, so that its commit always finds the hold.
HOLD_MARGIN_MS: Final[int] = 5_000
MIN_CALL_MS: Final[int] = 1_000
# Client-side write failures: the client went away.
CLIENT_GONE_ERRORS: Final[tuple[type[BaseException], ...]] = (ConnectionError, aiohttp.ClientConnectionResetError)
UPSTREAM_ERRORS: Final[tuple[type[BaseException], ...]] = (aiohttp.ClientError, TimeoutError, OSError, ValueError)
# The same, and a cancellation (the sidecar shutting down): the hold must be settled either way.
UPSTREAM_ERRORS_OR_CANCEL: Final[tuple[type[BaseException], ...]] = (*UPSTREAM_ERRORS, asyncio.CancelledError)
# EngineError.kind -> HTTP status: the one place the proxy maps engine errors.
STATUS_BY_KIND: Final[Mapping[str, int]] = {
    "invalid_argument": 400,
    "not_found": 403,
    "already_exists": 409,
    "failed_precondition": 409,
    "resource_exhausted": 503,
    "unavailable": 503,
    "internal": 500,
}


class ProxyError(Exception):
    """A request the proxy answers itself, in the provider's error shape."""

    def __init__(self, status: int, message: str, code: str | None = None, *, retry: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.retry = status, message, code, retry


@dataclasses.dataclass(frozen=True, slots=True)
class ProxySettings:
    openai_base_url: str
    anthropic_base_url: str
    openai_api_key: str
    anthropic_api_key: str
    customer_id_from_body: bool
    max_body_bytes: int
    hold_ttl_ms: int
    connect_timeout_ms: int
    read_timeout_ms: int
    max_connections: int
    drain_timeout_ms: int
    max_drains: int
    # Host names (besides loopback names and IP addresses) a call that names its customer may be addressed to.
    allowed_hosts: frozenset[str] = frozenset()

    @classmethod
    def of(cls, settings: Settings) -> ProxySettings:
        """From the sidecar's settings; reads the provider key files (ConfigError if one cannot be read)."""
        return cls(
            settings.proxy_openai_base_url.rstrip("/"), settings.proxy_anthropic_base_url.rstrip("/"),
            _read_key("proxy_openai_api_key_file", settings.proxy_openai_api_key_file),
            _read_key("proxy_anthropic_api_key_file", settings.proxy_anthropic_api_key_file),
            settings.proxy_customer_id_from_body, settings.proxy_max_body_bytes,
            settings.proxy_hold_ttl_ms or settings.max_ttl_ms,
            settings.proxy_upstream_connect_timeout_ms, settings.proxy_upstream_read_timeout_ms,
            settings.proxy_max_upstream_connections, settings.proxy_drain_timeout_ms, settings.proxy_max_drains,
            allowed_hosts(settings),
        )  # fmt: skip


def _read_key(setting: str, path: str) -> str:
    if not path:
        return ""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"setting {setting!r}: cannot read {path}: {error}", setting) from None
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"setting {setting!r}: {path} must hold one API key on one line", setting)
    return key


@dataclasses.dataclass(slots=True)
class Call:
    """One proxied call under way."""

    api: str
    provider: str
    customer_id: str
    model: str
    held: ReserveResult
    deadline: float  # loop time by which it must be settled (before its hold expires)
    settled: bool = False


class Proxy:
    def __init__(
        self,
        service: BudgetService,
        settings: ProxySettings,
        keys: VirtualKeys,
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        """observe(api, outcome): called once per call (the sidecar counts them in spendgate_proxy_calls)."""
        self._observe = observe or (lambda api, outcome: None)
        self._service = service
        self._settings = settings
        self._keys = keys
        self._session: aiohttp.ClientSession | None = None
        self._drains = asyncio.Semaphore(settings.max_drains)
        self._settling: set[asyncio.Task[None]] = set()  # commits of cancelled calls, awaited by close()
        self.drains_refused = 0  # streams whose client left when no drain was free (their whole hold was committed)

    def provider_keys(self) -> tuple[str, ...]:
        """The provider keys from the key files, for log redaction."""
        return tuple(k for k in (self._settings.openai_api_key, self._settings.anthropic_api_key) if k)

    async def start(self) -> None:
        s = self._settings
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=s.connect_timeout_ms / 1000, sock_read=s.read_timeout_ms / 1000
        )
        connector = aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=0)
        # auto_decompress: the client gets plain bytes (Content-Encoding is dropped), and events can be read.
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        """After the HTTP server stopped: wait for the commits of calls cut off by the shutdown, then close."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=SETTLE_ON_CLOSE_TIMEOUT_S)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _settle_shielded(self, settle: Coroutine[Any, Any, None]) -> None:
        """Run a commit or release that must finish even if this call is cancelled (the sidecar shutting down):
        close() waits for it before the engine closes."""
        task = asyncio.ensure_future(settle)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._settings.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = ROUTES.get(request.path) if request.method == "POST" else None
        provider = route[1] if route else _provider_of(request)
        try:
            if route is None:
                raise ProxyError(
                    404, f"Invalid URL ({request.method} {request.path}): spendgate proxies POST {', '.join(ROUTES)}"
                )
            return await self._call(request, *route)
        except ProxyError as error:
            self._observe(
                route[0] if route else "unknown",
                "denied" if error.code == "insufficient_quota" else "refused" if error.status < 500 else "error",
            )
            headers = {} if error.retry else dict(NO_RETRY)
            return web.Response(
                status=error.status,
                body=error_body(provider, error.status, error.message, error.code),
                content_type="application/json",
                headers=headers,
            )

    async def _call(self, request: web.Request, api: str, provider: str, path: str) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ProxyError(
                413, f"the request body is over proxy_max_body_bytes ({self._settings.max_body_bytes} bytes)"
            ) from None
        try:
            document = json.loads(raw)
        except ValueError as error:
            raise ProxyError(400, f"the request body is not JSON: {error}") from None
        if not isinstance(document, dict):
            raise ProxyError(400, "the request body must be a JSON object")
        if api == RESPONSES and document.get("background"):
            raise ProxyError(
                400,
                "background responses are billed after the reply, which the proxy cannot "
                'meter: call without "background"',
            )
        customer_id, auth = self._identify(request, provider, document)
        call = await self._reserve(api, provider, customer_id, document, len(raw))
        headers = _upstream_headers(request.headers, auth)
        return await self._forward(request, call, path, raw, document, headers)

    # -- who pays ---------------------------------------------------------------------------------------------------

    def _identify(self, request: web.Request, provider: str, document: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
        """(customer id, upstream auth headers to set; empty: forward the client's own)."""
        credential = _credential(request.headers)
        if credential and looks_like_key(credential):
            customer_id = self._keys.customer_of(credential)
            if customer_id is None:
                raise ProxyError(
                    401,
                    "unknown or revoked spendgate virtual key: create one with `spendgate key "
                    "create CUSTOMER` (Admin.CreateVirtualKey)",
                    "invalid_api_key",
                )
            return customer_id, self._provider_auth(provider)
        if not _host_may_name_a_customer(request.headers.get("Host"), self._settings.allowed_hosts):
            # A web page the operator visits could rebind its own name to this address (DNS rebinding) and spend any
            # customer's budget by naming it; a virtual key is a secret such a page cannot know.
            raise ProxyError(
                421,
                f"Host {request.headers.get('Host')!r} may not name a customer: address the proxy "
                "by a loopback name or an IP address, list the name in http_allowed_hosts, or use "
                "a spendgate virtual key as the API key",
                "misdirected_request",
            )
        customer_id = request.headers.get(CUSTOMER_HEADER, "").strip()
        if customer_id:
            return customer_id, {}
        if self._settings.customer_id_from_body:
            from_body = _body_customer(provider, document)
            if from_body and self._has_budget(from_body):
                return from_body, {}
        raise ProxyError(
            401,
            f"spendgate cannot tell who pays for this call: send the {CUSTOMER_HEADER} header "
            "or use a spendgate virtual key as the API key",
            "missing_customer",
        )

    def _provider_auth(self, provider: str) -> dict[str, str]:
        s = self._settings
        key = s.openai_api_key if provider == OPENAI else s.anthropic_api_key
        if not key:
            setting = f"proxy_{provider}_api_key_file"
            raise ProxyError(500, f"virtual keys need the provider's key: set {setting} on the spendgate sidecar")
        return {"authorization": f"Bearer {key}"} if provider == OPENAI else {"x-api-key": key}

    def _has_budget(self, customer_id: str) -> bool:
        try:
            self._service.balance(customer_id)
        except EngineError:
            return False
        return True

    # -- before the call ----------------------------------------------------------------------------------------------

    async def _reserve(
        self, api: str, provider: str, customer_id: str, document: Mapping[str, Any], body_bytes: int
    ) -> Call:
        model = str(document.get("model") or "")
        try:
            bound = bound_call(api, document, body_bytes, self._service.meter.book.table)
            estimate = TokenEstimate(bound.model, bound.input_tokens, bound.max_output_tokens)
        except UnknownModelError:
            estimate = TokenEstimate(model, 1, 1)  # the service words the denial (and NOT_FOUND comes first)
        except (EstimateError, PriceError) as error:
            raise ProxyError(400, str(error)) from None
        try:
            held = await self._service.reserve(customer_id, estimate=estimate, ttl_ms=self._settings.hold_ttl_ms)
        except EngineError as error:
            raise _engine_error(error, customer_id) from None
        if not held.granted:
            raise ProxyError(
                429,
                f"spendgate denied this call ({reason_name(held.reason)}, remaining {held.remaining}): {held.message}",
                "insufficient_quota",
            )
        budget_ms = max(MIN_CALL_MS, self._settings.hold_ttl_ms - HOLD_MARGIN_MS)
        deadline = asyncio.get_running_loop().time() + budget_ms / 1000
        return Call(api, provider, customer_id, model, held, deadline)

    # -- the call -----------------------------------------------------------------------------------------------------

    async def _forward(
        self, request: web.Request, call: Call, path: str, raw: bytes, document: dict[str, Any], headers: dict[str, str]
    ) -> web.StreamResponse:
        stream = document.get("stream") is True
        strip = False
        if call.api == CHAT and stream and not _asked_for_usage(document):
            given = document.get("stream_options")
            options: dict[str, Any] = given if isinstance(given, dict) else {}
            raw = json.dumps(
                {**document, "stream_options": {**options, "include_usage": True}}, separators=(",", ":")
            ).encode()
            strip = True
        assert self._session is not None, "start() first"
        base = self._settings.openai_base_url if call.provider == OPENAI else self._settings.anthropic_base_url
        try:
            async with asyncio.timeout_at(call.deadline):
                upstream = await self._session.post(base + path, data=raw, headers=headers)
        except aiohttp.ClientConnectorError as error:
            await self._release(call)  # never connected: the provider never saw the call
            raise ProxyError(502, f"spendgate could not reach the provider: {error}", retry=True) from None
        except UPSTREAM_ERRORS_OR_CANCEL as error:
            # Sent, but no answer: the provider may have run (and billed) the call.
            await self._settle_shielded(self._commit(call, None, f"no answer from the provider: {error!r}"))
            if isinstance(error, asyncio.CancelledError):
                raise
            raise ProxyError(502, f"the provider did not answer: {error!r}") from None
        try:
            if upstream.status != 200:
                return await self._relay_error(call, upstream)
            if stream and upstream.content_type == "text/event-stream":
                return await self._relay_stream(request, call, upstream, strip)
            return await self._relay_whole(call, upstream)
        finally:
            if upstream.content.at_eof():
                upstream.release()  # back to the pool
            else:
                upstream.close()  # cut off mid-body: the connection cannot be reused

    async def _relay_error(self, call: Call, upstream: aiohttp.ClientResponse) -> web.Response:
        """The provider refused or failed before any output: release, and pass its answer on as it is."""
        try:
            body = await upstream.content.read(MAX_ERROR_BODY_BYTES)
        except UPSTREAM_ERRORS:
            body = b""
        await self._release(call)
        return web.Response(status=upstream.status, body=body, headers=_client_headers(upstream.headers, call))

    async def _relay_whole(self, call: Call, upstream: aiohttp.ClientResponse) -> web.Response:
        body = b""
        try:
            async with asyncio.timeout_at(call.deadline):
                body = await upstream.content.read(MAX_RESPONSE_BYTES + 1)
            if len(body) > MAX_RESPONSE_BYTES:
                raise ValueError(f"the response is over {MAX_RESPONSE_BYTES} bytes")
            usage = response_usage(call.api, json.loads(body))
        except UPSTREAM_ERRORS_OR_CANCEL as error:
            await self._settle_shielded(self._commit(call, None, f"the response could not be read: {error!r}"))
            if isinstance(error, asyncio.CancelledError):
                raise
            raise ProxyError(502, f"the provider's response could not be read: {error!r}", retry=False) from None
        await self._commit(call, usage, "the response has no usage")
        return web.Response(status=upstream.status, body=body, headers=_client_headers(upstream.headers, call))

    async def _relay_stream(
        self, request: web.Request, call: Call, upstream: aiohttp.ClientResponse, strip: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=_client_headers(upstream.headers, call))
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"  # intermediaries such as nginx would buffer the events
        relay = StreamRelay(call, UsageTracker(call.api, strip), response)
        try:
            await relay.open(request)
            await self._pump(relay, upstream)
        except asyncio.CancelledError:
            await self._settle_shielded(self._settle_stream(relay))
            raise
        await self._settle_stream(relay)
        await relay.close(request)
        return response

    async def _pump(self, relay: StreamRelay, upstream: aiohttp.ClientResponse) -> None:
        """Read upstream to its end, writing what the client may see while it is there."""
        splitter = EventSplitter()
        drain_slot = False
        try:
            async with asyncio.timeout_at(relay.call.deadline) as deadline:
                async for chunk in upstream.content.iter_any():
                    relay.events += 1
                    await relay.write(b"".join(e for e in splitter.feed(chunk) if relay.tracker.see(e)))
                    if relay.client_gone and not drain_slot:
                        if self._drains.locked():
                            self.drains_refused += 1
                            relay.cut = "the client left and proxy_max_drains streams were already draining"
                            return
                        await self._drains.acquire()
                        drain_slot = True
                        loop_time = asyncio.get_running_loop().time()
                        deadline.reschedule(
                            min(relay.call.deadline, loop_time + self._settings.drain_timeout_ms / 1000)
                        )
                rest = splitter.rest()
                if rest and relay.tracker.see(rest):
                    await relay.write(rest)
        except TimeoutError:
            relay.cut = (
                "the call ran past its time (proxy_hold_ttl_ms, or proxy_drain_timeout_ms after its client left)"
            )
        except UPSTREAM_ERRORS as error:
            relay.cut = f"the upstream stream broke: {error!r}"
        finally:
            if drain_slot:
                self._drains.release()

    async def _settle_stream(self, relay: StreamRelay) -> None:
        if relay.tracker.usage is not None and relay.cut is None:
            await self._commit(relay.call, relay.tracker.usage, "")
        elif relay.events == 0:
            await self._release(relay.call)  # the provider sent nothing at all
        else:
            why = relay.cut or relay.tracker.error or "the stream ended without its usage"
            await self._commit(relay.call, None, why)

    # -- after the call -------------------------------------------------------------------------------------------

    async def _commit(self, call: Call, usage: Mapping[str, Any] | None, why_not: str) -> None:
        """Commit the exact usage, or the whole hold when there is none (saying why)."""
        if call.settled:
            return
        call.settled = True
        exact: TokenUsage | None = None
        if usage is not None:
            try:
                exact = CONVERTERS[call.api](usage, model=call.model)
            except (ValueError, PriceError) as error:
                why_not = f"its usage could not be read ({error})"
        try:
            if exact is not None:
                self._observe(call.api, "committed_exact")
                await self._service.commit(call.held.reservation_id, usage=Usage.of(exact))
                return
            self._observe(call.api, "committed_whole_hold")
            log.warning(
                "proxy: committing the whole hold of %s (%d units) for %s: %s",
                call.held.reservation_id,
                call.held.amount,
                call.customer_id,
                why_not,
            )
            await self._service.commit(call.held.reservation_id, call.held.amount)
        except EngineError as error:
            log.error("proxy: commit of %s failed: %s: %s", call.held.reservation_id, error.kind, error.message)

    async def _release(self, call: Call) -> None:
        if call.settled:
            return
        call.settled = True
        self._observe(call.api, "released")
        try:
            await self._service.release(call.held.reservation_id)
        except EngineError as error:
            log.error("proxy: release of %s failed: %s: %s", call.held.reservation_id, error.kind, error.message)


class StreamRelay:
    """The client side of one relayed stream: writes until the client leaves, then only counts."""

    def __init__(self, call: Call, tracker: UsageTracker, response: web.StreamResponse) -> None:
        self.call, self.tracker, self.response = call, tracker, response
        self.client_gone = False
        self.events = 0  # upstream chunks read
        self.cut: str | None = None  # why the stream was not read to its end

    async def open(self, request: web.Request) -> None:
        try:
            await self.response.prepare(request)
        except CLIENT_GONE_ERRORS:
            self.client_gone = True

    async def write(self, data: bytes) -> None:
        if data and not self.client_gone:
            try:
                await self.response.write(data)  # waits while the client's socket buffer is full: back-pressure
            except CLIENT_GONE_ERRORS:
                self.client_gone = True

    async def close(self, request: web.Request) -> None:
        if self.client_gone:
            return
        if self.cut is not None:
            # The upstream broke: end the client's stream the same way (no clean end), so its SDK sees the failure.
            if request.transport is not None:
                request.transport.close()
            return
        try:
            await self.response.write_eof()
        except CLIENT_GONE_ERRORS:
            pass


def _engine_error(error: EngineError, customer_id: str) -> ProxyError:
    status = STATUS_BY_KIND.get(error.kind, 500)
    if error.kind == "not_found":
        message = (
            f"spendgate has no budget for customer {customer_id!r}: create one (spendgate budget set "
            f"{customer_id} --limit N) before calling through the proxy"
        )
        return ProxyError(status, message, "no_budget")
    return ProxyError(status, f"spendgate: {error.message}", error.kind, retry=status == 503)


def _provider_of(request: web.Request) -> str:
    """Which provider's error shape an unknown route gets: Anthropic's SDK sends anthropic-version."""
    return ANTHROPIC if "anthropic-version" in request.headers or "x-api-key" in request.headers else OPENAI


def _credential(headers: Mapping[str, str]) -> str:
    api_key = headers.get("x-api-key", "").strip()
    if api_key:
        return api_key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _host_may_name_a_customer(host_header: str | None, allowed: frozenset[str]) -> bool:
    """Loopback names, IP literals (DNS rebinding always comes with a name) and the listed names; no Host: no
    browser."""
    if host_header is None:
        return True
    name = host_name(host_header)
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return is_loopback_host(name) or name in allowed


def _body_customer(provider: str, document: Mapping[str, Any]) -> str:
    if provider == ANTHROPIC:
        metadata = document.get("metadata")
        value = metadata.get("user_id") if isinstance(metadata, Mapping) else None
    else:
        value = document.get("safety_identifier") or document.get("user")
    if not isinstance(value, str) or value.lstrip().startswith(("{", "[")):
        return ""  # JSON-shaped ids (one tool puts a session blob here) never name a customer
    return value.strip()


def _asked_for_usage(document: Mapping[str, Any]) -> bool:
    options = document.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def _upstream_headers(incoming: Mapping[str, str], auth: Mapping[str, str]) -> dict[str, str]:
    headers = {
        name: value
        for name, value in incoming.items()
        if name.lower() not in HOP_BY_HOP and not name.lower().startswith(OWN_HEADER_PREFIX)
    }
    if auth:
        headers = {n: v for n, v in headers.items() if n.lower() not in ("authorization", "x-api-key")}
        headers.update(auth)
    headers["content-type"] = "application/json"
    return headers


def _client_headers(upstream: Mapping[str, str], call: Call) -> dict[str, str]:
    headers = {name: value for name, value in upstream.items() if name.lower() not in HOP_BY_HOP}
    headers[RESERVATION_HEADER] = call.held.reservation_id
    return headers

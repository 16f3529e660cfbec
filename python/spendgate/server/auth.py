"""The bearer-token check on gRPC calls: a grpc.aio server interceptor, before any servicer runs.

- Health and reflection: open (probes and grpcurl).
- spendgate.v1.Budget: an app or an admin token.
- Anything else (spendgate.v1.Admin): an admin token.
A call without a token, or with one that is not configured, gets UNAUTHENTICATED; an app token calling Admin gets
PERMISSION_DENIED. The servicer never runs, so nothing changes. Messages say how to fix it and never echo the token.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc
import grpc.aio

from spendgate.server.security import Role, Tokens, TokenSource

log = logging.getLogger("spendgate.auth")

OPEN_SERVICE_PREFIXES: Final[tuple[str, ...]] = ("/grpc.health.v1.Health/", "/grpc.reflection.")
APP_SERVICE_PREFIX: Final[str] = "/spendgate.v1.Budget/"
AUTHORIZATION_KEY: Final[str] = "authorization"
HOW_TO_SEND: Final[str] = (
    "send `authorization: Bearer <token>` metadata (spendgate.client.Client(token=...), or the CLI's --token / "
    "SPENDGATE_TOKEN)"
)


def needed_role(method: str) -> Role | None:
    """The least role that may call `method` (/package.Service/Method); None when it is open."""
    if method.startswith(OPEN_SERVICE_PREFIXES):
        return None
    return Role.APP if method.startswith(APP_SERVICE_PREFIX) else Role.ADMIN


def refusal(tokens: Tokens, method: str, authorization: str | None) -> tuple[grpc.StatusCode, str] | None:
    """Why this call may not go ahead (status code and message), or None when it may."""
    needed = needed_role(method)
    if needed is None or not tokens.enabled:
        return None
    role = tokens.role_of(authorization)
    if role is None and not authorization:
        return grpc.StatusCode.UNAUTHENTICATED, f"this sidecar requires a token for {method}: {HOW_TO_SEND}"
    if role is None:
        return grpc.StatusCode.UNAUTHENTICATED, (
            f"the token sent for {method} is not one of the sidecar's app_tokens or admin_tokens (or the value is not "
            f"`Bearer <token>`): {HOW_TO_SEND} with a configured token"
        )
    if needed is Role.ADMIN and role is Role.APP:
        return grpc.StatusCode.PERMISSION_DENIED, (
            f"an app token may call spendgate.v1.Budget only; {method} needs one of the sidecar's admin_tokens"
        )
    return None


def metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    """The first value of a metadata key of a call (keys arrive lower-cased)."""
    for item in details.invocation_metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio ships no type information
    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens  # read per call: a reload (SIGHUP) takes effect at once

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        refused = refusal(self._tokens.current, method, metadata_value(handler_call_details, AUTHORIZATION_KEY))
        handler = await continuation(handler_call_details)
        if refused is None or handler is None:
            return handler
        code, message = refused
        log.warning("refused %s: %s", method, code.name)
        return _refusing_handler(handler, code, message)


def _refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape (unary calls, and server streams such as Budget.WatchAlerts) that only aborts."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    streams = handler.unary_stream is not None
    make = grpc.unary_stream_rpc_method_handler if streams else grpc.unary_unary_rpc_method_handler
    return make(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )

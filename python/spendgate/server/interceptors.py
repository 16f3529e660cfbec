"""The outermost gRPC server interceptor: a request id for every call, and its latency and decision in the metrics.

For each unary call it wraps the handler (the servicers stay as they are: convert, call, convert):
1. the request id: the caller's `x-request-id` metadata, or a fresh one; set in spendgate.logs.request_id for the
   call's logs, and echoed back in the trailing metadata (also when the call fails).
2. the time to answer, and what the answer was: spendgate.server.metrics.decision_of reads the reply (granted,
   reason, over_reserved, ...); a call that failed counts as decision "error" with its status code as the reason.
Streaming calls (health Watch, reflection) pass through untouched.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc
import grpc.aio

from spendgate import logs
from spendgate.server.auth import metadata_value
from spendgate.server.metrics import Metrics, decision_of

log = logging.getLogger("spendgate.rpc")
# The request id from intercept_service to the wrapped handler: grpc.aio runs both in the call's task.
_incoming_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("spendgate_incoming_request_id", default="")

REQUEST_ID_KEY: Final[str] = "x-request-id"
# A caller's id longer than this, or not printable ASCII, is replaced by a fresh one (it goes into every log line).
MAX_REQUEST_ID_CHARS: Final[int] = 128


# Fresh ids: this process's random prefix and a counter. Unique per process and cheap (a uuid4 per call was a
# measurable part of an empty RPC's cost).
_ID_PREFIX: Final[str] = os.urandom(8).hex()
_id_counter = itertools.count(1)


def request_id_of(details: grpc.HandlerCallDetails) -> str:
    """The caller's x-request-id when it is usable, else a fresh one."""
    given = metadata_value(details, REQUEST_ID_KEY)
    if given and len(given) <= MAX_REQUEST_ID_CHARS and given.isascii() and given.isprintable():
        return given
    return f"{_ID_PREFIX}{next(_id_counter):016x}"  # 32 hex digits, as a uuid4 hex


class ObservingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio ships no type information
    """Wraps each unary method once (the wrapped handler is cached by the handler it wraps) and hands the call's
    request id to the wrapper through a context variable: per call, only the id and the metric update cost."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        _incoming_request_id.set(request_id_of(handler_call_details))
        cached = self._wrapped.get(id(handler))
        if cached is None or cached[0] is not handler:
            method = handler_call_details.method.rsplit("/", 1)[-1]
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._observed(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            cached = self._wrapped[id(handler)] = (handler, wrapped)
        return cached[1]

    def _observed(self, behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        metrics = self._metrics

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request_id = _incoming_request_id.get()
            token = logs.request_id.set(request_id)
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            started = time.perf_counter()
            decision, reason = "error", "unknown"
            try:
                reply = await behavior(request, context)
                decision, reason = decision_of(method, reply)
                return reply
            except BaseException:
                code = context.code()
                reason = code.name.lower() if isinstance(code, grpc.StatusCode) else "unknown"
                raise
            finally:
                elapsed_s = time.perf_counter() - started
                metrics.observe_call(method, decision, reason, elapsed_s)
                log.debug("%s: %s (%s) in %.3f ms", method, decision, reason, elapsed_s * 1000)
                logs.request_id.reset(token)

        return observed

"""The one place that turns an engine error into a gRPC status.

Every servicer method is wrapped with `@grpc_errors`: an EngineError aborts the call with the status its `kind` picks
and the engine's message (which already says what was wrong and how to fix it); anything else is a bug and aborts with
INTERNAL and a short message, logged with its traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, NoReturn, TypeAlias, TypeVar

import grpc
import grpc.aio

from spendgate._core import EngineError

log = logging.getLogger(__name__)

# Quoted: grpc.aio.ServicerContext is generic only in the type stubs.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

# EngineError.kind -> status code. The kinds are those documented in spendgate/_core.pyi.
STATUS_BY_KIND: Final[Mapping[str, grpc.StatusCode]] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}

INTERNAL_MESSAGE: Final[str] = "internal error in the spendgate sidecar; its log has the details"


def status_for(error: EngineError) -> grpc.StatusCode:
    """The status code for an engine error. An unknown kind is a bug in the engine: INTERNAL, logged."""
    code = STATUS_BY_KIND.get(error.kind)
    if code is None:
        log.error("EngineError with unknown kind %r (message %r): mapped to INTERNAL", error.kind, error.message)
        return grpc.StatusCode.INTERNAL
    return code


async def abort_with(context: Context, error: Exception, method: str) -> NoReturn:
    """Abort the call for `error`: an EngineError with its own status and message, anything else as INTERNAL."""
    if isinstance(error, EngineError):
        await context.abort(status_for(error), error.message)
    log.error("unexpected error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise AssertionError("context.abort returned")  # it always raises


Request = TypeVar("Request")
Reply = TypeVar("Reply")
Servicer = TypeVar("Servicer")
Handler: TypeAlias = Callable[[Servicer, Request, "Context"], Awaitable[Reply]]


def grpc_errors(handler: Handler[Servicer, Request, Reply]) -> Handler[Servicer, Request, Reply]:
    """Wrap a servicer method so that every exception it raises becomes a gRPC status (see abort_with)."""

    @functools.wraps(handler)
    async def wrapper(self: Servicer, request: Request, context: Context) -> Reply:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise  # the handler (or abort_with) already chose the status
        except Exception as error:  # noqa: BLE001 -- the one catch-all: every error gets a status
            await abort_with(context, error, handler.__qualname__)

    return wrapper

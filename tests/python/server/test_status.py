"""status: every EngineError kind aborts with its gRPC code and the engine's message; anything else is INTERNAL."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from spendgate import _core
from spendgate._core import Engine, EngineError
from spendgate.server import status
from spendgate.server.status import grpc_errors

CORE_STUB = Path(_core.__file__).with_name("_core.pyi")


class RecordingContext:
    """Records the status a handler aborts with; raises AbortError as grpc.aio's context does."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError()


class Handlers:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    @grpc_errors
    async def Call(self, request: str, context: Any) -> str:
        if self.error is not None:
            raise self.error
        return f"reply to {request}"


def call(error: BaseException | None) -> tuple[RecordingContext, str | None]:
    context = RecordingContext()

    async def body() -> str | None:
        try:
            return await Handlers(error).Call("request", context)
        except grpc.aio.AbortError:
            return None

    return context, asyncio.run(body())


def documented_kinds() -> list[str]:
    """The kinds listed in the EngineError docstring of _core.pyi."""
    text = CORE_STUB.read_text()
    listing = text[text.index("kind is one of:") : text.index("args == (kind, message)")]
    return re.findall(r'"([a-z_]+)"', listing)


def test_every_documented_kind_has_a_status_code() -> None:
    assert sorted(status.STATUS_BY_KIND) == sorted(documented_kinds())


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT),
        ("not_found", grpc.StatusCode.NOT_FOUND),
        ("already_exists", grpc.StatusCode.ALREADY_EXISTS),
        ("failed_precondition", grpc.StatusCode.FAILED_PRECONDITION),
        ("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("unavailable", grpc.StatusCode.UNAVAILABLE),
        ("internal", grpc.StatusCode.INTERNAL),
    ],
)
def test_engine_error_aborts_with_the_code_of_its_kind_and_its_message(kind: str, code: grpc.StatusCode) -> None:
    context, reply = call(EngineError(kind, f"what went wrong ({kind})"))
    assert reply is None
    assert context.code == code
    assert context.details == f"what went wrong ({kind})"


def test_a_real_engine_error_keeps_the_engine_message(tmp_path: Path) -> None:
    engine = Engine(str(tmp_path / "data"))
    try:
        with pytest.raises(EngineError) as caught:
            engine.balance("cus_nobody")
    finally:
        engine.close()
    context, _ = call(caught.value)
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert context.details == caught.value.message
    assert "cus_nobody" in context.details


def test_unknown_kind_is_internal() -> None:
    context, _ = call(EngineError("brand_new_kind", "from a newer engine"))
    assert context.code == grpc.StatusCode.INTERNAL


def test_unexpected_exception_is_internal_with_a_short_message_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger=status.__name__):
        context, _ = call(ZeroDivisionError("secret internals"))
    assert context.code == grpc.StatusCode.INTERNAL
    assert context.details == status.INTERNAL_MESSAGE
    assert "secret internals" not in (context.details or "")
    [record] = caplog.records
    assert "Handlers.Call" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError


def test_a_status_the_handler_chose_itself_passes_through() -> None:
    context, _ = call(grpc.aio.AbortError())
    assert context.code is None  # not re-aborted as INTERNAL


def test_a_successful_handler_returns_its_reply() -> None:
    context, reply = call(None)
    assert reply == "reply to request"
    assert context.code is None

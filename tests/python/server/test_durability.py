"""DurabilityWaiter: `await wait(ticket)` returns once the engine's writer made the ticket durable, never before.

Against a real Engine on a tmp dir, plus a scripted engine (a pipe and two numbers) for the orderings a real writer
cannot be made to produce on demand: a failure, a closed fd, a ticket far ahead.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from spendgate._core import Engine, EngineError
from spendgate.server.durability import DurabilityWaiter

T = TypeVar("T")
# A guard against a hang, not a timing assertion: every wait here resolves in milliseconds or is a bug.
HANG_GUARD_S = 30.0


def run(body: Callable[[], Awaitable[T]]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(body(), HANG_GUARD_S)

    return asyncio.run(guarded())


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = Engine(str(tmp_path / "data"))
    try:
        yield engine
    finally:
        engine.close()


class ScriptedEngine:
    """The three things DurabilityWaiter reads from an engine, set by the test."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.durable = 0
        self.failed: str | None = None

    def notify_fd(self) -> int:
        return self.read_fd

    def durable_ticket(self) -> int:
        return self.durable

    def failure(self) -> str | None:
        return self.failed

    def advance(self, ticket: int) -> None:
        self.durable = ticket
        os.write(self.write_fd, b"x")

    def fail(self, why: str) -> None:
        self.failed = why
        os.write(self.write_fd, b"x")

    def close_writer(self) -> None:
        os.close(self.write_fd)
        self.write_fd = -1  # never close a number the kernel may have handed out again

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def scripted() -> Iterator[ScriptedEngine]:
    engine = ScriptedEngine()
    try:
        yield engine
    finally:
        engine.close()


def waiter_for(engine: Any, on_failure: Callable[[str], None] | None = None) -> DurabilityWaiter:
    return DurabilityWaiter(engine, on_failure=on_failure)


async def until_pending(waiter: DurabilityWaiter, count: int) -> None:
    while waiter.pending_count < count:
        await asyncio.sleep(0)


# -- with the real engine ----------------------------------------------------------------------------------------------


def test_ticket_zero_returns_at_once(engine: Engine) -> None:
    async def body() -> None:
        waiter = waiter_for(engine)
        await waiter.wait(0)
        assert waiter.pending_count == 0
        waiter.close()

    run(body)


def test_wait_returns_once_the_change_is_durable(engine: Engine) -> None:
    async def body() -> None:
        waiter = waiter_for(engine)
        ticket = engine.set_budget("cus_a", 100).ticket
        assert ticket > 0
        await waiter.wait(ticket)
        assert engine.durable_ticket() >= ticket
        waiter.close()

    run(body)


def test_many_concurrent_waiters_all_resolve(engine: Engine) -> None:
    async def body() -> None:
        waiter = waiter_for(engine)
        tickets = [engine.set_budget(f"cus_{i}", 100).ticket for i in range(200)]
        await asyncio.gather(*(waiter.wait(t) for t in tickets))
        assert engine.durable_ticket() >= max(tickets)
        assert waiter.pending_count == 0
        waiter.close()

    run(body)


def test_an_already_durable_ticket_does_not_wait(engine: Engine) -> None:
    async def body() -> None:
        waiter = waiter_for(engine)
        ticket = engine.set_budget("cus_a", 100).ticket
        engine.wait_durable(ticket)
        await waiter.wait(ticket)
        assert waiter.pending_count == 0
        waiter.close()

    run(body)


def test_close_cancels_waiters_and_later_waits_fail_unavailable(engine: Engine) -> None:
    async def body() -> None:
        waiter = waiter_for(engine)
        far_ahead = engine.durable_ticket() + 1_000_000
        task = asyncio.ensure_future(waiter.wait(far_ahead))
        await until_pending(waiter, 1)
        waiter.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(EngineError) as caught:
            await waiter.wait(far_ahead)
        assert caught.value.kind == "unavailable"

    run(body)


# -- with a scripted engine --------------------------------------------------------------------------------------------


def test_waiters_resolve_in_ticket_order_as_the_durable_ticket_advances(scripted: ScriptedEngine) -> None:
    async def body() -> None:
        waiter = waiter_for(scripted)
        tasks = {t: asyncio.ensure_future(waiter.wait(t)) for t in (3, 1, 2, 5)}
        await until_pending(waiter, 4)
        scripted.advance(2)
        await asyncio.gather(tasks[1], tasks[2])
        assert not tasks[3].done() and not tasks[5].done()
        assert waiter.pending_count == 2
        scripted.advance(5)
        await asyncio.gather(tasks[3], tasks[5])
        assert waiter.pending_count == 0
        waiter.close()

    run(body)


def test_a_cancelled_waiter_does_not_disturb_the_others(scripted: ScriptedEngine) -> None:
    async def body() -> None:
        waiter = waiter_for(scripted)
        cancelled = asyncio.ensure_future(waiter.wait(1))
        kept = asyncio.ensure_future(waiter.wait(2))
        await until_pending(waiter, 2)
        cancelled.cancel()
        scripted.advance(2)
        await kept
        assert cancelled.cancelled()
        waiter.close()

    run(body)


def test_writer_failure_fails_waiters_not_yet_durable_and_resolves_the_durable_ones(scripted: ScriptedEngine) -> None:
    async def body() -> None:
        failures: list[str] = []
        waiter = waiter_for(scripted, on_failure=failures.append)
        durable = asyncio.ensure_future(waiter.wait(1))
        lost = asyncio.ensure_future(waiter.wait(2))
        await until_pending(waiter, 2)
        scripted.durable = 1
        scripted.fail("disk full")
        await durable
        with pytest.raises(EngineError) as caught:
            await lost
        assert caught.value.kind == "unavailable"
        assert "disk full" in caught.value.message
        assert failures == ["disk full"]
        with pytest.raises(EngineError):  # failure is final: later waits fail at once
            await waiter.wait(3)
        waiter.close()

    run(body)


def test_a_failure_before_the_waiter_starts_is_seen_at_once(scripted: ScriptedEngine) -> None:
    async def body() -> None:
        scripted.fail("writer died early")
        failures: list[str] = []
        waiter = waiter_for(scripted, on_failure=failures.append)
        assert failures == ["writer died early"]
        with pytest.raises(EngineError):
            await waiter.wait(1)
        waiter.close()

    run(body)


def test_end_of_file_on_the_fd_fails_waiters_and_stops_watching(scripted: ScriptedEngine) -> None:
    async def body() -> None:
        waiter = waiter_for(scripted)
        task = asyncio.ensure_future(waiter.wait(1))
        await until_pending(waiter, 1)
        scripted.close_writer()  # the engine went away without a failure
        with pytest.raises(EngineError) as caught:
            await task
        assert caught.value.kind == "unavailable"
        waiter.close()

    run(body)


def test_a_burst_of_wakeups_is_drained(scripted: ScriptedEngine) -> None:
    async def body() -> None:
        waiter = waiter_for(scripted)
        task = asyncio.ensure_future(waiter.wait(10_000))
        await until_pending(waiter, 1)
        for ticket in range(1, 10_001):
            scripted.durable = ticket
            os.write(scripted.write_fd, b"x")  # 10 000 bytes: more than one drain's worth of reads
        await task
        waiter.close()

    run(body)

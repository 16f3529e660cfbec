"""Wait for the engine's group-commit writer from asyncio, without a thread per waiter.

A change returns a durability ticket at once; its reply may leave only once `engine.durable_ticket() >= ticket`. The
engine makes `notify_fd()` readable whenever the durable ticket advances or the writer fails. One reader callback on the
event loop drains the fd and resolves, in ticket order from a heap, every waiter whose change is now durable. So a
thousand in-flight Commits cost a thousand futures, not a thousand blocked threads.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
from collections.abc import Callable
from typing import Final

from spendgate._core import Engine, EngineError

log = logging.getLogger(__name__)

# The fd is a pipe with a byte per wake-up. Read it in chunks, a bounded number per wake-up: if the writer keeps
# writing, the fd stays readable and the loop calls us again after serving others.
DRAIN_CHUNK_BYTES: Final[int] = 4096
DRAIN_READS_MAX: Final[int] = 64


class DurabilityWaiter:
    """Resolves `await wait(ticket)` once the engine says `ticket` is durable. Create it on the running loop;
    close it before the engine closes (the engine's fd goes away with it)."""

    def __init__(self, engine: Engine, on_failure: Callable[[str], None] | None = None) -> None:
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._fd = engine.notify_fd()
        assert self._fd >= 0, self._fd
        self._on_failure = on_failure
        # (ticket, sequence, future): the sequence breaks ties so that futures are never compared.
        self._pending: list[tuple[int, int, asyncio.Future[None]]] = []
        self._sequence = itertools.count()
        self._durable_ticket = engine.durable_ticket()
        self._failure: str | None = None
        self._listeners: list[Callable[[], None]] = []
        self._reading = True
        self._loop.add_reader(self._fd, self._on_readable)
        # The engine may have advanced or failed before we started watching: look once now, not at the next wake-up.
        self._on_readable()

    @property
    def pending_count(self) -> int:
        """Waiters not yet resolved (cancelled ones count until their ticket passes)."""
        return len(self._pending)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` on the loop after every wake-up of the writer, once its waiters are resolved (the alert
        hub looks for new alerts then). It must be cheap and must not raise."""
        self._listeners.append(listener)

    async def wait(self, ticket: int) -> None:
        """Return once `ticket` is durable; at once for ticket 0 (nothing to wait for). Raises EngineError
        ("unavailable") if the writer fails first or the waiter closes."""
        assert ticket >= 0, ticket
        if ticket == 0:
            return
        if self._failure is not None:
            raise EngineError("unavailable", self._failure_message())
        if not self._reading:
            raise EngineError("unavailable", "the sidecar is shutting down; retry against the restarted sidecar")
        # Read the engine, not our cache: the writer may have advanced since the last wake-up, and the wake-up for it
        # runs only after us (we are on the loop thread), so a future pushed now still gets resolved.
        if ticket <= self._engine.durable_ticket():
            return
        future: asyncio.Future[None] = self._loop.create_future()
        heapq.heappush(self._pending, (ticket, next(self._sequence), future))
        await future

    def close(self) -> None:
        """Stop watching the fd and cancel whoever still waits. Idempotent."""
        self._stop_reading()
        while self._pending:
            _, _, future = heapq.heappop(self._pending)
            future.cancel()

    def _on_readable(self) -> None:
        at_eof = not self._drain()
        durable_ticket = self._engine.durable_ticket()
        assert durable_ticket >= self._durable_ticket, (durable_ticket, self._durable_ticket)
        self._durable_ticket = durable_ticket
        # Changes made durable before a failure are still acknowledged: resolve first, then fail the rest.
        while self._pending and self._pending[0][0] <= durable_ticket:
            _, _, future = heapq.heappop(self._pending)
            if not future.done():  # a cancelled RPC leaves a cancelled future behind
                future.set_result(None)
        for listener in self._listeners:
            listener()
        failure = self._engine.failure()
        if failure is not None and self._failure is None:
            self._fail(failure)
        elif at_eof:
            # The engine closed its end (it was closed under us). Without removing the reader the loop would spin.
            self._stop_reading()
            self._fail_pending("the engine closed; retry against the restarted sidecar")

    def _drain(self) -> bool:
        """Empty the pipe. False when it reached EOF."""
        for _ in range(DRAIN_READS_MAX):
            try:
                chunk = os.read(self._fd, DRAIN_CHUNK_BYTES)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            if len(chunk) < DRAIN_CHUNK_BYTES:
                return True
        return True

    def _fail(self, failure: str) -> None:
        self._failure = failure
        log.critical("the engine's writer failed: %s; failing %d waiting calls", failure, len(self._pending))
        # Failure is final: every later call raises before it gets a ticket, so nothing is left to watch.
        self._stop_reading()
        self._fail_pending(self._failure_message())
        if self._on_failure is not None:
            self._on_failure(failure)

    def _fail_pending(self, message: str) -> None:
        while self._pending:
            _, _, future = heapq.heappop(self._pending)
            if not future.done():
                # One exception per waiter: raising one object in many tasks would tangle their tracebacks.
                future.set_exception(EngineError("unavailable", message))

    def _failure_message(self) -> str:
        return (
            f"the sidecar's storage writer failed ({self._failure}); the change may not be durable:"
            " retry against the restarted sidecar"
        )

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

"""Clients that reserve and commit as fast as they can until the server goes away, and the bookkeeping that says
what must be on the books afterwards."""

from __future__ import annotations

import itertools
import random
import threading
from dataclasses import dataclass, field

import grpc

from ._support import LONG_TTL_MS, Conn, wait_until

BURST_CLIENTS = 12
HUGE_LIMIT = 10**12  # the bursts never run out of budget: every Reserve is granted


@dataclass
class Books:
    """What the clients were told before the kill, and what they were still waiting for."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked_commits: dict[str, tuple[int, object]] = field(default_factory=dict)  # reservation_id -> (amount, reply)
    open_holds: dict[str, int] = field(default_factory=dict)  # Reserve acknowledged, no Commit sent yet
    inflight_commits: dict[str, tuple[int, int]] = field(default_factory=dict)  # reservation_id -> (amount, hold)
    inflight_reserves: dict[int, int] = field(default_factory=dict)  # token -> amount
    acked_reserves: int = 0
    errors: list[tuple[bool, str]] = field(default_factory=list)  # (after the kill began?, what)
    tokens: itertools.count = field(default_factory=itertools.count)

    def sum_acked(self) -> int:
        return sum(amount for amount, _ in self.acked_commits.values())


@dataclass
class Burst:
    """Clients that reserve and commit as fast as they can on one budget until the server dies."""

    target: str
    customer: str
    seed: int
    keep_hold_probability: float = 0.2
    books: Books = field(default_factory=Books)
    killing: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        conns = [Conn(self.target) for _ in range(BURST_CLIENTS)]
        for i, conn in enumerate(conns):
            t = threading.Thread(target=self._client, args=(conn, random.Random(self.seed * 1000 + i)), daemon=True)
            self.threads.append(t)
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a burst client is still running after the kill"
        unexpected = [what for after_kill, what in self.books.errors if not after_kill]
        assert not unexpected, f"requests failed before the kill: {unexpected[:3]}"

    def _client(self, conn: Conn, rng: random.Random) -> None:
        books = self.books
        try:
            while True:
                amount = rng.randint(1, 50)
                with books.lock:
                    token = next(books.tokens)
                    books.inflight_reserves[token] = amount
                reply = conn.reserve(self.customer, amount, ttl_ms=LONG_TTL_MS)
                assert reply.granted, reply
                with books.lock:
                    del books.inflight_reserves[token]
                    books.open_holds[reply.reservation_id] = amount
                    books.acked_reserves += 1
                if rng.random() < self.keep_hold_probability:
                    continue
                actual = rng.randint(0, amount)
                with books.lock:
                    books.inflight_commits[reply.reservation_id] = (actual, books.open_holds.pop(reply.reservation_id))
                committed = conn.commit(reply.reservation_id, actual)
                assert committed.charged == actual and not committed.replayed, committed
                with books.lock:
                    del books.inflight_commits[reply.reservation_id]
                    books.acked_commits[reply.reservation_id] = (actual, committed)
        except grpc.RpcError as err:
            books.errors.append((self.killing.is_set(), f"{err.code().name}: {err.details()}"))
        except AssertionError as err:
            books.errors.append((False, f"wrong reply: {err}"))
        finally:
            conn.close()

    def wait_for(self, *, acked_commits: int = 0, acked_reserves: int = 0) -> None:
        def progress() -> tuple[int, int, int]:
            with self.books.lock:
                return len(self.books.acked_commits), self.books.acked_reserves, len(self.books.errors)

        wait_until(
            progress,
            lambda p: (p[0] >= acked_commits and p[1] >= acked_reserves) or p[2] > 0,
            what=f"{acked_commits} acknowledged commits and {acked_reserves} acknowledged reserves",
            deadline_s=60,
        )

    def kill(self, sidecar) -> None:
        """SIGKILL the server under the burst."""
        self.killing.set()
        sidecar.kill9()

    def terminate(self, sidecar) -> int:
        """SIGTERM the server under the burst; its exit code."""
        self.killing.set()
        return sidecar.terminate()


def check_books_after_restart(before: dict, after: dict, books: Books) -> None:
    """`before` is the balance when the burst started; `after` the balance after the restart."""
    with books.lock:
        acked = books.sum_acked()
        inflight_commit_units = sum(amount for amount, _ in books.inflight_commits.values())
        inflight_commit_holds = sum(hold for _, hold in books.inflight_commits.values())
        open_units = sum(books.open_holds.values())
        inflight_reserve_units = sum(books.inflight_reserves.values())
        n_open, n_inflight = len(books.open_holds), len(books.inflight_commits) + len(books.inflight_reserves)
    lo_spent = before["spent"] + acked
    assert lo_spent <= after["spent"] <= lo_spent + inflight_commit_units, (
        f"spent {after['spent']} outside [{lo_spent}, {lo_spent + inflight_commit_units}]: "
        f"{len(books.acked_commits)} acknowledged commits of {acked} units, {inflight_commit_units} units in flight"
    )
    lo_reserved = before["reserved"] + open_units
    hi_reserved = lo_reserved + inflight_commit_holds + inflight_reserve_units
    assert lo_reserved <= after["reserved"] <= hi_reserved, (
        f"reserved {after['reserved']} outside [{lo_reserved}, {hi_reserved}]: acknowledged holds must survive"
    )
    lo_holds = before["active_holds"] + n_open
    assert lo_holds <= after["active_holds"] <= lo_holds + n_inflight, (
        f"active_holds {after['active_holds']} outside [{lo_holds}, {lo_holds + n_inflight}]"
    )
    assert after["limit"] == before["limit"]

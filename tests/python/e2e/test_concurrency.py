"""Reserve is atomic: concurrent clients can never hold past a budget's limit, and none of the limit is lost.

Every client is a thread with its own gRPC channel (its own TCP connection) to one real server process.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from ._support import (
    INSUFFICIENT,
    LONG_TTL_MS,
    Conn,
    Tally,
    assert_balance_consistent,
    counters,
    new_customer,
)

N_CLIENTS = 64


def run_clients(target: str, n: int, work: Callable[[int, Conn], Any]) -> list[Any]:
    """Run `work(i, conn)` in n threads, each with its own channel, released together by a barrier."""
    conns = [Conn(target) for _ in range(n)]
    start = threading.Barrier(n)

    def client(i: int) -> Any:
        start.wait(timeout=60)
        return work(i, conns[i])

    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(client, i) for i in range(n)]
            return [f.result(timeout=300) for f in futures]
    finally:
        for conn in conns:
            conn.close()


def reserve_until_denied(customer: str, amount: int) -> Callable[[int, Conn], tuple[list[str], Any]]:
    def work(_i: int, conn: Conn) -> tuple[list[str], Any]:
        granted: list[str] = []
        while True:
            reply = conn.reserve(customer, amount, ttl_ms=LONG_TTL_MS)
            if not reply.granted:
                return granted, reply
            assert reply.amount == amount and reply.reservation_id, reply
            granted.append(reply.reservation_id)

    return work


def test_64_clients_never_overspend_one_budget(sidecar):
    customer = new_customer("race7")
    limit, amount = 1000, 7
    with Conn(sidecar.target) as admin:
        admin.set_budget(customer, limit)

    results = run_clients(sidecar.target, N_CLIENTS, reserve_until_denied(customer, amount))

    ids = [rid for granted, _ in results for rid in granted]
    assert len(ids) == len(set(ids)), "two grants got the same reservation_id"
    assert len(ids) * amount == limit - limit % amount  # 142 holds of 7 = 994: nothing over, nothing lost
    for _granted, denial in results:
        # Availability only shrinks here, so every client's final denial saw exactly the 6 units that cannot fit.
        assert denial.reason == INSUFFICIENT, denial
        assert denial.remaining == limit % amount, denial
        assert not denial.reservation_id, denial
    with Conn(sidecar.target) as conn:
        balance = conn.balance(customer)
    assert_balance_consistent(balance)
    assert (balance.limit, balance.spent, balance.reserved, balance.remaining, balance.active_holds) == (
        limit,
        0,
        len(ids) * amount,
        limit % amount,
        len(ids),
    )


def test_64_clients_get_exactly_the_limit_in_unit_reservations(sidecar):
    customer = new_customer("race1")
    limit = 640
    with Conn(sidecar.target) as admin:
        admin.set_budget(customer, limit)

    results = run_clients(sidecar.target, N_CLIENTS, reserve_until_denied(customer, 1))

    ids = [rid for granted, _ in results for rid in granted]
    assert len(ids) == limit, f"{len(ids)} unit holds granted on a limit of {limit}"
    assert len(set(ids)) == limit
    for _granted, denial in results:
        assert denial.reason == INSUFFICIENT and denial.remaining == 0, denial
    with Conn(sidecar.target) as conn:
        balance = conn.balance(customer)
    assert_balance_consistent(balance)
    assert (balance.reserved, balance.remaining, balance.active_holds) == (limit, 0, limit)


def test_racing_reserve_commit_release_across_budgets_keeps_the_books_exact(sidecar):
    """64 clients reserve, commit (sometimes more than the hold) and release on 4 budgets, while the operator raises
    limits and a watcher reads balances. Every acknowledged commit is in `spent` exactly; the overdraft is the sum of
    the reported excesses; no snapshot ever shows spent + reserved past limit + overdraft."""
    customers = [new_customer(f"mix{i}") for i in range(4)]
    initial_limit, raise_step, raises = 4000, 100, 5
    ops_per_client = 30
    with Conn(sidecar.target) as admin:
        for c in customers:
            admin.set_budget(c, initial_limit)

    charged, excess, grants = Tally(), Tally(), Tally()
    done = threading.Event()
    snapshot_errors: list[str] = []

    def client(i: int, conn: Conn) -> None:
        rng = random.Random(1000 + i)
        for _ in range(ops_per_client):
            customer = rng.choice(customers)
            reply = conn.reserve(customer, rng.randint(1, 40), ttl_ms=LONG_TTL_MS)
            if not reply.granted:
                assert reply.reason == INSUFFICIENT, reply
                continue
            grants.add(customer, 1)
            roll = rng.random()
            if roll < 0.30:
                released = conn.release(reply.reservation_id)
                assert released.released and not released.replayed, released
                continue
            actual = rng.randint(0, reply.amount) if roll < 0.95 else reply.amount + rng.randint(1, 10)
            committed = conn.commit(reply.reservation_id, actual)
            assert committed.charged == actual and not committed.replayed, committed
            assert committed.over_reserved == (actual > reply.amount), committed
            charged.add(customer, committed.charged)
            excess.add(customer, committed.excess)

    def watcher() -> None:
        with Conn(sidecar.target) as conn:
            while not done.is_set():
                for c in customers:
                    try:
                        assert_balance_consistent(conn.balance(c), quiescent=False)
                    except AssertionError as err:
                        snapshot_errors.append(str(err))
                    except grpc.RpcError as err:
                        snapshot_errors.append(f"GetBalance failed: {err.code().name} {err.details()}")

    def operator() -> None:
        try:
            with Conn(sidecar.target) as conn:
                for step in range(1, raises + 1):
                    # Spread the raises over the race: each waits for another 200 grants (or the end of the race).
                    while sum(grants.get(c) for c in customers) < step * 200 and not done.is_set():
                        time.sleep(0.005)
                    for c in customers:
                        reply = conn.set_budget(c, initial_limit + step * raise_step)
                        assert not reply.created and reply.balance.limit == initial_limit + step * raise_step, reply
        except (AssertionError, grpc.RpcError) as err:
            snapshot_errors.append(f"SetBudget during the race: {err!r}")

    background = [threading.Thread(target=watcher), threading.Thread(target=operator)]
    for t in background:
        t.start()
    try:
        run_clients(sidecar.target, N_CLIENTS, client)
    finally:
        done.set()
        for t in background:
            t.join(timeout=60)

    assert not snapshot_errors, f"{len(snapshot_errors)} inconsistent balance snapshots, first: {snapshot_errors[0]}"
    assert sum(grants.get(c) for c in customers) > 0
    with Conn(sidecar.target) as conn:
        for c in customers:
            balance = conn.balance(c)
            assert_balance_consistent(balance)
            assert balance.limit == initial_limit + raises * raise_step
            assert balance.spent == charged.get(c), f"{c}: spent {balance.spent} != acknowledged {charged.get(c)}"
            assert balance.overdraft == excess.get(c), f"{c}: overdraft {balance.overdraft} != excess {excess.get(c)}"
            assert (balance.reserved, balance.active_holds) == (0, 0), counters(balance)

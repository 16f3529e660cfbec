"""Retries are safe: a repeated Reserve (same idempotency_key), Commit or Release gets the same answer again, flagged
replayed, and changes nothing. A retry that contradicts the first request is an error and changes nothing."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from ._support import ACTIVE, COMMITTED, LONG_TTL_MS, RELEASED, Conn, counters, expect_rpc_error, new_customer

RACERS = 16


def _budget(conn: Conn, limit: int = 1000) -> str:
    customer = new_customer("idem")
    conn.set_budget(customer, limit)
    return customer


def test_reserve_retry_with_the_same_key_and_amount_returns_the_same_hold(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        first = conn.reserve(customer, 100, idempotency_key="req-1", ttl_ms=LONG_TTL_MS)
        assert first.granted and not first.replayed
        retry = conn.reserve(customer, 100, idempotency_key="req-1", ttl_ms=LONG_TTL_MS)
        assert retry.granted and retry.replayed and retry.state == ACTIVE, retry
        assert retry.reservation_id == first.reservation_id
        for name in ("amount", "expires_at_ms", "remaining"):
            assert getattr(retry, name) == getattr(first, name), (name, first, retry)
        balance = conn.balance(customer)
        assert (balance.reserved, balance.active_holds) == (100, 1), "a retry must not take a second hold"


def test_reserve_retry_with_the_same_key_and_another_amount_is_already_exists(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        first = conn.reserve(customer, 100, idempotency_key="req-1", ttl_ms=LONG_TTL_MS)
        before = counters(conn.balance(customer))
        expect_rpc_error(grpc.StatusCode.ALREADY_EXISTS, conn.reserve, customer, 101, "req-1", LONG_TTL_MS)
        assert counters(conn.balance(customer)) == before
        # The key still maps to the first reservation.
        again = conn.reserve(customer, 100, idempotency_key="req-1", ttl_ms=LONG_TTL_MS)
        assert again.replayed and again.reservation_id == first.reservation_id


def test_idempotency_keys_are_per_customer(sidecar):
    with Conn(sidecar.target) as conn:
        a, b = _budget(conn), _budget(conn)
        on_a = conn.reserve(a, 10, idempotency_key="shared-key", ttl_ms=LONG_TTL_MS)
        on_b = conn.reserve(b, 20, idempotency_key="shared-key", ttl_ms=LONG_TTL_MS)
        assert on_a.granted and on_b.granted and not on_a.replayed and not on_b.replayed
        assert on_a.reservation_id != on_b.reservation_id
        assert conn.balance(a).reserved == 10 and conn.balance(b).reserved == 20


def test_reserve_retry_after_the_hold_was_committed_replays_without_a_new_hold(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        first = conn.reserve(customer, 100, idempotency_key="req-1", ttl_ms=LONG_TTL_MS)
        conn.commit(first.reservation_id, 60)
        before = counters(conn.balance(customer))
        retry = conn.reserve(customer, 100, idempotency_key="req-1", ttl_ms=LONG_TTL_MS)
        assert retry.replayed and retry.reservation_id == first.reservation_id, retry
        assert retry.state == COMMITTED, "a replay reports what became of the hold"
        assert counters(conn.balance(customer)) == before, "a late retry must not hold the amount again"


def test_reserve_retry_after_the_hold_was_released_replays_its_state(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        first = conn.reserve(customer, 100, idempotency_key="req-1", ttl_ms=LONG_TTL_MS)
        conn.release(first.reservation_id)
        before = counters(conn.balance(customer))
        retry = conn.reserve(customer, 100, idempotency_key="req-1", ttl_ms=LONG_TTL_MS)
        assert retry.replayed and retry.reservation_id == first.reservation_id and retry.state == RELEASED, retry
        assert counters(conn.balance(customer)) == before


def test_an_empty_idempotency_key_means_no_deduplication(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        one = conn.reserve(customer, 10, ttl_ms=LONG_TTL_MS)
        two = conn.reserve(customer, 10, ttl_ms=LONG_TTL_MS)
        assert not one.replayed and not two.replayed and one.reservation_id != two.reservation_id
        assert conn.balance(customer).active_holds == 2


def test_commit_retry_returns_the_same_reply_and_charges_once(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        hold = conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS)
        first = conn.commit(hold.reservation_id, 80)
        assert not first.replayed and first.charged == 80
        after_first = counters(conn.balance(customer))
        retry = conn.commit(hold.reservation_id, 80)
        assert retry.replayed, retry
        for name in ("charged", "remaining", "over_reserved", "excess", "hold_expired"):
            assert getattr(retry, name) == getattr(first, name), f"replayed Commit changed {name}: {first} vs {retry}"
        assert counters(conn.balance(customer)) == after_first
        assert after_first["spent"] == 80


def test_over_reserved_commit_retry_repeats_the_excess_without_adding_overdraft(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn, limit=100)
        hold = conn.reserve(customer, 90, ttl_ms=LONG_TTL_MS)
        first = conn.commit(hold.reservation_id, 150)
        assert (first.over_reserved, first.excess) == (True, 50), first
        retry = conn.commit(hold.reservation_id, 150)
        assert retry.replayed and (retry.over_reserved, retry.excess, retry.charged) == (True, 50, 150), retry
        balance = conn.balance(customer)
        assert (balance.spent, balance.overdraft) == (150, 50)


def test_commit_with_another_amount_after_a_commit_is_failed_precondition(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        hold = conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS)
        conn.commit(hold.reservation_id, 80)
        before = counters(conn.balance(customer))
        for other in (0, 79, 81, 100):
            expect_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, conn.commit, hold.reservation_id, other)
        assert counters(conn.balance(customer)) == before


def test_release_retry_returns_the_same_reply_and_frees_once(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        keep = conn.reserve(customer, 300, ttl_ms=LONG_TTL_MS)
        hold = conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS)
        first = conn.release(hold.reservation_id)
        assert first.released and not first.replayed and first.state == RELEASED and first.remaining == 700, first
        after_first = counters(conn.balance(customer))
        retry = conn.release(hold.reservation_id)
        assert retry.replayed and retry.released and retry.state == first.state, retry
        assert retry.remaining == first.remaining
        assert counters(conn.balance(customer)) == after_first
        assert (after_first["reserved"], after_first["active_holds"]) == (300, 1)
        assert keep.granted


def test_release_after_commit_is_failed_precondition(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        hold = conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS)
        conn.commit(hold.reservation_id, 40)
        before = counters(conn.balance(customer))
        expect_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, conn.release, hold.reservation_id)
        assert counters(conn.balance(customer)) == before


def test_commit_after_release_is_failed_precondition(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        hold = conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS)
        conn.release(hold.reservation_id)
        before = counters(conn.balance(customer))
        for amount in (0, 40, 100):
            expect_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, conn.commit, hold.reservation_id, amount)
        assert counters(conn.balance(customer)) == before


def test_concurrent_retries_of_one_reserve_take_exactly_one_hold(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
    conns = [Conn(sidecar.target) for _ in range(RACERS)]
    start = threading.Barrier(RACERS)

    def retry(c: Conn):
        start.wait(timeout=30)
        return c.reserve(customer, 50, idempotency_key="the-one", ttl_ms=LONG_TTL_MS)

    try:
        with ThreadPoolExecutor(RACERS) as pool:
            replies = list(pool.map(retry, conns))
    finally:
        for c in conns:
            c.close()
    assert all(r.granted for r in replies)
    assert len({r.reservation_id for r in replies}) == 1, "concurrent retries got different reservations"
    assert sum(not r.replayed for r in replies) == 1, "exactly one of the concurrent retries is the original"
    with Conn(sidecar.target) as conn:
        balance = conn.balance(customer)
    assert (balance.reserved, balance.active_holds) == (50, 1)


def test_concurrent_retries_of_one_commit_charge_exactly_once(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        hold = conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS)
    conns = [Conn(sidecar.target) for _ in range(RACERS)]
    start = threading.Barrier(RACERS)

    def retry(c: Conn):
        start.wait(timeout=30)
        return c.commit(hold.reservation_id, 70)

    try:
        with ThreadPoolExecutor(RACERS) as pool:
            replies = list(pool.map(retry, conns))
    finally:
        for c in conns:
            c.close()
    assert all(r.charged == 70 for r in replies)
    assert sum(not r.replayed for r in replies) == 1, "exactly one of the concurrent commits is the original"
    with Conn(sidecar.target) as conn:
        balance = conn.balance(customer)
    assert (balance.spent, balance.reserved, balance.active_holds) == (70, 0, 0)


def test_concurrent_commit_and_release_of_one_hold_resolve_it_exactly_once(sidecar):
    with Conn(sidecar.target) as conn:
        customer = _budget(conn)
        holds = [conn.reserve(customer, 10, ttl_ms=LONG_TTL_MS).reservation_id for _ in range(20)]
    conns = [Conn(sidecar.target) for _ in range(2)]
    outcomes: list[tuple[str, str]] = []

    def race(rid: str) -> None:
        start = threading.Barrier(2)

        def commit() -> None:
            start.wait(timeout=30)
            try:
                conns[0].commit(rid, 7)
                outcomes.append((rid, "committed"))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
                outcomes.append((rid, "commit refused"))

        def release() -> None:
            start.wait(timeout=30)
            try:
                conns[1].release(rid)
                outcomes.append((rid, "released"))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
                outcomes.append((rid, "release refused"))

        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(commit), pool.submit(release)]:
                f.result(timeout=60)

    try:
        for rid in holds:
            race(rid)
    finally:
        for c in conns:
            c.close()
    committed = 0
    for rid in holds:
        mine = sorted(o for r, o in outcomes if r == rid)
        assert mine in (["commit refused", "released"], ["committed", "release refused"]), (rid, mine)
        committed += "committed" in mine
    with Conn(sidecar.target) as conn:
        balance = conn.balance(customer)
    assert (balance.spent, balance.reserved, balance.active_holds) == (7 * committed, 0, 0)

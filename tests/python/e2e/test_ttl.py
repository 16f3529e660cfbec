"""Holds expire: the server reclaims a hold after its ttl_ms by itself (no client call needed), a late Commit is still
recorded in full (the LLM call happened), and a late Release reports EXPIRED.

Waits are bounded polls of GetBalance (at most 10 s), never timing assertions."""

from __future__ import annotations

import grpc

from ._support import (
    EXPIRED,
    LONG_TTL_MS,
    Conn,
    assert_balance_consistent,
    counters,
    expect_rpc_error,
    new_customer,
    now_ms,
    wait_until,
)

# expires_at_ms is a wall-clock time from the same machine; allow for rounding and a slow reply.
CLOCK_SLOP_MS = 1000


def wait_reclaimed(conn: Conn, customer: str, reserved: int = 0):
    return wait_until(
        lambda: conn.balance(customer),
        lambda b: b.reserved == reserved,
        what=f"{customer}'s reserved to drop to {reserved}",
    )


def test_a_hold_expires_after_its_ttl_and_frees_the_budget(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("ttl")
        conn.set_budget(customer, 100)
        t0 = now_ms()
        hold = conn.reserve(customer, 80, ttl_ms=300)
        t1 = now_ms()
        assert hold.granted
        assert t0 + 300 - CLOCK_SLOP_MS <= hold.expires_at_ms <= t1 + 300 + CLOCK_SLOP_MS, (t0, hold.expires_at_ms, t1)
        balance = wait_reclaimed(conn, customer)
        assert_balance_consistent(balance)
        assert (balance.spent, balance.reserved, balance.active_holds, balance.remaining) == (0, 0, 0, 100)
        assert conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS).granted, "the expired hold's units are available again"


def test_server_flags_set_the_default_and_the_maximum_ttl(sidecar_factory):
    sc = sidecar_factory(extra_args=("--default-ttl-ms", "400", "--max-ttl-ms", "5000", "--reap-interval-ms", "20"))
    with Conn(sc.target) as conn:
        customer = new_customer("ttl-flags")
        conn.set_budget(customer, 1000)

        t0 = now_ms()
        default = conn.reserve(customer, 10, ttl_ms=0)
        t1 = now_ms()
        assert default.granted
        assert t0 + 400 - CLOCK_SLOP_MS <= default.expires_at_ms <= t1 + 400 + CLOCK_SLOP_MS, "ttl_ms=0: the default"

        before = counters(conn.balance(customer))
        expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, conn.reserve, customer, 10, "", 5001, mentions="ttl_ms")
        assert counters(conn.balance(customer)) == before, "a rejected Reserve must not hold anything"

        t0 = now_ms()
        longest = conn.reserve(customer, 20, ttl_ms=5000)
        t1 = now_ms()
        assert longest.granted, "ttl_ms equal to the maximum is allowed"
        assert t0 + 5000 - CLOCK_SLOP_MS <= longest.expires_at_ms <= t1 + 5000 + CLOCK_SLOP_MS

        balance = wait_reclaimed(conn, customer, reserved=20)
        assert balance.active_holds == 1, "the default-ttl hold expired, the 5 s one is still open"
        assert conn.commit(longest.reservation_id, 20).hold_expired is False


def test_commit_after_expiry_is_recorded_in_full_and_flagged(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("late")
        conn.set_budget(customer, 100)
        hold = conn.reserve(customer, 60, ttl_ms=200)
        wait_reclaimed(conn, customer)
        other = conn.reserve(customer, 80, ttl_ms=LONG_TTL_MS)
        assert other.granted, "the expired hold's units were given back"

        late = conn.commit(hold.reservation_id, 60)
        assert late.hold_expired and late.charged == 60 and not late.replayed, late
        # spent + reserved went from 80 to 140 on a limit of 100: 40 past the limit, recorded and flagged.
        assert late.excess == 40 and late.remaining == 0, late
        balance = conn.balance(customer)
        assert_balance_consistent(balance)
        assert (balance.spent, balance.reserved, balance.overdraft, balance.active_holds) == (60, 80, 40, 1)

        retry = conn.commit(hold.reservation_id, 60)
        assert retry.replayed and retry.hold_expired and (retry.charged, retry.excess) == (60, 40), retry
        expect_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, conn.commit, hold.reservation_id, 61)
        assert counters(conn.balance(customer)) == counters(balance)


def test_commit_after_expiry_that_fits_has_no_excess(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("late-fit")
        conn.set_budget(customer, 100)
        hold = conn.reserve(customer, 50, ttl_ms=200)
        wait_reclaimed(conn, customer)
        late = conn.commit(hold.reservation_id, 30)
        assert late.hold_expired and (late.charged, late.excess, late.remaining) == (30, 0, 70), late
        balance = conn.balance(customer)
        assert (balance.spent, balance.reserved, balance.overdraft) == (30, 0, 0)


def test_reserve_retry_after_expiry_replays_the_expired_hold(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("late-retry")
        conn.set_budget(customer, 100)
        first = conn.reserve(customer, 50, idempotency_key="job", ttl_ms=200)
        before = counters(wait_reclaimed(conn, customer))
        retry = conn.reserve(customer, 50, idempotency_key="job", ttl_ms=200)
        assert retry.replayed and retry.reservation_id == first.reservation_id and retry.state == EXPIRED, retry
        assert counters(conn.balance(customer)) == before, "a retry must not revive an expired hold"


def test_release_after_expiry_reports_expired_and_changes_nothing(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("late-release")
        conn.set_budget(customer, 100)
        hold = conn.reserve(customer, 50, ttl_ms=200)
        before = counters(wait_reclaimed(conn, customer))
        late = conn.release(hold.reservation_id)
        assert not late.released and late.state == EXPIRED and late.remaining == 100, late
        retry = conn.release(hold.reservation_id)
        assert not retry.released and retry.state == EXPIRED, retry
        assert counters(conn.balance(customer)) == before


def test_expiry_reclaims_only_the_expired_holds(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("ttl-mixed")
        conn.set_budget(customer, 1000)
        short = [conn.reserve(customer, 10 + i, ttl_ms=200) for i in range(5)]
        long = [conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS) for _ in range(3)]
        assert all(h.granted for h in short + long)
        balance = wait_reclaimed(conn, customer, reserved=300)
        assert (balance.active_holds, balance.spent, balance.remaining) == (3, 0, 700)
        for h in long:
            assert not conn.commit(h.reservation_id, 100).hold_expired
        assert conn.balance(customer).spent == 300

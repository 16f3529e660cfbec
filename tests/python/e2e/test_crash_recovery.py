"""Every acknowledged change survives kill -9 (durability fsync, the default).

A client's view of a crash: each request either got an OK reply before the kill (acknowledged: must be on the
books after restart) or did not (in flight: may or may not be). So after a restart
    sum(acknowledged commits) <= spent <= sum(acknowledged commits) + sum(in-flight commits)
and holds whose Reserve was acknowledged still count in `reserved` until they are settled or expire.
"""

from __future__ import annotations

import random
import time

import grpc

from spendgate.v1 import spendgate_pb2 as pb

from ._bursts import HUGE_LIMIT, Burst, check_books_after_restart
from ._support import (
    LONG_TTL_MS,
    Conn,
    assert_balance_consistent,
    counters,
    crash_and_restart,
    expect_rpc_error,
    new_customer,
    now_ms,
    wait_until,
)


def test_idle_kill_restores_every_counter_and_every_reply(sidecar):
    a, b = new_customer("idle-a"), new_customer("idle-b")
    with Conn(sidecar.target) as conn:
        conn.set_budget(a, 1000, stripe_customer_id="cus_idle_a")
        conn.set_budget(b, 100)
        keyed = conn.reserve(a, 100, idempotency_key="job-1", ttl_ms=LONG_TTL_MS)
        committed = conn.commit(keyed.reservation_id, 70)
        assert committed.charged == 70
        open_hold = conn.reserve(a, 200, ttl_ms=LONG_TTL_MS)
        to_release = conn.reserve(a, 50, ttl_ms=LONG_TTL_MS)
        released = conn.release(to_release.reservation_id)
        over = conn.reserve(b, 80, ttl_ms=LONG_TTL_MS)
        overdrawn = conn.commit(over.reservation_id, 130)
        assert overdrawn.over_reserved and overdrawn.excess == 30, overdrawn
        before = {c: counters(conn.balance(c)) for c in (a, b)}
    assert (before[a]["spent"], before[a]["reserved"], before[a]["active_holds"]) == (70, 200, 1), before[a]
    assert before[b]["overdraft"] == 30

    crash_and_restart(sidecar)

    with Conn(sidecar.target) as conn:
        after = {c: counters(conn.balance(c)) for c in (a, b)}
        assert after == before, "counters after an idle kill -9 must equal the counters before it"
        # The idempotency records survived too: every retry gets the same answer as before the crash.
        again = conn.reserve(a, 100, idempotency_key="job-1", ttl_ms=LONG_TTL_MS)
        assert not again.granted and again.replayed and again.reservation_id == keyed.reservation_id, again
        assert (again.reason, again.state) == (pb.DENY_REASON_HOLD_ENDED, pb.HOLD_STATE_COMMITTED), again
        assert again.expires_at_ms == keyed.expires_at_ms
        replay = conn.commit(keyed.reservation_id, 70)
        assert replay.replayed and (replay.charged, replay.over_reserved, replay.excess) == (70, False, 0), replay
        replay_over = conn.commit(over.reservation_id, 130)
        assert replay_over.replayed and (replay_over.over_reserved, replay_over.excess) == (True, 30), replay_over
        replay_release = conn.release(to_release.reservation_id)
        assert replay_release.replayed and replay_release.released == released.released, replay_release
        expect_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, conn.commit, keyed.reservation_id, 71)
        expect_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, conn.commit, to_release.reservation_id, 10)
        expect_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, conn.release, keyed.reservation_id)
        assert {c: counters(conn.balance(c)) for c in (a, b)} == before, "replays after restart changed the books"
        # The hold that was open before the crash can still be settled.
        settled = conn.commit(open_hold.reservation_id, 150)
        assert not settled.replayed and settled.charged == 150
        final = conn.balance(a)
        assert (final.spent, final.reserved, final.active_holds) == (220, 0, 0)


def test_hold_acknowledged_just_before_a_kill_survives_and_can_be_committed(sidecar):
    customer = new_customer("rsv-kill")
    with Conn(sidecar.target) as conn:
        conn.set_budget(customer, 500)
        hold = conn.reserve(customer, 120, ttl_ms=LONG_TTL_MS)
        assert hold.granted
        sidecar.kill9()  # right after the OK reply: no other request in between
    sidecar.restart()
    with Conn(sidecar.target) as conn:
        balance = conn.balance(customer)
        assert (balance.reserved, balance.active_holds, balance.remaining) == (120, 1, 380), counters(balance)
        denied = conn.reserve(customer, 381, ttl_ms=LONG_TTL_MS)
        assert not denied.granted, "the restored hold must still count against the limit"
        committed = conn.commit(hold.reservation_id, 100)
        assert committed.charged == 100 and not committed.replayed and not committed.hold_expired
        balance = conn.balance(customer)
        assert (balance.spent, balance.reserved, balance.active_holds, balance.remaining) == (100, 0, 0, 400)


def test_commit_acknowledged_just_before_a_kill_is_on_the_books(sidecar):
    customer = new_customer("commit-kill")
    with Conn(sidecar.target) as conn:
        conn.set_budget(customer, 500)
        hold = conn.reserve(customer, 120, ttl_ms=LONG_TTL_MS)
        committed = conn.commit(hold.reservation_id, 90)
        assert committed.charged == 90
        sidecar.kill9()
    sidecar.restart()
    with Conn(sidecar.target) as conn:
        balance = conn.balance(customer)
        assert (balance.spent, balance.reserved, balance.active_holds) == (90, 0, 0), counters(balance)


def test_kill_during_a_burst_of_commits_loses_no_acknowledged_commit(sidecar):
    customer = new_customer("burst")
    with Conn(sidecar.target) as conn:
        conn.set_budget(customer, HUGE_LIMIT)
        before = counters(conn.balance(customer))

    burst = Burst(sidecar.target, customer, seed=7)
    burst.start()
    burst.wait_for(acked_commits=300)
    burst.kill(sidecar)
    burst.join()
    sidecar.restart()

    with Conn(sidecar.target) as conn:
        after = counters(conn.balance(customer))
        check_books_after_restart(before, after, burst.books)
        # Each acknowledged commit is individually on the books: its retry is a replay with the same answer.
        for rid, (amount, reply) in list(burst.books.acked_commits.items()):
            replay = conn.commit(rid, amount)
            assert replay.replayed and replay.charged == reply.charged, (rid, replay)
        assert counters(conn.balance(customer)) == after, "replaying acknowledged commits changed the books"


def test_repeated_kills_at_random_moments_never_lose_acknowledged_work(sidecar):
    """Six kill points in one data dir: right after the first acknowledged reserve, then at random moments of the
    stream. After each restart the books must account for everything acknowledged, and the holds acknowledged in
    every earlier life can still be settled at the end."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    customer = new_customer("kills")
    with Conn(sidecar.target) as conn:
        conn.set_budget(customer, HUGE_LIMIT)
        before = counters(conn.balance(customer))

    survivors: dict[str, int] = {}  # holds acknowledged in some round and never committed: still open at the end
    for round_no in range(6):
        burst = Burst(sidecar.target, customer, seed=seed + round_no)
        burst.start()
        if round_no == 0:
            burst.wait_for(acked_reserves=1)
        else:
            burst.wait_for(acked_commits=rng.randint(0, 200))
            time.sleep(rng.uniform(0, 0.05))  # land the kill at an arbitrary point between requests
        burst.kill(sidecar)
        burst.join()
        sidecar.restart()
        with Conn(sidecar.target) as conn:
            after = counters(conn.balance(customer))
        try:
            check_books_after_restart(before, after, burst.books)
        except AssertionError as err:
            raise AssertionError(f"kill point {round_no} (seed {seed}): {err}") from None
        survivors.update(burst.books.open_holds)
        before = after

    with Conn(sidecar.target) as conn:
        for rid, amount in survivors.items():
            committed = conn.commit(rid, amount)
            assert committed.charged == amount and not committed.replayed, (rid, committed)
        final = conn.balance(customer)
    assert_balance_consistent(final)
    assert final.spent == before["spent"] + sum(survivors.values())
    assert final.reserved == before["reserved"] - sum(survivors.values())


def test_holds_from_before_a_crash_still_expire_after_restart(sidecar):
    customer = new_customer("ttl-kill")
    with Conn(sidecar.target) as conn:
        conn.set_budget(customer, 1000)
        short = conn.reserve(customer, 300, ttl_ms=1500)
        long = conn.reserve(customer, 200, ttl_ms=LONG_TTL_MS)
        assert short.granted and long.granted
    sidecar.kill9()
    # Restart only once the short hold is past due, so it expires while no server is running.
    wait_until(now_ms, lambda t: t > short.expires_at_ms + 50, what="the short hold's expiry time", deadline_s=10)
    sidecar.restart()
    with Conn(sidecar.target) as conn:
        balance = wait_until(
            lambda: conn.balance(customer),
            lambda b: b.reserved == 200,
            what="the hold that expired during the outage to be reclaimed",
        )
        assert balance.active_holds == 1 and balance.spent == 0
        late = conn.commit(short.reservation_id, 250)
        assert late.hold_expired and late.charged == 250, late
        on_time = conn.commit(long.reservation_id, 200)
        assert not on_time.hold_expired
        balance = conn.balance(customer)
        assert (balance.spent, balance.reserved, balance.active_holds) == (450, 0, 0), counters(balance)

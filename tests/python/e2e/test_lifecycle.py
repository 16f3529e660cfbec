"""The life of a budget and its holds: SetBudget, Reserve (grant or deny), Commit, Release, GetBalance."""

from __future__ import annotations

import random

from ._support import (
    ACTIVE,
    INSUFFICIENT,
    LONG_TTL_MS,
    MAX_AMOUNT,
    NO_STATE,
    RELEASED,
    TOO_MANY_HOLDS,
    Conn,
    assert_balance_consistent,
    counters,
    new_customer,
    wait_until,
)


def test_set_budget_creates_then_changes_a_limit(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("setb")
        created = conn.set_budget(customer, 500)
        assert created.created
        assert counters(created.balance) == {
            "customer_id": customer,
            "limit": 500,
            "spent": 0,
            "reserved": 0,
            "remaining": 500,
            "active_holds": 0,
            "stripe_customer_id": customer,  # defaults to the customer_id
            "overdraft": 0,
        }
        raised = conn.set_budget(customer, 800, stripe_customer_id="cus_123")
        assert not raised.created and raised.balance.limit == 800 and raised.balance.stripe_customer_id == "cus_123"
        kept = conn.set_budget(customer, 900)
        assert kept.balance.stripe_customer_id == "cus_123", "an empty stripe_customer_id keeps the current one"
        assert counters(conn.balance(customer)) == counters(kept.balance)


def test_reserve_grants_exactly_what_fits_and_denies_the_rest_with_an_ok_reply(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("fit")
        conn.set_budget(customer, 100)
        first = conn.reserve(customer, 60, ttl_ms=LONG_TTL_MS)
        assert first.granted and first.amount == 60 and first.remaining == 40 and first.reservation_id, first
        assert not first.replayed and first.expires_at_ms > 0 and first.state == ACTIVE

        denied = conn.reserve(customer, 41, ttl_ms=LONG_TTL_MS)  # an OK reply, not an error
        assert not denied.granted and denied.reason == INSUFFICIENT and denied.remaining == 40, denied
        assert not denied.reservation_id and denied.message, "a denial explains itself"
        assert denied.amount == 41 and denied.state == NO_STATE and not denied.replayed, denied

        exact = conn.reserve(customer, 40, ttl_ms=LONG_TTL_MS)
        assert exact.granted and exact.remaining == 0, "an amount equal to what is left fits"
        assert not conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS).granted

        balance = conn.balance(customer)
        assert_balance_consistent(balance)
        assert (balance.reserved, balance.active_holds, balance.remaining, balance.spent) == (100, 2, 0, 0)


def test_commit_posts_the_actual_amount_and_frees_the_rest_of_the_hold(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("commit")
        conn.set_budget(customer, 1000)
        hold = conn.reserve(customer, 300, ttl_ms=LONG_TTL_MS)
        committed = conn.commit(hold.reservation_id, 120)
        got = (committed.charged, committed.remaining, committed.over_reserved, committed.excess)
        assert got == (120, 880, False, 0), committed
        assert not committed.replayed and not committed.hold_expired
        balance = conn.balance(customer)
        assert (balance.spent, balance.reserved, balance.active_holds, balance.remaining) == (120, 0, 0, 880)


def test_commit_of_zero_frees_the_whole_hold(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("commit0")
        conn.set_budget(customer, 100)
        hold = conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS)
        committed = conn.commit(hold.reservation_id, 0)
        assert committed.charged == 0 and committed.remaining == 100 and not committed.over_reserved
        balance = conn.balance(customer)
        assert (balance.spent, balance.reserved, balance.active_holds) == (0, 0, 0)


def test_commit_above_the_hold_that_still_fits_is_flagged_without_excess(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("over-fit")
        conn.set_budget(customer, 1000)
        hold = conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS)
        committed = conn.commit(hold.reservation_id, 250)
        got = (committed.charged, committed.over_reserved, committed.excess, committed.remaining)
        assert got == (250, True, 0, 750), committed
        balance = conn.balance(customer)
        assert (balance.spent, balance.overdraft) == (250, 0)


def test_commit_above_the_hold_past_the_limit_is_recorded_in_full_with_its_excess(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("overdraft")
        conn.set_budget(customer, 100)
        a = conn.reserve(customer, 50, ttl_ms=LONG_TTL_MS)
        b = conn.reserve(customer, 50, ttl_ms=LONG_TTL_MS)

        first = conn.commit(a.reservation_id, 80)  # spent + reserved: 100 -> 130
        assert (first.charged, first.over_reserved, first.excess, first.remaining) == (80, True, 30, 0), first
        assert not conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS).granted

        second = conn.commit(b.reservation_id, 60)  # 130 -> 140: this commit pushed it 10 further
        assert (second.charged, second.over_reserved, second.excess) == (60, True, 10), second

        balance = conn.balance(customer)
        assert_balance_consistent(balance)
        assert (balance.spent, balance.reserved, balance.overdraft, balance.remaining) == (140, 0, 40, 0)


def test_release_voids_the_hold(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("release")
        conn.set_budget(customer, 100)
        hold = conn.reserve(customer, 70, ttl_ms=LONG_TTL_MS)
        released = conn.release(hold.reservation_id)
        assert released.released and released.state == RELEASED and released.remaining == 100 and not released.replayed
        balance = conn.balance(customer)
        assert (balance.spent, balance.reserved, balance.active_holds, balance.remaining) == (0, 0, 0, 100)
        assert conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS).granted


def test_raising_a_limit_makes_room_for_a_denied_reserve(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("raise")
        conn.set_budget(customer, 0)
        denied = conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS)
        assert not denied.granted and denied.reason == INSUFFICIENT and denied.remaining == 0
        raised = conn.set_budget(customer, 50)
        assert raised.balance.remaining == 50
        assert conn.reserve(customer, 50, ttl_ms=LONG_TTL_MS).granted


def test_amounts_and_limits_up_to_2_pow_53_are_exact(sidecar):
    with Conn(sidecar.target) as conn:
        customer = new_customer("big")
        conn.set_budget(customer, MAX_AMOUNT)
        hold = conn.reserve(customer, MAX_AMOUNT, ttl_ms=LONG_TTL_MS)
        assert hold.granted and hold.amount == MAX_AMOUNT and hold.remaining == 0
        committed = conn.commit(hold.reservation_id, MAX_AMOUNT - 1)
        assert committed.remaining == 1
        balance = conn.balance(customer)
        assert (balance.limit, balance.spent, balance.remaining) == (MAX_AMOUNT, MAX_AMOUNT - 1, 1)


def test_too_many_open_holds_is_a_denial_until_one_ends(sidecar_factory):
    sc = sidecar_factory(extra_args=("--max-holds-per-budget", "3"))
    with Conn(sc.target) as conn:
        customer, other = new_customer("holds"), new_customer("holds-other")
        conn.set_budget(customer, 1000)
        conn.set_budget(other, 1000)
        # Three short holds fill the cap; once they expire their slots are free again.
        assert all(conn.reserve(customer, 1, ttl_ms=200).granted for _ in range(3))
        wait_until(lambda: conn.balance(customer), lambda b: b.active_holds == 0, what="the short holds to expire")

        keep = conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS)
        to_release = conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS)
        to_commit = conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS)
        assert keep.granted and to_release.granted and to_commit.granted, "expired holds must not count toward the cap"

        denied = conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS)
        assert not denied.granted and denied.reason == TOO_MANY_HOLDS and not denied.reservation_id, denied
        assert denied.message and denied.remaining == 997, denied
        assert conn.reserve(other, 1, ttl_ms=LONG_TTL_MS).granted, "the cap is per budget"

        conn.release(to_release.reservation_id)
        assert conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS).granted, "a released hold frees its slot"
        assert not conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS).granted
        conn.commit(to_commit.reservation_id, 1)
        assert conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS).granted, "a committed hold frees its slot"
        assert conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS).reason == TOO_MANY_HOLDS
        balance = conn.balance(customer)
        assert (balance.active_holds, balance.reserved, balance.spent) == (3, 3, 1)


def test_list_budgets_returns_budgets_in_customer_id_order_filtered_by_prefix(sidecar):
    with Conn(sidecar.target) as conn:
        prefix = new_customer("list") + "/"
        ids = [f"{prefix}{name}" for name in ("delta", "alpha", "echo", "charlie", "bravo")]
        random.shuffle(ids)
        for i, customer in enumerate(ids):
            conn.set_budget(customer, 100 + i)
        hold = conn.reserve(ids[0], 30, ttl_ms=LONG_TTL_MS)
        conn.commit(hold.reservation_id, 20)

        listed = conn.list_budgets(prefix=prefix).budgets
        assert [b.customer_id for b in listed] == sorted(ids)
        assert [counters(b) for b in listed] == [counters(conn.balance(c)) for c in sorted(ids)]
        assert [b.customer_id for b in conn.list_budgets(prefix=prefix, limit=2).budgets] == sorted(ids)[:2]
        assert [b.customer_id for b in conn.list_budgets(prefix=prefix + "c").budgets] == [prefix + "charlie"]
        assert list(conn.list_budgets(prefix=prefix + "zzz").budgets) == []


def test_ping_answers(sidecar):
    with Conn(sidecar.target) as conn:
        conn.ping()

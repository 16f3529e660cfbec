"""Bad input is a gRPC error (INVALID_ARGUMENT naming the field, or NOT_FOUND), and it changes nothing: the balance,
the open holds and the idempotency keys are exactly as before."""

from __future__ import annotations

import grpc

from spendgate.testing import Sidecar

from ._support import (
    LONG_TTL_MS,
    MAX_AMOUNT,
    MAX_ID_BYTES,
    Conn,
    counters,
    expect_rpc_error,
    new_customer,
    reservation_id_unknown_to,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

TOO_LONG_ASCII = "x" * (MAX_ID_BYTES + 1)
TOO_LONG_UTF8 = "€" * 43  # 43 characters but 129 bytes: the bound is in UTF-8 bytes
LONGEST_UTF8 = "é" * (MAX_ID_BYTES // 2)  # 64 characters, exactly 128 bytes


class Scene:
    """A budget with some history (spent, an open hold, a used idempotency key) to check that nothing moves."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.customer = new_customer("bad")
        conn.set_budget(self.customer, 1000)
        done = conn.reserve(self.customer, 100, idempotency_key="used-key", ttl_ms=LONG_TTL_MS)
        conn.commit(done.reservation_id, 40)
        self.done_id = done.reservation_id
        self.hold = conn.reserve(self.customer, 200, ttl_ms=LONG_TTL_MS)
        self.before = counters(conn.balance(self.customer))

    def assert_unchanged(self, case: str) -> None:
        assert counters(self.conn.balance(self.customer)) == self.before, f"{case} changed the balance"

    def check(self, case: str, code: grpc.StatusCode, call, *args, mentions: str | None = None) -> None:
        try:
            expect_rpc_error(code, call, *args, mentions=mentions)
        except AssertionError as err:
            raise AssertionError(f"{case}: {err}") from None
        self.assert_unchanged(case)


def test_reserve_rejects_bad_amounts_naming_the_amount(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        for amount in (0, -1, -(2**63), MAX_AMOUNT + 1, INT64_MAX):
            s.check(
                f"Reserve amount={amount}",
                INVALID,
                conn.reserve,
                s.customer,
                amount,
                "",
                LONG_TTL_MS,
                mentions="amount",
            )


def test_reserve_rejects_bad_customer_ids_naming_the_customer_id(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        for customer in ("", TOO_LONG_ASCII, TOO_LONG_UTF8):
            s.check(
                f"Reserve customer_id of {len(customer.encode())} bytes",
                INVALID,
                conn.reserve,
                customer,
                10,
                "",
                0,
                mentions="customer_id",
            )


def test_reserve_rejects_too_long_idempotency_keys_naming_the_key(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        for key in (TOO_LONG_ASCII, TOO_LONG_UTF8):
            s.check(
                f"Reserve idempotency_key of {len(key.encode())} bytes",
                INVALID,
                conn.reserve,
                s.customer,
                10,
                key,
                LONG_TTL_MS,
                mentions="idempotency_key",
            )


def test_reserve_rejects_a_ttl_above_the_servers_maximum_naming_ttl_ms(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        # Above any server's max_ttl_ms: the engine's ceiling is 7 days.
        for ttl_ms in (7 * 86_400_000 + 1, UINT64_MAX):
            s.check(f"Reserve ttl_ms={ttl_ms}", INVALID, conn.reserve, s.customer, 10, "", ttl_ms, mentions="ttl_ms")


def test_reserve_for_an_unknown_customer_is_not_found_and_creates_nothing(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        ghost = new_customer("ghost")
        s.check("Reserve for an unknown customer", NOT_FOUND, conn.reserve, ghost, 10, "", 0)
        s.check("Reserve for an unknown customer with a key", NOT_FOUND, conn.reserve, ghost, 10, "k", 0)
        s.check("GetBalance of the unknown customer", NOT_FOUND, conn.balance, ghost)


def test_a_rejected_reserve_does_not_consume_its_idempotency_key(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        s.check(
            "Reserve amount=0 with a fresh key",
            INVALID,
            conn.reserve,
            s.customer,
            0,
            "fresh-key",
            LONG_TTL_MS,
            mentions="amount",
        )
        s.check(
            "Reserve with a fresh key and a bad ttl",
            INVALID,
            conn.reserve,
            s.customer,
            5,
            "fresh-key",
            UINT64_MAX,
            mentions="ttl_ms",
        )
        first = conn.reserve(s.customer, 5, idempotency_key="fresh-key", ttl_ms=LONG_TTL_MS)
        assert first.granted and not first.replayed, "the key was consumed by a rejected request"
        # And a rejected retry of a used key neither replays nor disturbs it.
        s.before = counters(conn.balance(s.customer))
        s.check(
            "Reserve amount=-1 with a used key",
            INVALID,
            conn.reserve,
            s.customer,
            -1,
            "fresh-key",
            LONG_TTL_MS,
            mentions="amount",
        )
        again = conn.reserve(s.customer, 5, idempotency_key="fresh-key", ttl_ms=LONG_TTL_MS)
        assert again.replayed and again.reservation_id == first.reservation_id


def test_ids_of_exactly_128_bytes_are_accepted(sidecar):
    with Conn(sidecar.target) as conn:
        customer = "é" * 60 + new_customer("")[-8:]  # 120 bytes of é plus 8 unique ASCII characters: 128 bytes
        assert len(customer.encode()) == MAX_ID_BYTES
        created = conn.set_budget(customer, 100, stripe_customer_id="s" * MAX_ID_BYTES)
        assert created.created and created.balance.customer_id == customer
        hold = conn.reserve(customer, 10, idempotency_key=LONGEST_UTF8, ttl_ms=LONG_TTL_MS)
        assert hold.granted
        assert conn.reserve(customer, 10, idempotency_key=LONGEST_UTF8, ttl_ms=LONG_TTL_MS).replayed
        assert conn.balance(customer).reserved == 10


def test_commit_rejects_malformed_reservation_ids_naming_the_field(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        rid = s.hold.reservation_id
        for bad in ("", "garbage", rid[:-1], rid + "0", rid.upper(), rid[:-1] + "g", " " + rid, "x" * 1000):
            s.check(f"Commit reservation_id={bad[:40]!r}", INVALID, conn.commit, bad, 10, mentions="reservation_id")
        assert not conn.commit(rid, 150).replayed, "the hold was still open after the rejected commits"


def test_release_rejects_malformed_reservation_ids_naming_the_field(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        rid = s.hold.reservation_id
        for bad in ("", "garbage", rid[:-1], rid + "0", rid.upper(), "x" * 1000):
            s.check(f"Release reservation_id={bad[:40]!r}", INVALID, conn.release, bad, mentions="reservation_id")
        assert conn.release(rid).released


def test_commit_and_release_of_a_well_formed_unknown_reservation_are_not_found(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        unknown = reservation_id_unknown_to(s.hold.reservation_id)
        s.check("Commit of an unknown reservation", NOT_FOUND, conn.commit, unknown, 10)
        s.check("Release of an unknown reservation", NOT_FOUND, conn.release, unknown)


def test_commit_rejects_bad_amounts_naming_the_amount(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        for amount in (-1, -(2**63), MAX_AMOUNT + 1, INT64_MAX):
            s.check(f"Commit amount={amount}", INVALID, conn.commit, s.hold.reservation_id, amount, mentions="amount")
        # A bad amount on a settled reservation is still bad input, not a replay or a conflict.
        s.check("Commit amount=-1 of a committed reservation", INVALID, conn.commit, s.done_id, -1, mentions="amount")
        committed = conn.commit(s.hold.reservation_id, 200)
        assert not committed.replayed and committed.charged == 200


def test_set_budget_rejects_bad_limits_and_ids_naming_the_field(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        for limit in (-1, -(2**63), MAX_AMOUNT + 1, INT64_MAX):
            s.check(f"SetBudget limit={limit}", INVALID, conn.set_budget, s.customer, limit, mentions="limit")
        for customer in ("", TOO_LONG_ASCII, TOO_LONG_UTF8):
            s.check(
                f"SetBudget customer_id of {len(customer.encode())} bytes",
                INVALID,
                conn.set_budget,
                customer,
                10,
                mentions="customer_id",
            )
        for stripe in (TOO_LONG_ASCII, TOO_LONG_UTF8):
            s.check(
                f"SetBudget stripe_customer_id of {len(stripe.encode())} bytes",
                INVALID,
                conn.set_budget,
                s.customer,
                2000,
                stripe,
                mentions="stripe_customer_id",
            )
        # Rejected creations create nothing.
        fresh = new_customer("never")
        s.check("SetBudget of a new budget with limit=-1", INVALID, conn.set_budget, fresh, -1, mentions="limit")
        s.check("GetBalance of the budget that was never created", NOT_FOUND, conn.balance, fresh)
        assert conn.set_budget(fresh, 10).created


def test_list_budgets_rejects_a_limit_above_10000_naming_the_limit(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        assert len(conn.list_budgets(prefix=s.customer, limit=10_000).budgets) == 1
        s.check("ListBudgets limit=10001", INVALID, conn.list_budgets, s.customer, 10_001, mentions="limit")


def test_get_balance_rejects_bad_customer_ids_naming_the_customer_id(sidecar):
    with Conn(sidecar.target) as conn:
        s = Scene(conn)
        for customer in ("", TOO_LONG_ASCII, TOO_LONG_UTF8):
            s.check(
                f"GetBalance customer_id of {len(customer.encode())} bytes",
                INVALID,
                conn.balance,
                customer,
                mentions="customer_id",
            )


def test_over_commits_past_the_booking_bound_are_refused_and_every_other_customer_is_served_also_after_a_restart(
    sidecar: Sidecar,
) -> None:
    """Any app token may commit up to 2**53 per call: about 1,024 of them once overflowed `spent` and killed the
    writer for every customer, again after each restart. Now the one past the bound is INVALID_ARGUMENT."""
    with Conn(sidecar.target) as conn:
        attacker, victim = new_customer("attacker"), new_customer("victim")
        conn.set_budget(attacker, MAX_AMOUNT)
        conn.set_budget(victim, 1_000)
        holds = [conn.reserve(attacker, 1, ttl_ms=LONG_TTL_MS).reservation_id for _ in range(140)]
        committed, refusal = 0, None
        for reservation_id in holds:
            try:
                conn.commit(reservation_id, MAX_AMOUNT)
                committed += 1
            except grpc.RpcError as error:
                refusal = error
                break
        assert refusal is not None and refusal.code() == grpc.StatusCode.INVALID_ARGUMENT, refusal
        assert "nothing was changed" in (refusal.details() or "")
        assert conn.balance(attacker).spent == committed * MAX_AMOUNT
        served = conn.reserve(victim, 10)
        assert served.granted and conn.commit(served.reservation_id, 10).charged == 10
    sidecar.restart()
    with Conn(sidecar.target) as conn:
        assert conn.balance(attacker).spent == committed * MAX_AMOUNT
        again = conn.reserve(victim, 10)
        assert again.granted and conn.commit(again.reservation_id, 10).charged == 10
        assert conn.balance(victim).spent == 20

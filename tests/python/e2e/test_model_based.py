"""Random operation sequences against one real server, compared reply by reply with a small reference model.

Three budgets; Reserve (with and without idempotency keys), Commit (below, at and above the hold, retries and
conflicting retries), Release (and its retries), SetBudget raising a limit, GetBalance after every step. Once per
example the server is killed with SIGKILL and restarted at a random step: every op was acknowledged before the next
was sent, so the model must still match exactly. Holds use a long TTL, so nothing expires during an example.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ._support import (
    ACTIVE,
    COMMITTED,
    HOLD_ENDED,
    INSUFFICIENT,
    LONG_TTL_MS,
    NO_STATE,
    RELEASED,
    Conn,
    counters,
    crash_and_restart,
    new_customer,
)

N_CUSTOMERS = 3
KEYS = ("", "", "k0", "k1", "k2")  # no key twice as often as each key


@dataclass
class ModelBudget:
    customer_id: str
    limit: int
    spent: int = 0
    reserved: int = 0
    active_holds: int = 0
    overdraft: int = 0

    @property
    def available(self) -> int:
        return self.limit - self.spent - self.reserved

    @property
    def remaining(self) -> int:
        return max(0, self.available)

    def as_balance(self) -> dict:
        return {
            "customer_id": self.customer_id,
            "limit": self.limit,
            "spent": self.spent,
            "reserved": self.reserved,
            "remaining": self.remaining,
            "active_holds": self.active_holds,
            "stripe_customer_id": self.customer_id,
            "overdraft": self.overdraft,
        }


@dataclass
class ModelHold:
    budget: ModelBudget
    amount: int
    state: str = "active"  # active | committed | released
    commit_amount: int | None = None
    commit_reply: object | None = None
    release_reply: object | None = None


@dataclass
class ModelKey:
    amount: int
    reply: object | None  # the granted ReserveResponse; None if the first use was denied


class SpendgateMachine(RuleBasedStateMachine):
    sidecar = None  # set by the test

    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.conn = Conn(self.sidecar.target)
        self.budgets: list[ModelBudget] = []
        self.holds: dict[str, ModelHold] = {}
        self.keys: dict[tuple[str, str], ModelKey] = {}
        self.restarted = False

    # --- setup -------------------------------------------------------------------------------------------------------

    @initialize(limits=st.lists(st.integers(0, 300), min_size=N_CUSTOMERS, max_size=N_CUSTOMERS))
    def create_budgets(self, limits: list[int]) -> None:
        for i, limit in enumerate(limits):
            budget = ModelBudget(new_customer(f"model{i}"), limit)
            reply = self.conn.set_budget(budget.customer_id, limit)
            assert reply.created
            assert counters(reply.balance) == budget.as_balance()
            self.budgets.append(budget)

    # --- rules -------------------------------------------------------------------------------------------------------

    @rule(
        target=reservations,
        who=st.integers(0, N_CUSTOMERS - 1),
        amount=st.integers(1, 120),
        key=st.sampled_from(KEYS),
    )
    def reserve(self, who: int, amount: int, key: str):
        budget = self.budgets[who]
        known = self.keys.get((budget.customer_id, key)) if key else None
        if known is not None and known.reply is None:
            # The first use of this key was denied; the contract does not say what a retry of a denial gets.
            event("reserve: key of a denial, skipped")
            return multiple()
        if known is not None and amount != known.amount:
            event("reserve: same key, other amount")
            self._expect_error(
                grpc.StatusCode.ALREADY_EXISTS, self.conn.reserve, budget.customer_id, amount, key, LONG_TTL_MS
            )
            return multiple()

        remaining_before = budget.remaining
        reply = self.conn.reserve(budget.customer_id, amount, idempotency_key=key, ttl_ms=LONG_TTL_MS)
        if known is not None:  # an idempotent retry
            event("reserve: replay")
            first = known.reply
            hold = self.holds[first.reservation_id]
            # A replay grants only while its hold is open; an ended hold holds nothing, so the retry is denied.
            assert reply.replayed and reply.granted == (hold.state == "active"), reply
            assert reply.reason == (HOLD_ENDED if hold.state != "active" else 0), reply
            assert (reply.reservation_id, reply.amount, reply.expires_at_ms) == (
                first.reservation_id,
                first.amount,
                first.expires_at_ms,
            ), (first, reply)
            expected_state = {"active": ACTIVE, "committed": COMMITTED, "released": RELEASED}[hold.state]
            assert reply.state == expected_state, f"a replay reports what became of the hold: {reply} vs {hold.state}"
            # "The same reply": the first reply's remaining, or (as a fresh answer) what is left now.
            assert reply.remaining in (first.remaining, remaining_before), (first, reply, remaining_before)
            return multiple()

        if amount <= budget.available:
            assert reply.granted and not reply.replayed and reply.amount == amount and reply.state == ACTIVE, reply
            assert reply.reservation_id not in self.holds, f"reservation_id {reply.reservation_id} handed out twice"
            budget.reserved += amount
            budget.active_holds += 1
            assert reply.remaining == budget.remaining, (reply, budget)
            self.holds[reply.reservation_id] = ModelHold(budget, amount)
            event("reserve: granted")
            if key:
                self.keys[(budget.customer_id, key)] = ModelKey(amount, reply)
            return reply.reservation_id
        assert not reply.granted and reply.reason == INSUFFICIENT and not reply.reservation_id, (reply, budget)
        assert reply.amount == amount and reply.state == NO_STATE and not reply.replayed, reply
        event("reserve: denied")
        assert reply.remaining == budget.remaining, (reply, budget)
        if key:
            self.keys[(budget.customer_id, key)] = ModelKey(amount, None)
        return multiple()

    @rule(who=st.integers(0, N_CUSTOMERS - 1), key=st.sampled_from(KEYS[2:]))
    def retry_reserve(self, who: int, key: str) -> None:
        """A client retrying a Reserve it already sent: same key, same amount."""
        known = self.keys.get((self.budgets[who].customer_id, key))
        if known is not None:
            self.reserve(who, known.amount, key)

    @rule(rid=reservations, amount=st.one_of(st.none(), st.integers(0, 150), st.integers(151, 400)))
    def commit(self, rid: str, amount: int | None) -> None:
        hold = self.holds[rid]
        budget = hold.budget
        if amount is None:  # exactly the hold, or a faithful retry of the earlier commit
            amount = hold.commit_amount if hold.state == "committed" else hold.amount
        if hold.state == "released" or (hold.state == "committed" and amount != hold.commit_amount):
            event(f"commit: conflict after {hold.state}")
            self._expect_error(grpc.StatusCode.FAILED_PRECONDITION, self.conn.commit, rid, amount)
            return
        remaining_before = budget.remaining
        reply = self.conn.commit(rid, amount)
        if hold.state == "committed":
            first = hold.commit_reply
            event("commit: replay")
            assert reply.replayed, reply
            for name in ("charged", "over_reserved", "excess", "hold_expired"):
                assert getattr(reply, name) == getattr(first, name), (name, first, reply)
            assert reply.remaining in (first.remaining, remaining_before), (first, reply, remaining_before)
            return
        before = budget.spent + budget.reserved
        after = before - hold.amount + amount
        excess = max(0, after - max(budget.limit, before))  # how far this commit pushed spent+reserved past the limit
        budget.spent += amount
        budget.reserved -= hold.amount
        budget.active_holds -= 1
        budget.overdraft += excess
        hold.state, hold.commit_amount, hold.commit_reply = "committed", amount, reply
        event("commit: past the limit" if excess else "commit: over the hold" if amount > hold.amount else "commit")
        expected = (amount, budget.remaining, amount > hold.amount, excess, False, False)
        got = (reply.charged, reply.remaining, reply.over_reserved, reply.excess, reply.replayed, reply.hold_expired)
        assert got == expected, f"Commit({amount}) of a hold of {hold.amount}: got {got}, model says {expected}"

    @precondition(lambda self: any(h.state == "active" for h in self.holds.values()))
    @rule(data=st.data())
    def commit_an_open_hold(self, data: st.DataObject) -> None:
        """Most calls settle a hold that is still open (the bundle draws settled ones as often as open ones)."""
        open_ids = sorted(rid for rid, h in self.holds.items() if h.state == "active")
        rid = data.draw(st.sampled_from(open_ids), label="rid")
        hold = self.holds[rid]
        amount = data.draw(
            st.one_of(st.integers(0, hold.amount), st.integers(hold.amount + 1, hold.amount + 200)), label="amount"
        )
        self.commit(rid, amount)

    @rule(rid=reservations)
    def release(self, rid: str) -> None:
        hold = self.holds[rid]
        budget = hold.budget
        if hold.state == "committed":
            event("release: after commit")
            self._expect_error(grpc.StatusCode.FAILED_PRECONDITION, self.conn.release, rid)
            return
        remaining_before = budget.remaining
        reply = self.conn.release(rid)
        if hold.state == "released":
            first = hold.release_reply
            event("release: replay")
            assert reply.replayed and reply.released and reply.state == RELEASED, reply
            assert reply.remaining in (first.remaining, remaining_before), (first, reply, remaining_before)
            return
        budget.reserved -= hold.amount
        budget.active_holds -= 1
        hold.state, hold.release_reply = "released", reply
        event("release")
        got = (reply.released, reply.state, reply.remaining, reply.replayed)
        assert got == (True, RELEASED, budget.remaining, False), (got, budget)

    @rule(who=st.integers(0, N_CUSTOMERS - 1), raise_by=st.integers(0, 100))
    def raise_limit(self, who: int, raise_by: int) -> None:
        budget = self.budgets[who]
        budget.limit += raise_by
        reply = self.conn.set_budget(budget.customer_id, budget.limit)
        assert not reply.created
        assert counters(reply.balance) == budget.as_balance()

    @precondition(lambda self: not self.restarted)
    @rule()
    def kill_and_restart(self) -> None:
        event("restart: by a rule")
        self._crash()

    # --- checks ------------------------------------------------------------------------------------------------------

    @invariant()
    def balances_match_the_model(self) -> None:
        for budget in self.budgets:
            got = counters(self.conn.balance(budget.customer_id))
            assert got == budget.as_balance(), f"GetBalance {got} != model {budget.as_balance()}"

    def teardown(self) -> None:
        try:
            if self.budgets and not self.restarted:
                self._crash()  # every example crosses one restart, at the end if no rule chose it earlier
                self.balances_match_the_model()
        finally:
            self.conn.close()

    # --- helpers -----------------------------------------------------------------------------------------------------

    def _crash(self) -> None:
        self.conn.close()
        crash_and_restart(self.sidecar)
        self.conn = Conn(self.sidecar.target)
        self.restarted = True

    def _expect_error(self, code: grpc.StatusCode, call, *args) -> None:
        try:
            reply = call(*args)
        except grpc.RpcError as err:
            assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
            return
        raise AssertionError(f"expected {code.name}, got {reply}")


def test_random_operation_sequences_match_the_reference_model(sidecar):
    machine = type("Machine", (SpendgateMachine,), {"sidecar": sidecar})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            database=None,  # keep the repository clean; a failure prints the reproducing steps
            suppress_health_check=list(HealthCheck),
        ),
    )

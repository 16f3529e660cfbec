"""Reading a sidecar's settlement over gRPC, with bounded waits."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from spendgate.v1 import spendgate_pb2 as pb

from ._load import call_until_ok, stubs

DRAIN_DEADLINE_S = 90.0
POLL_S = 0.05


def settlement_status(target: str) -> pb.SettlementStatus:
    channel, _, admin = stubs(target)
    with channel:
        return call_until_ok(admin.GetSettlementStatus, pb.GetSettlementStatusRequest())


def wait_for_status(
    target: str, done: Callable[[pb.SettlementStatus], bool], what: str, deadline_s: float = DRAIN_DEADLINE_S
) -> pb.SettlementStatus:
    """Poll GetSettlementStatus until done(status); fail naming `what` after deadline_s (a hang guard, not a timing
    assertion)."""
    deadline = time.monotonic() + deadline_s
    channel, _, admin = stubs(target)
    with channel:
        while True:
            status = call_until_ok(admin.GetSettlementStatus, pb.GetSettlementStatusRequest())
            if done(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {deadline_s} s; last status:\n{status}")
            time.sleep(POLL_S)


def wait_drained(target: str, deadline_s: float = DRAIN_DEADLINE_S) -> pb.SettlementStatus:
    return wait_for_status(target, lambda s: s.outbox_depth == 0, "draining the outbox", deadline_s)


def spent(target: str, customers: Iterable[str]) -> dict[str, int]:
    channel, budget, _ = stubs(target)
    with channel:
        return {c: call_until_ok(budget.GetBalance, pb.GetBalanceRequest(customer_id=c)).spent for c in customers}


def create_budgets(target: str, stripe_ids: dict[str, str], limit: int = 10**12) -> None:
    channel, _, admin = stubs(target)
    with channel:
        for customer, stripe_id in stripe_ids.items():
            call_until_ok(
                admin.SetBudget, pb.SetBudgetRequest(customer_id=customer, limit=limit, stripe_customer_id=stripe_id)
            )

"""spendgate.v1.Budget: convert the request, call the engine, wait for durability, convert the reply.

Engine calls take microseconds and keep the GIL, so they run right here on the loop thread; only the durability wait
is awaited. The engine validates every id, amount and ttl: nothing is checked twice here.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc.aio

from spendgate import _core
from spendgate.server.durability import DurabilityWaiter
from spendgate.server.status import grpc_errors
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

# The engine's enum numbers are the contract's: they pass through unconverted.
assert _core.DENY_NONE == pb.DENY_REASON_UNSPECIFIED
assert _core.DENY_INSUFFICIENT_BUDGET == pb.DENY_REASON_INSUFFICIENT_BUDGET
assert _core.DENY_TOO_MANY_HOLDS == pb.DENY_REASON_TOO_MANY_HOLDS
assert _core.DENY_FROZEN == pb.DENY_REASON_FROZEN
assert _core.HOLD_ACTIVE == pb.HOLD_STATE_ACTIVE
assert _core.HOLD_COMMITTED == pb.HOLD_STATE_COMMITTED
assert _core.HOLD_RELEASED == pb.HOLD_STATE_RELEASED
assert _core.HOLD_EXPIRED == pb.HOLD_STATE_EXPIRED

# Quoted: grpc.aio.ServicerContext is generic only in the type stubs.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class BudgetServicer(pb_grpc.BudgetServicer):
    def __init__(self, engine: _core.Engine, waiter: DurabilityWaiter) -> None:
        self._engine = engine
        self._waiter = waiter

    @grpc_errors
    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        outcome = self._engine.reserve(request.customer_id, request.amount, request.idempotency_key, request.ttl_ms)
        await self._waiter.wait(outcome.ticket)
        return pb.ReserveResponse(
            granted=outcome.granted,
            reservation_id=outcome.reservation_id,
            remaining=outcome.remaining,
            reason=outcome.reason,  # type: ignore[arg-type]
            expires_at_ms=outcome.expires_at_ms,
            replayed=outcome.replayed,
            amount=outcome.amount,
            message=deny_message(request, outcome),
            state=outcome.state,  # type: ignore[arg-type]
        )

    @grpc_errors
    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        outcome = self._engine.commit(request.reservation_id, request.amount)
        await self._waiter.wait(outcome.ticket)
        return pb.CommitResponse(
            charged=outcome.charged,
            remaining=outcome.remaining,
            over_reserved=outcome.over_reserved,
            excess=outcome.excess,
            replayed=outcome.replayed,
            hold_expired=outcome.hold_expired,
        )

    @grpc_errors
    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        outcome = self._engine.release(request.reservation_id)
        await self._waiter.wait(outcome.ticket)
        return pb.ReleaseResponse(
            released=outcome.released,
            remaining=outcome.remaining,
            state=outcome.state,  # type: ignore[arg-type]
            replayed=outcome.replayed,
        )

    @grpc_errors
    async def GetBalance(self, request: pb.GetBalanceRequest, context: Context) -> pb.Balance:
        return balance_message(self._engine.balance(request.customer_id))

    @grpc_errors
    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        return pb.PingResponse()


def balance_message(view: _core.BalanceView) -> pb.Balance:
    return pb.Balance(
        customer_id=view.customer_id,
        limit=view.limit,
        spent=view.spent,
        reserved=view.reserved,
        remaining=view.remaining,
        active_holds=view.active_holds,
        stripe_customer_id=view.stripe_customer_id,
        overdraft=view.overdraft,
        frozen=view.frozen,
    )


def deny_message(request: pb.ReserveRequest, outcome: _core.ReserveOutcome) -> str:
    """The human-readable reason for a denial ("" when granted). The engine gives only the reason's number."""
    if outcome.granted:
        assert outcome.reason == _core.DENY_NONE, outcome.reason
        return ""
    if outcome.reason == _core.DENY_INSUFFICIENT_BUDGET:
        return (
            f"budget {request.customer_id!r} has {outcome.remaining} units left, fewer than the {request.amount}"
            " asked for: raise its limit or wait for holds to be committed, released or expired"
        )
    if outcome.reason == _core.DENY_TOO_MANY_HOLDS:
        return (
            f"budget {request.customer_id!r} has the most open holds allowed (max_holds_per_budget): commit or release"
            " some first"
        )
    if outcome.reason == _core.DENY_FROZEN:
        return f"budget {request.customer_id!r} is frozen: unfreeze it with Admin.FreezeBudget (frozen=false)"
    raise AssertionError(f"a denial without a known reason: {outcome.reason}")

"""spendgate.v1.Admin: operator calls, in the same convert-call-wait-convert shape as the Budget service."""

from __future__ import annotations

from typing import Any, Final, TypeAlias

import grpc.aio

from spendgate import _core
from spendgate.server.budget_service import balance_message
from spendgate.server.durability import DurabilityWaiter
from spendgate.server.status import grpc_errors
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

# Quoted: grpc.aio.ServicerContext is generic only in the type stubs.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

# ListBudgets with limit 0 returns this many; the engine caps any limit at 10_000.
DEFAULT_LIST_LIMIT: Final[int] = 100


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, engine: _core.Engine, waiter: DurabilityWaiter) -> None:
        self._engine = engine
        self._waiter = waiter

    @grpc_errors
    async def SetBudget(self, request: pb.SetBudgetRequest, context: Context) -> pb.SetBudgetResponse:
        outcome = self._engine.set_budget(request.customer_id, request.limit, request.stripe_customer_id)
        await self._waiter.wait(outcome.ticket)
        return pb.SetBudgetResponse(balance=balance_message(outcome.balance), created=outcome.created)

    @grpc_errors
    async def FreezeBudget(self, request: pb.FreezeBudgetRequest, context: Context) -> pb.SetBudgetResponse:
        outcome = self._engine.set_frozen(request.customer_id, request.frozen)
        await self._waiter.wait(outcome.ticket)
        return pb.SetBudgetResponse(balance=balance_message(outcome.balance), created=False)

    @grpc_errors
    async def ListBudgets(self, request: pb.ListBudgetsRequest, context: Context) -> pb.ListBudgetsResponse:
        views = self._engine.list_budgets(request.prefix, request.limit or DEFAULT_LIST_LIMIT)
        return pb.ListBudgetsResponse(budgets=[balance_message(view) for view in views])

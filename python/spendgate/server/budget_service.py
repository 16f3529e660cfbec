"""spendgate.v1.Budget: convert the request, call the service, convert the reply.

Reserve, Commit and Release are decided by spendgate.service.budgets.BudgetService (pricing, the engine call, the
durability wait, the wording of denials), the same service the HTTP proxy uses; this module only converts protobuf
to plain values and back. Errors become gRPC statuses in one place (spendgate.server.status).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Final, TypeAlias

import grpc.aio

from spendgate import _core
from spendgate._core import EngineError
from spendgate.policy.metering import Meter
from spendgate.policy.usage_report import DEFAULT_TOP, MAX_TOP, NEVER_MS, period_at_ms, usage_report
from spendgate.server.alerts import AlertService
from spendgate.server.durability import DurabilityWaiter
from spendgate.server.status import grpc_errors
from spendgate.service.budgets import HOLD_STATE_WORDS, BudgetService, TokenEstimate, Usage, deny_message
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

# The engine's enum numbers are the contract's: they pass through unconverted.
assert _core.DENY_NONE == pb.DENY_REASON_UNSPECIFIED
assert _core.DENY_INSUFFICIENT_BUDGET == pb.DENY_REASON_INSUFFICIENT_BUDGET
assert _core.DENY_TOO_MANY_HOLDS == pb.DENY_REASON_TOO_MANY_HOLDS
assert _core.DENY_FROZEN == pb.DENY_REASON_FROZEN
assert _core.DENY_OVERAGE_BLOCKED == pb.DENY_REASON_OVERAGE_BLOCKED
assert _core.DENY_UNKNOWN_MODEL == pb.DENY_REASON_UNKNOWN_MODEL
assert _core.DENY_HOLD_ENDED == pb.DENY_REASON_HOLD_ENDED
assert _core.HOLD_ACTIVE == pb.HOLD_STATE_ACTIVE
assert _core.HOLD_COMMITTED == pb.HOLD_STATE_COMMITTED
assert _core.HOLD_RELEASED == pb.HOLD_STATE_RELEASED
assert _core.HOLD_EXPIRED == pb.HOLD_STATE_EXPIRED
assert all(pb.HoldState.Name(n).removeprefix("HOLD_STATE_").lower() == w for n, w in HOLD_STATE_WORDS.items())

__all__ = [
    "BudgetServicer",
    "balance_message",
    "deny_message",
    "period_at",
    "usage_message",
]  # deny_message: moved, re-exported

MODE_BY_NAME: Final[dict[str, int]] = {"hard": pb.ENFORCEMENT_MODE_HARD, "soft": pb.ENFORCEMENT_MODE_SOFT}

# Quoted: grpc.aio.ServicerContext is generic only in the type stubs.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def invalid(message: str) -> EngineError:
    return EngineError("invalid_argument", message)


class BudgetServicer(pb_grpc.BudgetServicer):
    def __init__(
        self, engine: _core.Engine, waiter: DurabilityWaiter, meter: Meter, alerts: AlertService | None = None
    ) -> None:
        self._engine = engine
        self._service = BudgetService(engine, waiter.wait, meter)
        self._alerts = alerts

    @grpc_errors
    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        result = await self._service.reserve(
            request.customer_id,
            request.amount,
            estimate=token_estimate(request),
            idempotency_key=request.idempotency_key,
            ttl_ms=request.ttl_ms,
            dimensions=request.dimensions,
        )
        fields = dataclasses.asdict(result)
        fields["parts"] = parts_message(result.parts)
        return pb.ReserveResponse(**fields)

    @grpc_errors
    async def Quote(self, request: pb.QuoteRequest, context: Context) -> pb.QuoteResponse:
        result = self._service.quote(request.customer_id, request.amount, estimate=token_estimate(request))
        fields = dataclasses.asdict(result)
        fields["parts"] = parts_message(result.parts)
        return pb.QuoteResponse(**fields)

    @grpc_errors
    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        usage = None
        if request.HasField("usage"):
            given = request.usage
            usage = Usage(
                model=given.model,
                input_tokens=given.input_tokens,
                cached_input_tokens=given.cached_input_tokens,
                cache_write_tokens=given.cache_write_tokens,
                output_tokens=given.output_tokens,
                reasoning_tokens=given.reasoning_tokens,
                cache_hit=given.cache_hit,
            )
        result = await self._service.commit(
            request.reservation_id, request.amount, usage=usage, dimensions=request.dimensions
        )
        fields = dataclasses.asdict(result)
        fields["parts"] = parts_message(result.parts)
        return pb.CommitResponse(**fields)

    @grpc_errors
    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(**dataclasses.asdict(await self._service.release(request.reservation_id)))

    @grpc_errors
    async def GetBalance(self, request: pb.GetBalanceRequest, context: Context) -> pb.Balance:
        return balance_message(self._engine.balance(request.customer_id))

    @grpc_errors
    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.Usage:
        return usage_message(self._engine, request.customer_id, request.period, request.top)

    @grpc_errors
    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        return pb.PingResponse()

    @grpc_errors
    async def WatchAlerts(self, request: pb.WatchAlertsRequest, context: Context) -> None:
        """A server stream: durable alerts after request.after_seq, then live ones (spendgate.server.alerts)."""
        if self._alerts is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server was built without alerts")
            return
        await self._alerts.watch(request, context)


def token_estimate(request: pb.ReserveRequest | pb.QuoteRequest) -> TokenEstimate | None:
    if not request.HasField("estimate"):
        return None
    asked = request.estimate
    return TokenEstimate(asked.model, asked.input_tokens, asked.max_output_tokens)


def parts_message(parts: tuple[tuple[str, int, int], ...]) -> list[pb.UsagePart]:
    return [pb.UsagePart(token_type=t, tokens=n, units=u) for t, n, u in parts]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def period_at(engine: _core.Engine, customer_id: str, period: str) -> int | None:
    """The time inside the period a request's `period` names (None: the current one); GetUsage's rules."""
    closed = engine.closed_periods(customer_id, 1) if period.strip() == "previous" else []
    try:
        return period_at_ms(period, previous_start_ms=closed[0]["start_ms"] if closed else None)
    except ValueError as error:
        raise invalid(str(error)) from None


def usage_message(engine: _core.Engine, customer_id: str, period: str, top: int) -> pb.Usage:
    """GetUsage's reply (also what `spendgate usage` prints)."""
    if top > MAX_TOP:
        raise invalid(f"top is {top}; ask for at most {MAX_TOP}")
    raw = engine.usage(customer_id, period_at(engine, customer_id, period))
    balance = engine.balance(customer_id)
    report = usage_report(raw, now_ms=wall_ms(), top=top or DEFAULT_TOP)
    return pb.Usage(
        customer_id=report.customer_id,
        period_start_ms=report.period_start_ms,
        period_end_ms=0 if report.period_end_ms == NEVER_MS else report.period_end_ms,
        current=report.current,
        total=report.total,
        commits=report.commits,
        included=report.included,
        limit=report.limit,
        overage=report.overage,
        included_remaining=report.included_remaining,
        projected_total=report.projected_total,
        projected_overage=report.projected_overage,
        daily=[pb.DayUsage(date=date, units=units) for date, units in report.daily],
        by_model=[pb.ModelUsage(model=m, token_type=t, tokens=n, units=u) for m, t, n, u in report.by_model],
        by_dimension=[pb.DimensionUsage(key=k, value=v, units=u) for k, v, u in report.by_dimension],
        folded_dimension_keys=report.folded_dimension_keys,
        reserved=balance.reserved,
        spent=balance.spent,
        credits_granted=raw["granted"],
        grants=raw["grants"],
        credits=raw["credits"],
    )


def period_message(spec: _core.PeriodSpec, start_ms: int, end_ms: int) -> pb.Period:
    kind = spec["kind"]
    if kind == "monthly":
        return pb.Period(kind=pb.PERIOD_KIND_MONTHLY, anchor_ms=spec["anchor_ms"])
    if kind == "fixed":
        return pb.Period(kind=pb.PERIOD_KIND_FIXED, anchor_ms=spec["anchor_ms"], start_ms=start_ms, end_ms=end_ms)
    assert kind == "lifetime", spec
    return pb.Period(kind=pb.PERIOD_KIND_LIFETIME)


def balance_message(view: _core.BalanceView) -> pb.Balance:
    end_ms = 0 if view.period_end_ms == NEVER_MS else view.period_end_ms
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
        frozen_reason=view.frozen_reason,
        included=view.included,
        soft_limit=view.soft_limit,
        mode=MODE_BY_NAME[view.mode],  # type: ignore[arg-type]
        block_overage=view.block_overage,
        parent_id=view.parent_id,
        members=view.members,
        period=period_message(view.period, view.period_start_ms, end_ms),
        period_start_ms=view.period_start_ms,
        period_end_ms=end_ms,
        breaker_multiplier=-1 if view.breaker_multiplier is None else view.breaker_multiplier,
        credits=view.credits,
        stop_at=view.stop_at,
    )

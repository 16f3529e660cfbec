"""spendgate.v1.Budget: convert the request, call the engine, wait for durability, convert the reply.

Engine calls take microseconds and keep the GIL, so they run right here on the loop thread; only the durability wait
is awaited. The engine validates every id, amount and ttl: nothing is checked twice here. A Reserve with a token
estimate or a Commit with token usage is priced first (spendgate.policy.metering); an unknown model is a denial
(DENY_REASON_UNKNOWN_MODEL), never a hold skipped.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc.aio

from spendgate import _core
from spendgate._core import EngineError
from spendgate.policy.metering import Meter, fingerprint
from spendgate.policy.prices import PriceError, TokenUsage, UnknownModelError
from spendgate.policy.usage_report import DEFAULT_TOP, MAX_TOP, NEVER_MS, period_at_ms, usage_report
from spendgate.server.alerts import AlertService
from spendgate.server.durability import DurabilityWaiter
from spendgate.server.status import grpc_errors
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from spendgate.server.alerts import AlertHub

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

MODE_BY_NAME: Final[dict[str, int]] = {"hard": pb.ENFORCEMENT_MODE_HARD, "soft": pb.ENFORCEMENT_MODE_SOFT}

# Quoted: grpc.aio.ServicerContext is generic only in the type stubs.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def invalid(message: str) -> EngineError:
    return EngineError("invalid_argument", message)


class BudgetServicer(pb_grpc.BudgetServicer):
    def __init__(
        self, engine: _core.Engine, waiter: DurabilityWaiter, meter: Meter, alerts: AlertHub | None = None
    ) -> None:
        self._engine = engine
        self._waiter = waiter
        self._meter = meter
        self._alerts = alerts

    @grpc_errors
    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        amount, model, print_, priced = request.amount, "", "", None
        if request.HasField("estimate"):
            if request.amount:
                raise invalid("give either amount or estimate, not both (leave amount 0 with an estimate)")
            estimate = request.estimate
            try:
                priced = self._meter.estimate(estimate.model, estimate.input_tokens, estimate.max_output_tokens)
            except UnknownModelError as error:
                return self._unknown_model(request.customer_id, str(error))
            except PriceError as error:
                raise invalid(str(error)) from None
            amount = priced.units
            model = priced.requested_model if priced.fallback else priced.model
            print_ = fingerprint(estimate.model, estimate.input_tokens, estimate.max_output_tokens)
        outcome = self._engine.reserve(
            request.customer_id,
            amount,
            request.idempotency_key,
            request.ttl_ms,
            model=model,
            dimensions=dict(request.dimensions) or None,  # most calls carry none: skip the conversion
            fingerprint=print_,
        )
        await self._waiter.wait(outcome.ticket)
        return pb.ReserveResponse(
            granted=outcome.granted,
            reservation_id=outcome.reservation_id,
            remaining=outcome.remaining,
            reason=outcome.reason,  # type: ignore[arg-type]
            expires_at_ms=outcome.expires_at_ms,
            replayed=outcome.replayed,
            amount=outcome.amount,
            message=deny_message(request.customer_id, amount, outcome),
            state=outcome.state,  # type: ignore[arg-type]
            over_limit=outcome.over_limit,
            decided_by=outcome.decided_by,
            priced_model=priced.model if priced else "",
            fallback_price=priced.fallback if priced else False,
        )

    def _unknown_model(self, customer_id: str, why: str) -> pb.ReserveResponse:
        balance = self._engine.balance(customer_id)  # NOT_FOUND first for a customer without a budget
        return pb.ReserveResponse(
            granted=False,
            reason=pb.DENY_REASON_UNKNOWN_MODEL,
            remaining=balance.remaining,
            message=why,
            decided_by=customer_id,
        )

    @grpc_errors
    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        amount, detail = request.amount, None
        if request.HasField("usage"):
            if request.amount:
                raise invalid("give either amount or usage, not both (leave amount 0 with usage)")
            amount, detail = self._charge(request.reservation_id, request.usage)
        outcome = self._engine.commit(
            request.reservation_id, amount, usage=detail, dimensions=dict(request.dimensions) or None
        )
        await self._waiter.wait(outcome.ticket)
        return pb.CommitResponse(
            charged=outcome.charged,
            remaining=outcome.remaining,
            over_reserved=outcome.over_reserved,
            excess=outcome.excess,
            replayed=outcome.replayed,
            hold_expired=outcome.hold_expired,
            over_limit=outcome.over_limit,
            breaker_tripped=outcome.breaker_tripped,
            parts=[pb.UsagePart(token_type=t, tokens=n, units=u) for t, n, u in detail["parts"]] if detail else [],
            priced_model=detail["model"] if detail else "",
            fallback_price=detail["fallback"] if detail else False,
        )

    def _charge(self, reservation_id: str, usage: pb.TokenUsage) -> tuple[int, _core.UsageDetail]:
        model = usage.model or self._engine.hold_model(reservation_id)
        if not model:
            raise invalid(
                f"usage has no model and reservation {reservation_id} was reserved with an amount, not an estimate:"
                " set usage.model"
            )
        try:
            return self._meter.charge(
                TokenUsage(
                    model=model,
                    input_tokens=usage.input_tokens,
                    cached_input_tokens=usage.cached_input_tokens,
                    cache_write_tokens=usage.cache_write_tokens,
                    output_tokens=usage.output_tokens,
                    reasoning_tokens=usage.reasoning_tokens,
                    cache_hit=usage.cache_hit,
                )
            )
        except UnknownModelError as error:
            # The call happened, so this must not pass silently; nothing changed, and the amount form still works.
            raise EngineError(
                "failed_precondition", f"{error}; the price table no longer prices it: commit an amount instead"
            ) from None
        except PriceError as error:
            raise invalid(str(error)) from None

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
    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.Usage:
        return usage_message(self._engine, request.customer_id, request.period, request.top)

    @grpc_errors
    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        return pb.PingResponse()

    # Set by the app (spendgate.server.app) after construction; None in a server built without alerts.
    alerts: AlertService | None = None

    @grpc_errors
    async def WatchAlerts(self, request: pb.WatchAlertsRequest, context: Context) -> None:
        """A server stream: durable alerts after request.after_seq, then live ones (spendgate.server.alerts)."""
        if self.alerts is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server was built without alerts")
        await self.alerts.watch(request, context)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def usage_message(engine: _core.Engine, customer_id: str, period: str, top: int) -> pb.Usage:
    """GetUsage's reply (also what `spendgate usage` prints)."""
    if top > MAX_TOP:
        raise invalid(f"top is {top}; ask for at most {MAX_TOP}")
    closed = engine.closed_periods(customer_id, 1) if period.strip() == "previous" else []
    try:
        at_ms = period_at_ms(period, previous_start_ms=closed[0]["start_ms"] if closed else None)
    except ValueError as error:
        raise invalid(str(error)) from None
    raw = engine.usage(customer_id, at_ms)
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
        reserved=balance.reserved,
        spent=balance.spent,
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
    )


def deny_message(customer_id: str, amount: int, outcome: _core.ReserveOutcome) -> str:
    """The human-readable reason for a denial ("" when granted). The engine gives only the reason's number."""
    if outcome.granted:
        assert outcome.reason == _core.DENY_NONE, outcome.reason
        return ""
    who = outcome.decided_by or customer_id
    level = f"budget {who!r}" if who == customer_id else f"org budget {who!r} (of {customer_id!r})"
    if outcome.reason == _core.DENY_INSUFFICIENT_BUDGET:
        return (
            f"{level} has {outcome.remaining} units left, fewer than the {amount} asked for: raise its limit or wait"
            " for holds to be committed, released or expired"
        )
    if outcome.reason == _core.DENY_OVERAGE_BLOCKED:
        return (
            f"{level} has used its included quota and its block-overage kill switch is on: {amount} units would be"
            " overage; turn block_overage off (Admin.SetBudget) or raise the included quota"
        )
    if outcome.reason == _core.DENY_TOO_MANY_HOLDS:
        return (
            f"budget {customer_id!r} has the most open holds allowed (max_holds_per_budget): commit or release some"
            " first"
        )
    if outcome.reason == _core.DENY_FROZEN:
        return f"{level} is frozen: unfreeze it with Admin.FreezeBudget (frozen=false)"
    if outcome.reason == _core.DENY_HOLD_ENDED:
        state = pb.HoldState.Name(outcome.state or 0).removeprefix("HOLD_STATE_").lower()  # type: ignore[arg-type]
        return (
            f"this idempotency_key's reservation {outcome.reservation_id} was already {state}, so nothing is held for"
            " this call: reserve again under a new idempotency_key before calling the model"
        )
    raise AssertionError(f"a denial without a known reason: {outcome.reason}")

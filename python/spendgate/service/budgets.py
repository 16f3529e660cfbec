"""Reserve, Commit and Release with no transport: the decisions every front shares (gRPC servicer, HTTP proxy).

    service = BudgetService(engine, waiter.wait, Meter(PriceBook(None)))
    held = await service.reserve("cus_1", estimate=TokenEstimate("gpt-6-sol", 12_000, 2_000))
    if held.granted:
        done = await service.commit(held.reservation_id, usage=Usage(model="gpt-6-sol", input_tokens=11_800))

Engine calls take microseconds and keep the GIL, so they run on the caller's thread (the event loop); only the
durability wait is awaited: a result is returned only once its change is durable. The engine validates every id,
amount and ttl: nothing is checked twice here. A Reserve with a token estimate or a Commit with token usage is priced
first (spendgate.policy.metering); an unknown model is a denial (DENY_UNKNOWN_MODEL), never a hold skipped. Errors
are raised as the engine's EngineError (its `kind` says which status a front should answer with).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Protocol

from spendgate import _core
from spendgate._core import EngineError
from spendgate.policy.metering import Meter, fingerprint
from spendgate.policy.prices import Estimate, PriceError, TokenUsage, UnknownModelError

# Waits until a durability ticket is durable (spendgate.server.durability.DurabilityWaiter.wait in the sidecar).
WaitDurable = Callable[[int], Awaitable[None]]

# The contract's names of the deny reasons (spendgate.v1.DenyReason), for fronts that show them as text.
REASON_NAMES: Final[Mapping[int, str]] = {
    _core.DENY_NONE: "DENY_REASON_UNSPECIFIED",
    _core.DENY_INSUFFICIENT_BUDGET: "DENY_REASON_INSUFFICIENT_BUDGET",
    _core.DENY_TOO_MANY_HOLDS: "DENY_REASON_TOO_MANY_HOLDS",
    _core.DENY_FROZEN: "DENY_REASON_FROZEN",
    _core.DENY_OVERAGE_BLOCKED: "DENY_REASON_OVERAGE_BLOCKED",
    _core.DENY_UNKNOWN_MODEL: "DENY_REASON_UNKNOWN_MODEL",
    _core.DENY_HOLD_ENDED: "DENY_REASON_HOLD_ENDED",
}
# HoldState numbers in words (the contract's names, without HOLD_STATE_, lower case).
HOLD_STATE_WORDS: Final[Mapping[int, str]] = {
    _core.HOLD_ACTIVE: "active",
    _core.HOLD_COMMITTED: "committed",
    _core.HOLD_RELEASED: "released",
    _core.HOLD_EXPIRED: "expired",
}


class BudgetEngine(Protocol):
    """What the service needs of the engine (spendgate._core.Engine has it; tests pass a fake)."""

    def reserve(
        self,
        customer_id: str,
        amount: int,
        idempotency_key: str = "",
        ttl_ms: int = 0,
        *,
        model: str = "",
        dimensions: dict[str, str] | None = None,
        fingerprint: str = "",
    ) -> _core.ReserveOutcome: ...

    def commit(
        self,
        reservation_id: str,
        amount: int,
        *,
        usage: _core.UsageDetail | None = None,
        dimensions: dict[str, str] | None = None,
    ) -> _core.CommitOutcome: ...

    def release(self, reservation_id: str) -> _core.ReleaseOutcome: ...

    def quote(self, customer_id: str, amount: int) -> _core.ReserveOutcome: ...

    def balance(self, customer_id: str) -> _core.BalanceView: ...

    def hold_model(self, reservation_id: str) -> str: ...


class CreditsEngine(Protocol):
    """What grant_credits needs of the engine."""

    def grant_credits(
        self, customer_id: str, amount: int, idempotency_key: str, reason: str = ""
    ) -> _core.GrantOutcome: ...


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEstimate:
    """The worst case of a call in tokens: priced by the table in force into the amount to hold."""

    model: str
    input_tokens: int
    max_output_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """What a call used, in disjoint counts (spendgate.policy.TokenUsage); `model` "" means the model reserved with."""

    model: str = ""
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_hit: bool = False

    @classmethod
    def of(cls, usage: TokenUsage) -> Usage:
        return cls(**{field.name: getattr(usage, field.name) for field in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True, slots=True)
class ReserveResult:
    granted: bool
    reservation_id: str
    remaining: int
    reason: int  # a DENY_* number (DENY_NONE when granted); REASON_NAMES has its contract name
    message: str  # why it was denied and how to fix it; "" when granted
    expires_at_ms: int = 0
    replayed: bool = False
    amount: int = 0
    state: int = 0
    over_limit: bool = False
    decided_by: str = ""
    priced_model: str = ""
    fallback_price: bool = False
    parts: tuple[
        tuple[str, int, int], ...
    ] = ()  # an estimate's worst case: (token_type, tokens, units), summing to amount


@dataclasses.dataclass(frozen=True, slots=True)
class QuoteResult:
    """What a Reserve would answer now (Budget.Quote); nothing was held."""

    granted: bool
    reason: int  # a DENY_* number (DENY_NONE when it would be granted)
    message: str
    amount: int  # what the Reserve would hold
    remaining: int  # available now, before the call
    over_limit: bool = False
    decided_by: str = ""
    priced_model: str = ""
    fallback_price: bool = False
    parts: tuple[tuple[str, int, int], ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class _Priced:
    """A Reserve's or Quote's amount, from the request's amount or its estimate priced by the table in force."""

    amount: int
    model: str = ""  # the model the hold remembers for its Commit
    fingerprint: str = ""
    estimate: Estimate | None = None
    unknown_model: str = ""  # why the estimate's model has no price: the call is denied, nothing is asked

    @property
    def parts(self) -> tuple[tuple[str, int, int], ...]:
        lines = self.estimate.breakdown if self.estimate else ()
        return tuple((line.token_type, line.tokens, line.units) for line in lines)


@dataclasses.dataclass(frozen=True, slots=True)
class CommitResult:
    charged: int
    remaining: int
    over_reserved: bool = False
    excess: int = 0
    replayed: bool = False
    hold_expired: bool = False
    over_limit: bool = False
    breaker_tripped: bool = False
    parts: tuple[tuple[str, int, int], ...] = ()  # (token_type, tokens, units), summing to `charged`
    priced_model: str = ""
    fallback_price: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ReleaseResult:
    released: bool
    remaining: int
    state: int
    replayed: bool


def invalid(message: str) -> EngineError:
    return EngineError("invalid_argument", message)


class BudgetService:
    """Reserve, Commit, Release and balance against one engine, with the price table of `meter`."""

    def __init__(self, engine: BudgetEngine, wait_durable: WaitDurable, meter: Meter) -> None:
        self._engine = engine
        self._wait = wait_durable
        self.meter = meter

    def _price(self, amount: int, estimate: TokenEstimate | None) -> _Priced:
        """The amount to hold: `amount`, or the worst case of `estimate` (give one, not both). Reserve and Quote both
        price here, so a Quote holds exactly what the Reserve would."""
        if estimate is None:
            return _Priced(amount)
        if amount:
            raise invalid("give either amount or estimate, not both (leave amount 0 with an estimate)")
        try:
            priced = self.meter.estimate(estimate.model, estimate.input_tokens, estimate.max_output_tokens)
        except UnknownModelError as error:
            return _Priced(0, unknown_model=str(error))
        except PriceError as error:
            raise invalid(str(error)) from None
        return _Priced(
            amount=priced.units,
            model=priced.requested_model if priced.fallback else priced.model,
            fingerprint=fingerprint(estimate.model, estimate.input_tokens, estimate.max_output_tokens),
            estimate=priced,
        )

    async def reserve(
        self,
        customer_id: str,
        amount: int = 0,
        *,
        estimate: TokenEstimate | None = None,
        idempotency_key: str = "",
        ttl_ms: int = 0,
        dimensions: Mapping[str, str] | None = None,
    ) -> ReserveResult:
        """Hold `amount`, or the worst case of `estimate` priced by the table (give one, not both)."""
        priced = self._price(amount, estimate)
        if priced.unknown_model:
            return self._unknown_model(customer_id, priced.unknown_model)
        outcome = self._engine.reserve(
            customer_id, priced.amount, idempotency_key, ttl_ms, model=priced.model,
            dimensions=dict(dimensions) if dimensions else None,  # most calls carry none: skip the conversion
            fingerprint=priced.fingerprint,
        )  # fmt: skip
        await self._wait(outcome.ticket)
        return ReserveResult(
            granted=outcome.granted,
            reservation_id=outcome.reservation_id,
            remaining=outcome.remaining,
            reason=outcome.reason,
            message=deny_message(
                customer_id, priced.amount, outcome, stop_at=self._binding_stop_at(customer_id, outcome)
            ),
            expires_at_ms=outcome.expires_at_ms,
            replayed=outcome.replayed,
            amount=outcome.amount,
            state=outcome.state,
            over_limit=outcome.over_limit,
            decided_by=outcome.decided_by,
            priced_model=priced.estimate.model if priced.estimate else "",
            fallback_price=priced.estimate.fallback if priced.estimate else False,
            parts=priced.parts if outcome.amount == priced.amount else (),  # a replay holds what it first held
        )

    def quote(self, customer_id: str, amount: int = 0, *, estimate: TokenEstimate | None = None) -> QuoteResult:
        """What reserve(customer_id, amount, estimate=...) would answer now, holding nothing: priced here, decided by
        the engine's admission checks without taking anything. Nothing to wait for: nothing changed."""
        priced = self._price(amount, estimate)
        if priced.unknown_model:
            denial = self._unknown_model(customer_id, priced.unknown_model)
            return QuoteResult(
                granted=False,
                reason=denial.reason,
                message=denial.message,
                amount=0,
                remaining=denial.remaining,
                decided_by=denial.decided_by,
            )
        outcome = self._engine.quote(customer_id, priced.amount)
        assert outcome.ticket == 0 and not outcome.reservation_id, outcome
        return QuoteResult(
            granted=outcome.granted,
            reason=outcome.reason,
            message=deny_message(
                customer_id, priced.amount, outcome, stop_at=self._binding_stop_at(customer_id, outcome)
            ),
            amount=outcome.amount,
            remaining=outcome.remaining,
            over_limit=outcome.over_limit,
            decided_by=outcome.decided_by,
            priced_model=priced.estimate.model if priced.estimate else "",
            fallback_price=priced.estimate.fallback if priced.estimate else False,
            parts=priced.parts,
        )

    def _binding_stop_at(self, customer_id: str, outcome: _core.ReserveOutcome) -> int:
        """The stop-at that refused this Reserve (0: none did), so the message names it. Denials only."""
        if outcome.granted or outcome.reason != _core.DENY_INSUFFICIENT_BUDGET:
            return 0
        view = self._engine.balance(outcome.decided_by or customer_id)
        return view.stop_at if 0 < view.stop_at < view.limit else 0

    def _unknown_model(self, customer_id: str, why: str) -> ReserveResult:
        balance = self._engine.balance(customer_id)  # NOT_FOUND first for a customer without a budget
        return ReserveResult(
            granted=False,
            reservation_id="",
            remaining=balance.remaining,
            reason=_core.DENY_UNKNOWN_MODEL,
            message=why,
            decided_by=customer_id,
        )

    async def commit(
        self,
        reservation_id: str,
        amount: int = 0,
        *,
        usage: Usage | None = None,
        dimensions: Mapping[str, str] | None = None,
    ) -> CommitResult:
        """Post `amount`, or `usage` priced exactly by the table (give one, not both); the rest of the hold is freed."""
        detail = None
        if usage is not None:
            if amount:
                raise invalid("give either amount or usage, not both (leave amount 0 with usage)")
            amount, detail = self._charge(reservation_id, usage)
        outcome = self._engine.commit(
            reservation_id, amount, usage=detail, dimensions=dict(dimensions) if dimensions else None
        )
        await self._wait(outcome.ticket)
        return CommitResult(
            charged=outcome.charged,
            remaining=outcome.remaining,
            over_reserved=outcome.over_reserved,
            excess=outcome.excess,
            replayed=outcome.replayed,
            hold_expired=outcome.hold_expired,
            over_limit=outcome.over_limit,
            breaker_tripped=outcome.breaker_tripped,
            parts=tuple(detail["parts"]) if detail else (),
            priced_model=detail["model"] if detail else "",
            fallback_price=detail["fallback"] if detail else False,
        )

    def _charge(self, reservation_id: str, usage: Usage) -> tuple[int, _core.UsageDetail]:
        model = usage.model or self._engine.hold_model(reservation_id)
        if not model:
            raise invalid(
                f"usage has no model and reservation {reservation_id} was reserved with an amount, not an estimate:"
                " set usage.model"
            )
        try:
            return self.meter.charge(dataclasses.replace(_token_usage(usage), model=model))
        except UnknownModelError as error:
            # The call happened, so this must not pass silently; nothing changed, and the amount form still works.
            raise EngineError(
                "failed_precondition", f"{error}; the price table no longer prices it: commit an amount instead"
            ) from None
        except PriceError as error:
            raise invalid(str(error)) from None

    async def release(self, reservation_id: str) -> ReleaseResult:
        outcome = self._engine.release(reservation_id)
        await self._wait(outcome.ticket)
        return ReleaseResult(
            released=outcome.released, remaining=outcome.remaining, state=outcome.state, replayed=outcome.replayed
        )

    def balance(self, customer_id: str) -> _core.BalanceView:
        """The budget's live counters; EngineError("not_found") for a customer without a budget."""
        return self._engine.balance(customer_id)


async def grant_credits(
    engine: CreditsEngine,
    wait_durable: WaitDurable,
    customer_id: str,
    amount: int,
    idempotency_key: str,
    reason: str = "",
) -> _core.GrantOutcome:
    """Admin.GrantCredits: add `amount` credits to the budget's limit, once per key; returns once durable (a replay
    waits for the first call's grant). Errors: invalid_argument (bad input, or limit + credits past
    MAX_AMOUNT_UNITS), not_found (no budget), already_exists (the key granted another customer or amount)."""
    if not idempotency_key:
        raise invalid(
            "idempotency_key is required: one key per grant, the same key again on a retry (--key on the CLI)"
        )
    outcome = engine.grant_credits(customer_id, amount, idempotency_key, reason)
    await wait_durable(outcome.ticket)
    return outcome


def _token_usage(usage: Usage) -> TokenUsage:
    # TokenUsage checks every count; the model is set by the caller (a placeholder passes the name check).
    fields = {field.name: getattr(usage, field.name) for field in dataclasses.fields(Usage) if field.name != "model"}
    try:
        return TokenUsage(model=usage.model or "-", **fields)
    except PriceError as error:
        raise invalid(str(error)) from None


def reason_name(reason: int) -> str:
    """The contract's name of a deny reason number (DENY_REASON_<n> for one this build does not know)."""
    return REASON_NAMES.get(reason, f"DENY_REASON_{reason}")


def deny_message(customer_id: str, amount: int, outcome: _core.ReserveOutcome, *, stop_at: int = 0) -> str:
    """The human-readable reason for a denial ("" when granted). The engine gives only the reason's number.
    `stop_at`: the deciding budget's own stop-at when it (not the limit) is what refused."""
    if outcome.granted:
        assert outcome.reason == _core.DENY_NONE, outcome.reason
        return ""
    who = outcome.decided_by or customer_id
    level = f"budget {who!r}" if who == customer_id else f"org budget {who!r} (of {customer_id!r})"
    if outcome.reason == _core.DENY_INSUFFICIENT_BUDGET and stop_at:
        return (
            f"{level} has {outcome.remaining} units left, fewer than the {amount} asked for, under the stop-at of "
            f"{stop_at} units its customer set on the usage page: the customer can raise or remove it there"
        )
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
        state = HOLD_STATE_WORDS.get(outcome.state, "unspecified")
        return (
            f"this idempotency_key's reservation {outcome.reservation_id} was already {state}, so nothing is held for"
            " this call: reserve again under a new idempotency_key before calling the model"
        )
    raise AssertionError(f"a denial without a known reason: {outcome.reason}")

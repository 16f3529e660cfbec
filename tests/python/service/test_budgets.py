"""spendgate.service.budgets: the transport-free Reserve/Commit/Release, against a fake engine.

The fake keeps one budget's counters in memory and hands out durability tickets; the service must price estimates
and usage with the table, wait for every ticket before it answers, word denials, and raise EngineError for bad input.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from spendgate import _core
from spendgate._core import EngineError
from spendgate.policy.metering import Meter
from spendgate.policy.price_book import PriceBook
from spendgate.policy.prices import TokenUsage
from spendgate.service import BudgetService, TokenEstimate, Usage, reason_name

MODEL = "gpt-6-sol"


class FakeEngine:
    """One process's budgets in dicts: enough of spendgate._core.Engine for the service."""

    def __init__(self) -> None:
        self.budgets: dict[str, dict[str, int]] = {}
        self.holds: dict[str, dict[str, Any]] = {}
        self.tickets = itertools.count(1)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def add(self, customer_id: str, limit: int) -> None:
        self.budgets[customer_id] = {"limit": limit, "spent": 0, "reserved": 0}

    def _budget(self, customer_id: str) -> dict[str, int]:
        if customer_id not in self.budgets:
            raise EngineError("not_found", f"no budget for customer {customer_id!r}")
        return self.budgets[customer_id]

    def _remaining(self, budget: dict[str, int]) -> int:
        return budget["limit"] - budget["spent"] - budget["reserved"]

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
    ) -> Any:
        self.calls.append(
            (
                "reserve",
                {
                    "amount": amount,
                    "model": model,
                    "fingerprint": fingerprint,
                    "dimensions": dimensions,
                    "ttl_ms": ttl_ms,
                },
            )
        )
        budget = self._budget(customer_id)
        if amount > self._remaining(budget):
            return SimpleNamespace(
                granted=False,
                reservation_id="",
                remaining=self._remaining(budget),
                reason=_core.DENY_INSUFFICIENT_BUDGET,
                expires_at_ms=0,
                replayed=False,
                amount=0,
                state=0,
                over_limit=False,
                decided_by=customer_id,
                ticket=0,
            )
        budget["reserved"] += amount
        rid = f"rsv_{len(self.holds) + 1}"
        self.holds[rid] = {"customer": customer_id, "amount": amount, "model": model}
        return SimpleNamespace(
            granted=True,
            reservation_id=rid,
            remaining=self._remaining(budget),
            reason=_core.DENY_NONE,
            expires_at_ms=123,
            replayed=False,
            amount=amount,
            state=_core.HOLD_ACTIVE,
            over_limit=False,
            decided_by="",
            ticket=next(self.tickets),
        )

    def commit(self, reservation_id: str, amount: int, *, usage: Any = None, dimensions: Any = None) -> Any:
        self.calls.append(("commit", {"amount": amount, "usage": usage}))
        hold = self.holds.pop(reservation_id)
        budget = self.budgets[hold["customer"]]
        budget["reserved"] -= hold["amount"]
        budget["spent"] += amount
        return SimpleNamespace(
            charged=amount,
            remaining=self._remaining(budget),
            over_reserved=amount > hold["amount"],
            excess=max(0, amount - hold["amount"]),
            replayed=False,
            hold_expired=False,
            over_limit=False,
            breaker_tripped=False,
            ticket=next(self.tickets),
        )

    def release(self, reservation_id: str) -> Any:
        hold = self.holds.pop(reservation_id)
        budget = self.budgets[hold["customer"]]
        budget["reserved"] -= hold["amount"]
        return SimpleNamespace(
            released=True,
            remaining=self._remaining(budget),
            state=_core.HOLD_RELEASED,
            replayed=False,
            ticket=next(self.tickets),
        )

    def balance(self, customer_id: str) -> Any:
        budget = self._budget(customer_id)
        return SimpleNamespace(customer_id=customer_id, remaining=self._remaining(budget), stop_at=0, **budget)

    def hold_model(self, reservation_id: str) -> str:
        return str(self.holds[reservation_id]["model"])


class Waiter:
    """Records the tickets waited for; `gate` holds every wait until set (to prove the service awaits it)."""

    def __init__(self) -> None:
        self.waited: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def wait(self, ticket: int) -> None:
        await self.gate.wait()
        self.waited.append(ticket)


@pytest.fixture
def parts() -> tuple[FakeEngine, Waiter, BudgetService]:
    engine, waiter = FakeEngine(), Waiter()
    return engine, waiter, BudgetService(engine, waiter.wait, Meter(PriceBook(None)))


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_an_estimate_is_held_at_the_price_tables_worst_case(parts: Any) -> None:
    engine, waiter, service = parts
    engine.add("cus", 10**9)
    table = service.meter.book.table
    result = run(service.reserve("cus", estimate=TokenEstimate(MODEL, 12_000, 2_000)))
    assert result.granted and result.amount == table.estimate(MODEL, 12_000, 2_000).units
    assert result.priced_model == MODEL and result.message == "" and result.reason == _core.DENY_NONE
    assert engine.calls[-1][1]["model"] == MODEL and engine.calls[-1][1]["fingerprint"] == f"{MODEL}|12000|2000"
    assert waiter.waited == [1]


def test_a_reply_waits_for_durability() -> None:
    async def scenario() -> None:
        engine, waiter = FakeEngine(), Waiter()
        engine.add("cus", 100)
        service = BudgetService(engine, waiter.wait, Meter(PriceBook(None)))
        waiter.gate.clear()
        task = asyncio.ensure_future(service.reserve("cus", 10))
        await asyncio.sleep(0.01)
        assert not task.done()  # the engine granted it, but it is not durable yet
        waiter.gate.set()
        assert (await task).granted

    run(scenario())


def test_a_denial_says_why_and_how_much_is_left(parts: Any) -> None:
    engine, _, service = parts
    engine.add("cus", 100)
    result = run(service.reserve("cus", 101))
    assert not result.granted and result.reason == _core.DENY_INSUFFICIENT_BUDGET and result.remaining == 100
    assert "100 units left, fewer than the 101 asked for" in result.message
    assert reason_name(result.reason) == "DENY_REASON_INSUFFICIENT_BUDGET"


def test_an_unknown_model_is_a_denial_and_nothing_is_held(parts: Any) -> None:
    engine, _, service = parts
    engine.add("cus", 100)
    result = run(service.reserve("cus", estimate=TokenEstimate("no-such-model", 10, 10)))
    assert not result.granted and result.reason == _core.DENY_UNKNOWN_MODEL and "no-such-model" in result.message
    assert engine.calls == [] and engine.budgets["cus"]["reserved"] == 0


def test_an_unknown_model_for_a_customer_without_a_budget_is_not_found(parts: Any) -> None:
    _, _, service = parts
    with pytest.raises(EngineError) as raised:
        run(service.reserve("nobody", estimate=TokenEstimate("no-such-model", 10, 10)))
    assert raised.value.kind == "not_found"


def test_amount_and_estimate_together_are_invalid(parts: Any) -> None:
    engine, _, service = parts
    engine.add("cus", 100)
    with pytest.raises(EngineError) as raised:
        run(service.reserve("cus", 5, estimate=TokenEstimate(MODEL, 1, 1)))
    assert raised.value.kind == "invalid_argument" and engine.calls == []


def test_usage_is_charged_exactly_with_its_parts_and_the_rest_is_freed(parts: Any) -> None:
    engine, waiter, service = parts
    engine.add("cus", 10**9)
    held = run(service.reserve("cus", estimate=TokenEstimate(MODEL, 12_000, 2_000)))
    usage = Usage(input_tokens=9_000, cached_input_tokens=3_000, output_tokens=500, reasoning_tokens=700)
    done = run(service.commit(held.reservation_id, usage=usage))  # the model comes from the hold
    bill = service.meter.book.table.charge(TokenUsage(MODEL, 9_000, 3_000, 0, 500, 700))
    assert done.charged == bill.units and sum(u for _, _, u in done.parts) == bill.units
    assert {t for t, _, _ in done.parts} == {"input", "cached_input", "output", "reasoning"}
    assert done.priced_model == MODEL and engine.budgets["cus"] == {"limit": 10**9, "spent": bill.units, "reserved": 0}
    assert waiter.waited == [1, 2]


def test_usage_without_a_model_on_an_amount_hold_is_invalid(parts: Any) -> None:
    engine, _, service = parts
    engine.add("cus", 100)
    held = run(service.reserve("cus", 10))
    with pytest.raises(EngineError) as raised:
        run(service.commit(held.reservation_id, usage=Usage(input_tokens=1)))
    assert raised.value.kind == "invalid_argument" and "set usage.model" in raised.value.message
    assert engine.holds  # nothing changed


def test_a_cache_hit_costs_nothing(parts: Any) -> None:
    engine, _, service = parts
    engine.add("cus", 10**9)
    held = run(service.reserve("cus", estimate=TokenEstimate(MODEL, 100, 100)))
    done = run(service.commit(held.reservation_id, usage=Usage(input_tokens=100, cache_hit=True)))
    assert done.charged == 0 and done.parts == ()


def test_release_frees_the_hold(parts: Any) -> None:
    engine, _, service = parts
    engine.add("cus", 100)
    held = run(service.reserve("cus", 60))
    released = run(service.release(held.reservation_id))
    assert released.released and released.remaining == 100 and released.state == _core.HOLD_RELEASED


def test_the_service_imports_no_transport() -> None:
    import ast

    import spendgate.service.budgets as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    for name in imported:
        assert not name.startswith(("grpc", "aiohttp", "spendgate.server", "spendgate.proxy", "spendgate.v1")), name

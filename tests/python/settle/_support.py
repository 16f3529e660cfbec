"""Helpers for the settlement tests: an in-process engine and settler against the fake Stripe, and, for the end-to-end
tests, the environment that points a real sidecar process at the fake."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from spendgate import _core
from spendgate.server.durability import DurabilityWaiter
from spendgate.settle.aggregate import MeterEvent
from spendgate.settle.preflight import Preflight
from spendgate.settle.service import make_transport
from spendgate.settle.settler import SettleOptions, Settler, Transport, wall_ms
from spendgate.testing.fake_stripe import DEFAULT_API_KEY, FakeStripe

T = TypeVar("T")
HANG_GUARD_S = 60.0  # not a timing assertion: a bug fails the test instead of hanging it
LONG_TTL_MS = 600_000


def commit(engine: _core.Engine, customer_id: str, amount: int, *, usage: _core.UsageDetail | None = None) -> str:
    """Reserve and commit `amount` for a customer (budget must exist), with token `usage` if given (its parts must sum
    to amount); returns the reservation id, once durable."""
    reserved = engine.reserve(customer_id, max(amount, 1), "", LONG_TTL_MS)
    assert reserved.granted, reserved.reason
    committed = engine.commit(reserved.reservation_id, amount, usage=usage)
    engine.wait_durable(committed.ticket)
    return reserved.reservation_id


def token_usage(model: str, **tokens: int) -> _core.UsageDetail:
    """A priced usage with one unit per 10 tokens (at least 1) of each type: settlement sends the tokens."""
    parts = [(token_type, count, max(1, count // 10)) for token_type, count in tokens.items()]
    return {"model": model, "parts": parts, "cache_hit": False, "fallback": False}


def commit_tokens(engine: _core.Engine, customer_id: str, usage: _core.UsageDetail) -> str:
    return commit(engine, customer_id, sum(units for _, _, units in usage["parts"]), usage=usage)


class CrashAfterSend:
    """A transport that sends for real, then fails as if the process died before the acknowledgement: the events are
    recorded at Stripe, and the entries stay in the outbox, claimed."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.name, self.event_name = inner.name, inner.event_name
        self.max_events_per_call, self.validates_meter = inner.max_events_per_call, inner.validates_meter

    def send(self, events: Sequence[MeterEvent]) -> None:
        self.inner.send(events)
        raise RuntimeError("crashed after the send")

    def close(self) -> None:
        self.inner.close()


class CrashBeforeSend(CrashAfterSend):
    """The process died after the claim was durable and before anything reached Stripe."""

    def send(self, events: Sequence[MeterEvent]) -> None:
        raise RuntimeError("crashed after the claim, before the send")


def budget(engine: _core.Engine, customer_id: str, stripe_customer_id: str, limit: int = 10**12) -> None:
    engine.wait_durable(engine.set_budget(customer_id, limit, stripe_customer_id).ticket)


@contextlib.contextmanager
def engine_with_budgets(data_dir: Path, stripe_customers: Iterable[str]) -> Iterator[_core.Engine]:
    """An engine (relaxed durability) with a budget per Stripe customer, named like it without `cus_`; closed after."""
    engine = _core.Engine(str(data_dir), durability="relaxed")
    try:
        for customer in stripe_customers:
            budget(engine, customer.removeprefix("cus_"), customer)
        yield engine
    finally:
        engine.close()


def options(**overrides: Any) -> SettleOptions:
    """Fast options for tests: tiny backoff, tiny interval."""
    base: dict[str, Any] = {"interval_ms": 10, "backoff_base_ms": 1, "backoff_max_ms": 20}
    return SettleOptions(**{**base, **overrides})


def make_settler(
    engine: _core.Engine,
    fake: FakeStripe,
    waiter: DurabilityWaiter,
    *,
    api_key: str = DEFAULT_API_KEY,
    clock_ms: Callable[[], int] = wall_ms,
    wrap: Callable[[Transport], Transport] | None = None,
    **overrides: Any,
) -> Settler:
    opts = options(**overrides)
    client = fake.client(api_key)
    transport = make_transport(client, opts)
    if wrap is not None:
        transport = wrap(transport)
    preflight = Preflight(client, opts.event_name, check_meter=not transport.validates_meter)
    return Settler(
        engine, transport, opts, wait_durable=waiter.wait, preflight=preflight, clock_ms=clock_ms, rng=random.Random(7)
    )


def run_async(engine: _core.Engine, body: Callable[[DurabilityWaiter], Awaitable[T]]) -> T:
    """asyncio.run(body(waiter)) with a DurabilityWaiter on the engine, always closed, under a hang guard."""

    async def main() -> T:
        waiter = DurabilityWaiter(engine)
        try:
            return await asyncio.wait_for(body(waiter), HANG_GUARD_S)
        finally:
            waiter.close()

    return asyncio.run(main())


def settle(engine: _core.Engine, fake: FakeStripe, **kwargs: Any) -> Settler:
    """Run a fresh settler until the outbox is empty; returns it (closed)."""

    async def body(waiter: DurabilityWaiter) -> Settler:
        settler = make_settler(engine, fake, waiter, **kwargs)
        try:
            await settler.run(until_empty=True)
        finally:
            settler.close()
        return settler

    return run_async(engine, body)


def rounds(engine: _core.Engine, fake: FakeStripe, n: int = 1, **kwargs: Any) -> Settler:
    """Run exactly n rounds of a fresh settler."""

    async def body(waiter: DurabilityWaiter) -> Settler:
        settler = make_settler(engine, fake, waiter, **kwargs)
        try:
            for _ in range(n):
                await settler.run_once()
        finally:
            settler.close()
        return settler

    return run_async(engine, body)


def meter_event_posts(fake: FakeStripe) -> int:
    return sum(
        1 for r in fake.request_log() if r["path"] in ("/v1/billing/meter_events", "/v2/billing/meter_event_stream")
    )


def sidecar_env(fake: FakeStripe, *, api_key: str = "sk_test_spendgate", **settings: object) -> dict[str, str]:
    """The environment of a sidecar process that settles to `fake` (which must be FakeStripe(same_host=True): the one
    STRIPE_API_BASE names every base address). settings: settle_* and other settings by name."""
    assert fake.url == fake.meter_events_url, "use FakeStripe(same_host=True)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "STRIPE_"))}
    env["STRIPE_API_KEY"] = api_key
    env["STRIPE_API_BASE"] = fake.url
    defaults: Mapping[str, object] = {
        "settle_interval_ms": 50,
        "settle_backoff_base_ms": 10,
        "settle_backoff_max_ms": 500,
    }
    for name, value in {**defaults, **settings}.items():
        env[f"SPENDGATE_{name.upper()}"] = str(value)
    return env


def no_stripe_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "STRIPE_"))}


def spendgate_cli(*args: str, env: Mapping[str, str], timeout_s: float = 120.0) -> Any:
    """`python -m spendgate ARGS` in a child process running this checkout's package; a CompletedProcess (text)."""
    import subprocess
    import sys
    from pathlib import Path

    import spendgate

    package_root = str(Path(spendgate.__file__).resolve().parents[1])
    child = dict(env)
    child["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, child.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "spendgate", *args], env=child, capture_output=True, text=True, timeout=timeout_s
    )

"""Settlement throughput: committed usages drained from a real outbox to the fake Stripe, in events per second.

The fake Stripe runs in its own process (`python -m spendgate.testing.fake_stripe`), so the settler's HTTP calls cross
a real socket to another interpreter, as they would to Stripe. The outbox is filled first (relaxed durability, to fill
it fast), then timed while the settler drains it to empty: v1 (one event a request) and the v2 stream (100 a request).
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, Final

# (transport, settler concurrency, events) per row; --quick drains fewer.
ROWS: Final[tuple[tuple[str, int, int], ...]] = (("v1", 4, 4_000), ("v2", 4, 40_000))
QUICK_ROWS: Final[tuple[tuple[str, int, int], ...]] = (("v1", 4, 500), ("v2", 4, 5_000))
CUSTOMERS: Final[tuple[str, ...]] = ("cus_bench_a", "cus_bench_b")
FAKE_START_TIMEOUT_S: Final[float] = 30.0
# While filling the outbox, wait for durability this often (each event is two ops: Reserve and Commit).
FILL_WAIT_EVERY: Final[int] = 5_000


def run(quick: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for transport, concurrency, events in QUICK_ROWS if quick else ROWS:
        seconds = _drain_once(transport, concurrency, events)
        rows.append({"transport": transport, "concurrency": concurrency, "events": events,
                     "seconds": round(seconds, 3), "events_per_s": round(events / seconds, 1)})
        log(f"settlement {transport} x{concurrency}: {events} events in {seconds:.2f} s = {events / seconds:,.0f}/s")
    return rows


def _drain_once(transport: str, concurrency: int, events: int) -> float:
    args = [sys.executable, "-m", "spendgate.testing.fake_stripe", "--same-host"]
    for customer in CUSTOMERS:
        args += ["--customer", customer]
    fake = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        match = re.search(r"(http://\S+)", fake.stdout.readline())
        assert match, "the fake Stripe did not print its address"
        return asyncio.run(_fill_and_drain(match.group(1), transport, concurrency, events))
    finally:
        fake.terminate()
        fake.wait(timeout=FAKE_START_TIMEOUT_S)


async def _fill_and_drain(url: str, transport: str, concurrency: int, events: int) -> float:
    from spendgate import _core
    from spendgate.config import Settings
    from spendgate.server.durability import DurabilityWaiter
    from spendgate.settle import SettlementService

    logging.getLogger("spendgate").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="spendgate-bench-settle-") as data_dir:
        engine = _core.Engine(data_dir, durability="relaxed", max_holds_per_budget=events + 1)
        budgets = [f"bench-{i}" for i in range(len(CUSTOMERS))]
        for budget, customer in zip(budgets, CUSTOMERS):
            engine.set_budget(budget, 1 << 50, customer)
        ticket = 0
        for i in range(events):
            hold = engine.reserve(budgets[i % len(budgets)], 10)
            ticket = engine.commit(hold.reservation_id, 1 + i % 7).ticket
            if i % FILL_WAIT_EVERY == 0:  # stay far below write_queue_capacity
                engine.wait_durable(ticket)
        engine.wait_durable(ticket)
        waiter = DurabilityWaiter(engine)
        settings = Settings(stripe_api_key="sk_test_bench", stripe_api_base=url, settle_transport=transport,
                            settle_concurrency=concurrency, settle_interval_ms=50)
        service = SettlementService(engine, settings, waiter.wait)
        started = time.perf_counter()
        await service.run(until_empty=True)
        seconds = time.perf_counter() - started
        depth = engine.outbox_stats()["depth"]
        assert depth == 0, f"the settler stopped with {depth} entries left"
        service.close()
        waiter.close()
        engine.close()
        return seconds


def render(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["## 4. Settlement to Stripe (the fake, in its own process)", "",
             "Committed usages drained from the outbox to `spendgate.testing.fake_stripe` until empty: v1 sends one "
             "meter event a request, v2 the meter event stream with 100 a request. Exactly-once machinery included "
             "(claim before send, ack after acceptance).", "",
             "| transport | settler concurrency | events | seconds | events/s |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['transport']} | {r['concurrency']} | {r['events']:,} | {r['seconds']} | "
                     f"{r['events_per_s']:,.0f} |")
    return lines + [""]

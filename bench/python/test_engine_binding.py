"""spendgate._core through its Python binding, with pytest-benchmark: what one engine op costs a Python caller.

One op = `reserve(customer, 1)` then `commit(reservation_id, 1)`. Figures (names are what bench/RESULTS.md shows):
- single thread, calls only: the two binding calls; durability is awaited after the timing.
- single thread, wait every 1024 ops: sustained throughput with group commit (one fsync per ~1024 ops).
- single thread, fsync each op: each op waited for until durable, one op in flight: one fsync per op.
- THREADS threads, hot budget / many budgets: the binding keeps the GIL for the counter update, so Python threads
  take turns; this shows what contention adds on top (the Rust harness shows the engine's own scaling).
- WAITERS threads, each op waited for: wait_durable releases the GIL, so the waits overlap and the writer batches
  them: group commit from Python.
- the floor: one empty Python function call.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import pytest
from conftest import customers

from spendgate import _core

THREADS = 4
WAITERS = 16
OPS_PER_THREAD = 2_000


def make_op(engine: _core.Engine, names: list[str]) -> Callable[[], int]:
    reserve, commit = engine.reserve, engine.commit
    cycle = itertools.cycle(names)

    def op() -> int:
        held = reserve(next(cycle), 1)
        return commit(held.reservation_id, 1).ticket

    return op


def test_floor_python_noop_call(benchmark: pytest.FixtureRequest) -> None:
    def noop() -> None:
        pass

    benchmark.extra_info.update(figure="floor: empty Python call", ops_per_call=1)
    benchmark(noop)


def test_reserve_commit_1_thread_calls_only(benchmark: pytest.FixtureRequest, engine: _core.Engine) -> None:
    op = make_op(engine, customers())
    benchmark.extra_info.update(figure="reserve+commit, 1 thread, calls only", ops_per_call=1)
    last = benchmark(op)
    engine.wait_durable(last)


def test_reserve_commit_1_thread_wait_every_1024(benchmark: pytest.FixtureRequest, engine: _core.Engine) -> None:
    op = make_op(engine, customers())

    def batch() -> None:
        ticket = 0
        for _ in range(1024):
            ticket = op()
        engine.wait_durable(ticket)

    benchmark.extra_info.update(
        figure="reserve+commit, 1 thread, durable every 1024 ops (group commit)", ops_per_call=1024
    )
    benchmark(batch)


def test_reserve_commit_1_thread_fsync_each_op(benchmark: pytest.FixtureRequest, engine: _core.Engine) -> None:
    op = make_op(engine, customers())

    def durable_op() -> None:
        engine.wait_durable(op())

    benchmark.extra_info.update(figure="reserve+commit, 1 thread, durable each op (fsync per op)", ops_per_call=1)
    benchmark(durable_op)


def _threads(
    engine: _core.Engine, names_for: Callable[[int], list[str]], threads: int, ops: int, wait_each: bool
) -> Callable[[], None]:
    def run() -> None:
        def work(t: int) -> None:
            op = make_op(engine, names_for(t))
            ticket = 0
            for _ in range(ops):
                ticket = op()
                if wait_each:
                    engine.wait_durable(ticket)
            engine.wait_durable(ticket)

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()

    return run


def test_reserve_commit_threads_hot_budget(benchmark: pytest.FixtureRequest, engine: _core.Engine) -> None:
    run = _threads(engine, lambda t: customers()[:1], THREADS, OPS_PER_THREAD, wait_each=False)
    benchmark.extra_info.update(
        figure=f"reserve+commit, {THREADS} threads, one hot budget (durable per thread at the end)",
        ops_per_call=THREADS * OPS_PER_THREAD,
    )
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


def test_reserve_commit_threads_many_budgets(benchmark: pytest.FixtureRequest, engine: _core.Engine) -> None:
    per = len(customers()) // THREADS
    run = _threads(engine, lambda t: customers()[t * per : (t + 1) * per], THREADS, OPS_PER_THREAD, wait_each=False)
    benchmark.extra_info.update(
        figure=f"reserve+commit, {THREADS} threads, many budgets (durable per thread at the end)",
        ops_per_call=THREADS * OPS_PER_THREAD,
    )
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


def test_reserve_commit_threads_group_commit(benchmark: pytest.FixtureRequest, engine: _core.Engine) -> None:
    ops = 100
    run = _threads(engine, lambda t: [customers()[t % len(customers())]], WAITERS, ops, wait_each=True)
    benchmark.extra_info.update(
        figure=f"reserve+commit, {WAITERS} threads, durable each op (group commit)", ops_per_call=WAITERS * ops
    )
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)

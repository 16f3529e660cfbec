"""The engine through its Python binding, in one thread, with no gRPC: what the server's engine calls cost, and the
bare-Python floor under everything.

Figures (one op = reserve(amount=1) then commit(amount=1) on that hold, rotating over a pool of budgets):
- engine_fsync_wait_each:    wait_durable(commit ticket) after every op, durability="fsync": one op per fsync'd LMDB
                             transaction at best, as a server with a single client in flight would see it.
- engine_relaxed_wait_each:  the same with durability="relaxed" (LMDB commit without fsync).
- engine_fsync_wait_batched: wait_durable only every `batch` ops: the cost of the binding, the counters and the
                             queue handoff to the writer, with group commit absorbing the fsyncs.
- python_noop_call:          a loop calling an empty Python function: the floor of any Python-side call.

Each figure runs in its own spawned process, on its own temp data dir, so an engine never shares a process with
another engine (one LMDB environment per process) nor with the parent's gRPC.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench import stats

_BUDGETS = 64


def _engine_figure(durability: str, wait_every: int, warmup_s: float, duration_s: float) -> dict[str, Any]:
    from spendgate import _core  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="spendgate-bench-engine-") as data_dir:
        engine = _core.Engine(data_dir, durability=durability)
        try:
            customers = [f"bench-{i:03d}" for i in range(_BUDGETS)]
            for customer in customers:
                engine.wait_durable(engine.set_budget(customer, _core.MAX_AMOUNT_UNITS).ticket)
            reserve, commit, wait_durable = engine.reserve, engine.commit, engine.wait_durable
            samples = array("q")
            now = time.monotonic_ns
            start = now()
            window_start = start + int(warmup_s * 1e9)
            window_end = window_start + int(duration_s * 1e9)
            i = 0
            ticket = 0
            while True:
                t0 = now()
                if t0 >= window_end:
                    break
                held = reserve(customers[i % _BUDGETS], 1)
                assert held.granted, "a bench budget denied a 1-unit hold"
                ticket = commit(held.reservation_id, 1).ticket
                i += 1
                if i % wait_every == 0:
                    wait_durable(ticket)
                if t0 >= window_start:
                    samples.append(now() - t0)
            wait_durable(ticket)
            batches = engine.stats().get("batches_total")
        finally:
            engine.close()
    summary = stats.summarize_ns(samples, duration_s)
    if wait_every > 1:
        # Per-op latency here is mostly the cost of the calls, with one op in `wait_every` paying for the wait:
        # only the throughput and p50 are meaningful.
        summary["note"] = f"wait_durable every {wait_every} ops"
    summary.update(durability=durability, wait_every=wait_every, ops_total=i, batches_total=batches)
    return summary


def _noop_figure(duration_s: float) -> dict[str, Any]:
    def noop() -> None:
        pass

    n = 1_000_000
    best_ns_per_op = float("inf")
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:  # best of several rounds: the floor is the least disturbed round
        t0 = time.perf_counter_ns()
        for _ in range(n):
            noop()
        best_ns_per_op = min(best_ns_per_op, (time.perf_counter_ns() - t0) / n)
    return {"ns_per_op": best_ns_per_op, "ops_per_s": 1e9 / best_ns_per_op, "mean_us": best_ns_per_op / 1e3}


FIGURES: dict[str, tuple[str, str]] = {
    "engine_fsync_wait_each": ("Engine reserve+commit, wait_durable each op (fsync)", "fsync"),
    "engine_relaxed_wait_each": ("Engine reserve+commit, wait_durable each op (relaxed)", "relaxed"),
    "engine_fsync_wait_batched": ("Engine reserve+commit, wait_durable every 1024 ops (fsync)", "fsync"),
}


def run_all(*, warmup_s: float, duration_s: float, log: Any = print) -> list[dict[str, Any]]:
    out = []
    ctx = mp.get_context("spawn")
    for name, (label, durability) in FIGURES.items():
        wait_every = 1024 if name.endswith("batched") else 1
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            res = pool.submit(_engine_figure, durability, wait_every, warmup_s, duration_s).result()
        res.update(name=name, label=label)
        log(f"  {label:<60} {res['ops_per_s']:>10.0f} ops/s  p50 {res['p50_us']:>8.1f} us  "
            f"p99 {res['p99_us']:>8.1f} us")
        out.append(res)
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        res = pool.submit(_noop_figure, min(duration_s, 2.0)).result()
    res.update(name="python_noop_call", label="Python no-op function call (floor)")
    log(f"  {res['label']:<60} {res['ops_per_s']:>10.0f} ops/s  {res['ns_per_op']:.0f} ns/op")
    out.append(res)
    return out

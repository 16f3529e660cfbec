"""Closed-loop gRPC latency and throughput against a real sidecar process.

Closed loop at concurrency C: C coroutines, each sending its next request as soon as the previous reply arrives, so
throughput is what the stack sustains at that many requests in flight and latency includes every queue on the way.
The C coroutines are spread over `procs` load-generator processes (multiprocessing, spawn), each with one grpc.aio
channel, i.e. one HTTP/2 connection per process, like an app with one channel to its sidecar.

Per scenario: every process connects, then all start together at a shared CLOCK_MONOTONIC instant; the first
`warmup_s` is not recorded; every request that *starts* in the next `duration_s` is recorded (latency =
reply time - send time, in the client), and throughput = recorded requests / duration_s.

Workloads (`KINDS`):
- ping:            Ping, the empty RPC: the floor of this stack (HTTP/2 + protobuf + grpc.aio on both sides).
- reserve:         Reserve(amount=1). Each reply waits for the hold to be durable. Holds stay open (they expire).
- reserve_commit:  Reserve(amount=1) then Commit(amount=1) on it; one op = both RPCs, timed together.
Requests rotate over a pool of budgets with huge limits, so nothing is denied for lack of budget and no budget
reaches its cap on open holds; denials and errors are counted and reported, never timed as successes.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import queue
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import machine, stats

KINDS = ("ping", "reserve", "reserve_commit")
KIND_LABELS = {"ping": "Ping", "reserve": "Reserve", "reserve_commit": "Reserve+Commit"}

_CONNECT_TIMEOUT_S = 15.0
_START_MARGIN_NS = 200_000_000  # all processes are told to start this long after the last one is ready
_MAX_ERRORS_PER_COROUTINE = 100  # a dead server must end the scenario, not spin


@dataclass(frozen=True)
class Scenario:
    target: str
    kind: str
    concurrency: int
    procs: int
    warmup_s: float
    duration_s: float
    customers: tuple[str, ...]
    idempotency_keys: bool = False
    rpc_timeout_s: float = 10.0


@dataclass
class WorkerResult:
    latencies: bytes = b""  # array("q") of ns, the recorded window only
    recorded: int = 0
    denied: int = 0  # Reserve replies with granted=false (in or out of the window)
    committed: int = 0  # successful Commits (in or out of the window): the server must show this much spent
    reserved_open: int = 0  # granted Reserves never committed (the "reserve" workload)
    errors: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# The load-generator process


def _worker_main(scenario: Scenario, worker: int, coroutines: int, first_coroutine: int, ready: Any,
                 start_at_ns: Any, results: Any) -> None:
    try:
        result = asyncio.run(_worker(scenario, worker, coroutines, first_coroutine, ready, start_at_ns))
        results.put((worker, asdict(result), None))
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent, which fails the run
        results.put((worker, None, f"{type(exc).__name__}: {exc}"))


async def _worker(scenario: Scenario, worker: int, coroutines: int, first_coroutine: int, ready: Any,
                  start_at_ns: Any) -> WorkerResult:
    import grpc  # noqa: PLC0415 - imported in the child only (spawn), never across a fork
    import grpc.aio  # noqa: PLC0415

    from spendgate.v1 import spendgate_pb2 as pb  # noqa: PLC0415
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc  # noqa: PLC0415

    result = WorkerResult()
    errors: Counter[str] = Counter()
    samples = array("q")
    timeout = scenario.rpc_timeout_s
    customers = scenario.customers

    async with grpc.aio.insecure_channel(scenario.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), _CONNECT_TIMEOUT_S)
        stub = pb_grpc.BudgetStub(channel)
        ping, reserve, commit = stub.Ping, stub.Reserve, stub.Commit
        ping_request = pb.PingRequest()
        # One round trip before the clock starts, so that connection setup is not in anybody's first sample.
        await ping(ping_request, timeout=_CONNECT_TIMEOUT_S)

        ready.put(worker)
        while start_at_ns.value == 0:  # the parent sets it once every worker is ready
            await asyncio.sleep(0.005)
        start = start_at_ns.value
        window_start = start + int(scenario.warmup_s * 1e9)
        window_end = window_start + int(scenario.duration_s * 1e9)
        await asyncio.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9))

        async def one(coroutine: int) -> None:
            # Each coroutine walks the budget pool from its own offset, so concurrent requests hit different budgets.
            names = itertools.cycle(customers[coroutine % len(customers):] + customers[:coroutine % len(customers)])
            keys = itertools.count()
            failures = 0
            while True:
                t0 = time.monotonic_ns()
                if t0 >= window_end:
                    return
                try:
                    if scenario.kind == "ping":
                        await ping(ping_request, timeout=timeout)
                        ok = True
                    else:
                        key = f"bench-{worker}-{coroutine}-{next(keys)}" if scenario.idempotency_keys else ""
                        held = await reserve(pb.ReserveRequest(customer_id=next(names), amount=1,
                                                               idempotency_key=key), timeout=timeout)
                        ok = held.granted
                        if not ok:
                            result.denied += 1
                        elif scenario.kind == "reserve_commit":
                            await commit(pb.CommitRequest(reservation_id=held.reservation_id, amount=1),
                                         timeout=timeout)
                            result.committed += 1
                        else:
                            result.reserved_open += 1
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] += 1
                    failures += 1
                    if failures >= _MAX_ERRORS_PER_COROUTINE:
                        return
                    continue
                if ok and t0 >= window_start:
                    samples.append(time.monotonic_ns() - t0)

        await asyncio.gather(*(one(first_coroutine + i) for i in range(coroutines)))

    result.latencies = samples.tobytes()
    result.recorded = len(samples)
    result.errors = dict(errors)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The parent side


def split(concurrency: int, procs: int) -> list[int]:
    """Coroutines per process: as even as possible, no empty process."""
    procs = max(1, min(procs, concurrency))
    return [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]


def run_scenario(scenario: Scenario, server_pid: int | None = None) -> dict[str, Any]:
    """Run one scenario in fresh load-generator processes; returns its summary (JSON-ready)."""
    ctx = mp.get_context("spawn")  # never fork a process that has touched gRPC
    shares = split(scenario.concurrency, scenario.procs)
    ready, results = ctx.Queue(), ctx.Queue()
    start_at_ns = ctx.Value("q", 0, lock=False)
    workers = []
    first = 0
    for i, share in enumerate(shares):
        proc = ctx.Process(target=_worker_main, args=(scenario, i, share, first, ready, start_at_ns, results),
                           name=f"bench-load-{i}", daemon=True)
        proc.start()
        workers.append(proc)
        first += share
    try:
        _wait_ready(len(shares), ready, results, workers, timeout_s=60)  # spawn + import grpc + connect
        start = time.monotonic_ns() + _START_MARGIN_NS
        start_at_ns.value = start

        # CPU used in the recorded window by the server and by the load generators (from /proc; sampled by the
        # parent at the window's edges, so roughly, +- one scheduler tick).
        pids: dict[str, list[int]] = {"server": [server_pid] if server_pid else [],
                                      "clients": [p.pid for p in workers if p.pid is not None]}
        window_start = start + int(scenario.warmup_s * 1e9)
        _sleep_until(window_start)
        cpu0 = {k: [machine.process_cpu_seconds(p) for p in v] for k, v in pids.items()}
        _sleep_until(window_start + int(scenario.duration_s * 1e9))
        cpu1 = {k: [machine.process_cpu_seconds(p) for p in v] for k, v in pids.items()}

        collected: dict[int, dict[str, Any]] = {}
        for _ in shares:
            worker, res, err = results.get(timeout=scenario.rpc_timeout_s + 60)
            if err is not None:
                raise RuntimeError(f"load generator {worker} failed: {err}")
            collected[worker] = res
    finally:
        for proc in workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()

    samples = array("q")
    errors: Counter[str] = Counter()
    denied = committed = reserved_open = 0
    for res in collected.values():
        samples.frombytes(res["latencies"])
        errors.update(res["errors"])
        denied += res["denied"]
        committed += res["committed"]
        reserved_open += res["reserved_open"]

    def cpu_pct(key: str) -> float | None:
        pairs = [(a, b) for a, b in zip(cpu0[key], cpu1[key]) if a is not None and b is not None]
        if not pairs:
            return None
        return round(100.0 * sum(b - a for a, b in pairs) / scenario.duration_s, 1)

    summary = stats.summarize_ns(samples, scenario.duration_s)
    return {
        "kind": scenario.kind,
        "label": KIND_LABELS[scenario.kind],
        "concurrency": scenario.concurrency,
        "procs": len(shares),
        "warmup_s": scenario.warmup_s,
        "duration_s": scenario.duration_s,
        "idempotency_keys": scenario.idempotency_keys,
        **summary,
        "denied": denied,
        "errors": dict(errors),
        "committed_total": committed,
        "reserved_open_total": reserved_open,
        "server_cpu_pct": cpu_pct("server"),
        "client_cpu_pct": cpu_pct("clients"),
    }


def _wait_ready(n: int, ready: Any, results: Any, workers: list[Any], timeout_s: float) -> None:
    """Wait for n "ready" messages; fail at once (with the worker's error) if a load generator dies first."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while seen < n:
        try:
            ready.get(timeout=0.2)
            seen += 1
            continue
        except queue.Empty:
            pass
        try:
            worker, _, err = results.get_nowait()
            raise RuntimeError(f"load generator {worker} failed before starting: {err}")
        except queue.Empty:
            pass
        dead = [p.name for p in workers if p.exitcode is not None]
        if dead:
            raise RuntimeError(f"load generator(s) {', '.join(dead)} exited before starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {seen} of {n} load generators ready after {timeout_s} s")


def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def run_all(target: str, *, kinds: tuple[str, ...], concurrencies: tuple[int, ...], procs: int, warmup_s: float,
            duration_s: float, customers: tuple[str, ...], idempotency_keys: bool, server_pid: int | None,
            log: Any = print) -> list[dict[str, Any]]:
    """Every (concurrency, kind), in that order: the kinds compared with each other run back to back, so that
    their ratio sees the same machine weather."""
    out = []
    for concurrency in concurrencies:
        for kind in kinds:
            scenario = Scenario(target=target, kind=kind, concurrency=concurrency, procs=procs, warmup_s=warmup_s,
                                duration_s=duration_s, customers=customers, idempotency_keys=idempotency_keys)
            res = run_scenario(scenario, server_pid)
            log(f"  {res['label']:<15} c={concurrency:<3} {res['ops_per_s']:>9.0f} ops/s  "
                f"p50 {res['p50_us']:>8.1f} us  p99 {res['p99_us']:>8.1f} us  n={res['count']}"
                + (f"  denied={res['denied']}" if res["denied"] else "")
                + (f"  errors={res['errors']}" if res["errors"] else ""))
            out.append(res)
    return out


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency: Reserve p50 / Ping p50, and Reserve+Commit (and Reserve) throughput / Ping throughput."""
    by = {(r["kind"], r["concurrency"]): r for r in results}
    out = []
    for concurrency in sorted({r["concurrency"] for r in results}):
        ping = by.get(("ping", concurrency))
        res = by.get(("reserve", concurrency))
        rc = by.get(("reserve_commit", concurrency))
        row: dict[str, Any] = {"concurrency": concurrency}
        if ping and res and ping["count"] and res["count"]:
            row["reserve_p50_over_ping_p50"] = res["p50_us"] / ping["p50_us"]
            row["reserve_p99_over_ping_p99"] = res["p99_us"] / ping["p99_us"]
            row["reserve_tput_over_ping_tput"] = res["ops_per_s"] / ping["ops_per_s"]
        if ping and rc and ping["count"] and rc["count"]:
            row["reserve_commit_p50_over_ping_p50"] = rc["p50_us"] / ping["p50_us"]
            row["reserve_commit_tput_over_ping_tput"] = rc["ops_per_s"] / ping["ops_per_s"]
        out.append(row)
    return out

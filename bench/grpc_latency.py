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
- reserve:         Reserve(amount=1). Each reply waits for the hold to be durable. Holds stay open (15 min TTL).
- reserve_commit:  Reserve(amount=1) then Commit(amount=1) on it; one op = both RPCs, timed together.
Requests rotate over a pool of budgets with huge limits, so nothing is denied for lack of budget and no budget
reaches its cap on open holds; denials and errors are counted and reported, never timed as successes.
In reserve_commit, each half is also timed on its own: the rows "Reserve (in R+C)" and "Commit" come from there.

Open loop (`mode="open"`): requests are *scheduled* at a fixed total rate (spread over the processes), whether or not
earlier ones have come back, and latency is measured from the scheduled send time, not from when the client got
round to sending: a stall in the server or in the client shows up as latency of every request it delayed (no
coordinated omission). Throughput is what completed in the window; at a rate the stack cannot sustain, latency grows
with the window instead of throughput growing with the rate.

Race (`mode="race"`): the overspend check. `concurrency` clients share ONE budget with a small limit; each one loops
Reserve(amount) -> Commit(amount) until it is denied. Every backend that checks atomically grants exactly
limit / amount holds; overspend = units granted - limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
KIND_LABELS = {
    "ping": "Ping",
    "reserve": "Reserve",
    "reserve_commit": "Reserve+Commit",
    "reserve_in_rc": "Reserve (in R+C)",
    "commit": "Commit",
}
MODES = ("closed", "open", "race")
# Holds left open by the Reserve rows outlive the whole run, so that the check after it can count them (a hold's
# lifetime changes nothing in what a Reserve costs).
HOLD_TTL_MS = 900_000

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
    mode: str = "closed"
    rate_per_s: float = 0.0  # open loop: total scheduled ops per second over all processes
    amount: int = 1  # units per Reserve (and Commit)


@dataclass
class WorkerResult:
    latencies: bytes = b""  # array("q") of ns, the recorded window only
    parts: dict[str, bytes] = field(default_factory=dict)  # reserve_commit: "reserve_in_rc" and "commit" halves
    recorded: int = 0
    granted_units: int = 0  # race: units granted
    committed_units: int = 0  # race: units committed
    late_sends: int = 0  # open loop: sends that left more than 1 ms after their scheduled time
    elapsed_ns: int = 0  # race: from the start until this process's last client was denied
    error_details: dict[str, str] = field(default_factory=dict)  # the first message of each error code
    denied: int = 0  # Reserve replies with granted=false (in or out of the window)
    committed: int = 0  # successful Commits (in or out of the window): the server must show this much spent
    reserved_open: int = 0  # granted Reserves never committed (the "reserve" workload)
    errors: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# The load-generator process


def _worker_main(
    scenario: Scenario, worker: int, coroutines: int, first_coroutine: int, ready: Any, start_at_ns: Any, results: Any
) -> None:
    try:
        result = asyncio.run(_worker(scenario, worker, coroutines, first_coroutine, ready, start_at_ns))
        results.put((worker, asdict(result), None))
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent, which fails the run
        results.put((worker, None, f"{type(exc).__name__}: {exc}"))


async def _worker(
    scenario: Scenario, worker: int, coroutines: int, first_coroutine: int, ready: Any, start_at_ns: Any
) -> WorkerResult:
    import grpc  # noqa: PLC0415 - imported in the child only (spawn), never across a fork
    import grpc.aio  # noqa: PLC0415

    from spendgate.v1 import spendgate_pb2 as pb  # noqa: PLC0415
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc  # noqa: PLC0415

    result = WorkerResult()
    errors: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    samples = array("q")
    parts = {"reserve_in_rc": array("q"), "commit": array("q")}
    timeout = scenario.rpc_timeout_s
    customers = scenario.customers
    amount = scenario.amount

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

        async def op(customer: str, key: str, t0: int) -> bool:
            """One op of scenario.kind, timed from t0 (send time, or the scheduled time in open loop). Returns
            whether it was a success worth a sample; raises AioRpcError."""
            if scenario.kind == "ping":
                await ping(ping_request, timeout=timeout)
                return True
            held = await reserve(
                pb.ReserveRequest(customer_id=customer, amount=amount, idempotency_key=key, ttl_ms=HOLD_TTL_MS),
                timeout=timeout,
            )
            if not held.granted:
                result.denied += 1
                return False
            if scenario.kind != "reserve_commit":
                result.reserved_open += 1
                return True
            t1 = time.monotonic_ns()
            await commit(pb.CommitRequest(reservation_id=held.reservation_id, amount=amount), timeout=timeout)
            result.committed += 1
            if t0 >= window_start:
                t2 = time.monotonic_ns()
                parts["reserve_in_rc"].append(t1 - t0)
                parts["commit"].append(t2 - t1)
            return True

        def key_for(coroutine: int, n: int) -> str:
            return f"bench-{worker}-{coroutine}-{n}" if scenario.idempotency_keys else ""

        async def closed(coroutine: int) -> None:
            # Each coroutine walks the budget pool from its own offset, so concurrent requests hit different budgets.
            names = itertools.cycle(customers[coroutine % len(customers) :] + customers[: coroutine % len(customers)])
            keys = itertools.count()
            failures = 0
            while True:
                t0 = time.monotonic_ns()
                if t0 >= window_end:
                    return
                try:
                    ok = await op(next(names), key_for(coroutine, next(keys)), t0)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] += 1
                    first_error.setdefault(err.code().name, str(err.details())[:200])
                    failures += 1
                    if failures >= _MAX_ERRORS_PER_COROUTINE:
                        return
                    continue
                if ok and t0 >= window_start:
                    samples.append(time.monotonic_ns() - t0)

        async def open_loop() -> None:
            # This process's share of the rate, its sends interleaved with the other processes' (offset by worker).
            interval = scenario.procs / scenario.rate_per_s * 1e9
            offset = worker / scenario.rate_per_s * 1e9
            names = itertools.cycle(customers[worker % len(customers) :] + customers[: worker % len(customers)])
            inflight: set[asyncio.Task[None]] = set()

            async def one(scheduled: int, n: int) -> None:
                try:
                    ok = await op(next(names), key_for(worker, n), scheduled)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] += 1
                    first_error.setdefault(err.code().name, str(err.details())[:200])
                    return
                if ok and scheduled >= window_start:
                    samples.append(time.monotonic_ns() - scheduled)

            n = 0
            while True:
                scheduled = start + int(offset + n * interval)
                if scheduled >= window_end:
                    break
                now = time.monotonic_ns()
                if scheduled > now:
                    await asyncio.sleep((scheduled - now) / 1e9)
                elif now - scheduled > 1_000_000 and scheduled >= window_start:
                    result.late_sends += 1  # the client itself fell behind: still timed from `scheduled`
                task = asyncio.get_running_loop().create_task(one(scheduled, n))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                n += 1
            if inflight:
                await asyncio.wait(inflight, timeout=timeout + 5)

        async def race(coroutine: int) -> None:
            customer = customers[0]  # one hot budget
            failures = 0
            while True:
                t0 = time.monotonic_ns()
                try:
                    held = await reserve(pb.ReserveRequest(customer_id=customer, amount=amount), timeout=timeout)
                    if not held.granted:
                        result.denied += 1
                        return  # nothing is ever released here: once denied, always denied
                    result.granted_units += amount
                    await commit(pb.CommitRequest(reservation_id=held.reservation_id, amount=amount), timeout=timeout)
                    result.committed_units += amount
                    result.committed += 1
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] += 1
                    first_error.setdefault(err.code().name, str(err.details())[:200])
                    failures += 1
                    if failures >= _MAX_ERRORS_PER_COROUTINE:
                        return
                    continue
                samples.append(time.monotonic_ns() - t0)

        if scenario.mode == "closed":
            await asyncio.gather(*(closed(first_coroutine + i) for i in range(coroutines)))
        elif scenario.mode == "open":
            await open_loop()
        elif scenario.mode == "race":
            await asyncio.gather(*(race(first_coroutine + i) for i in range(coroutines)))
            result.elapsed_ns = time.monotonic_ns() - start
        else:
            raise ValueError(f"unknown mode {scenario.mode!r}")

    result.latencies = samples.tobytes()
    result.parts = {name: a.tobytes() for name, a in parts.items() if len(a)}
    result.recorded = len(samples)
    result.errors = dict(errors)
    result.error_details = first_error
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The parent side


def split(concurrency: int, procs: int) -> list[int]:
    """Coroutines per process: as even as possible, no empty process."""
    procs = max(1, min(procs, concurrency))
    return [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]


def run_scenario(
    scenario: Scenario, server_pid: int | None = None, backing_pids: list[int] | None = None
) -> dict[str, Any]:
    """Run one scenario in fresh load-generator processes; returns its summary (JSON-ready). `backing_pids`: the
    processes a baseline server relies on (Postgres, Redis), whose CPU is reported apart from the rest of the
    machine's."""
    ctx = mp.get_context("spawn")  # never fork a process that has touched gRPC
    if scenario.mode == "open":  # one scheduler per process; the rate is split evenly
        shares = [1] * max(1, scenario.procs)
    else:
        shares = split(scenario.concurrency, scenario.procs)
    if scenario.procs != len(shares):
        scenario = dataclasses.replace(scenario, procs=len(shares))
    ready, results = ctx.Queue(), ctx.Queue()
    start_at_ns = ctx.Value("q", 0, lock=False)
    workers = []
    first = 0
    for i, share in enumerate(shares):
        proc = ctx.Process(
            target=_worker_main,
            args=(scenario, i, share, first, ready, start_at_ns, results),
            name=f"bench-load-{i}",
            daemon=True,
        )
        proc.start()
        workers.append(proc)
        first += share
    try:
        _wait_ready(len(shares), ready, results, workers, timeout_s=60)  # spawn + import grpc + connect
        start = time.monotonic_ns() + _START_MARGIN_NS
        start_at_ns.value = start

        # CPU used in the recorded window by the server and by the load generators (from /proc; sampled by the
        # parent at the window's edges, so roughly, +- one scheduler tick).
        pids: dict[str, list[int]] = {
            "server": [server_pid] if server_pid else [],
            "clients": [p.pid for p in workers if p.pid is not None],
            "backing": list(backing_pids or []),
        }
        window_start = start + int(scenario.warmup_s * 1e9)
        _sleep_until(window_start)
        cpu0 = {k: [machine.process_cpu_seconds(p) for p in v] for k, v in pids.items()}
        whole0 = machine.machine_cpu_seconds()
        if scenario.mode != "race":  # a race has no fixed window: it ends when every client is denied
            _sleep_until(window_start + int(scenario.duration_s * 1e9))
        cpu1 = {k: [machine.process_cpu_seconds(p) for p in v] for k, v in pids.items()}
        whole1 = machine.machine_cpu_seconds()

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
    parts: dict[str, array[int]] = {}
    errors: Counter[str] = Counter()
    error_details: dict[str, str] = {}
    denied = committed = reserved_open = granted_units = committed_units = late_sends = 0
    elapsed_ns = 0
    for res in collected.values():
        samples.frombytes(res["latencies"])
        for name, raw in res["parts"].items():
            parts.setdefault(name, array("q")).frombytes(raw)
        errors.update(res["errors"])
        for code, detail in res["error_details"].items():
            error_details.setdefault(code, detail)
        denied += res["denied"]
        committed += res["committed"]
        reserved_open += res["reserved_open"]
        granted_units += res["granted_units"]
        committed_units += res["committed_units"]
        late_sends += res["late_sends"]
        elapsed_ns = max(elapsed_ns, res["elapsed_ns"])
    window_s = elapsed_ns / 1e9 if scenario.mode == "race" else scenario.duration_s

    def cpu_pct(key: str) -> float | None:
        pairs = [(a, b) for a, b in zip(cpu0[key], cpu1[key], strict=True) if a is not None and b is not None]
        if not pairs or scenario.mode == "race":
            return None
        return round(100.0 * sum(b - a for a, b in pairs) / scenario.duration_s, 1)

    # The rest of the machine in the window: everything busy that was not the server, the load generator or the
    # baseline's database. On a quiet machine it is near 0; well above that, another job shared the CPUs.
    other_cpu_pct = steal_pct = None
    if whole0 and whole1 and scenario.mode != "race":
        ours = sum(x for x in (cpu_pct("server"), cpu_pct("clients"), cpu_pct("backing")) if x is not None)
        other_cpu_pct = round(100.0 * (whole1["busy"] - whole0["busy"]) / scenario.duration_s - ours, 1)
        steal_pct = round(100.0 * (whole1["steal"] - whole0["steal"]) / scenario.duration_s, 1)

    summary = stats.summarize_ns(samples, window_s)
    return {
        "mode": scenario.mode,
        "kind": scenario.kind,
        "label": KIND_LABELS[scenario.kind],
        "rate_per_s": scenario.rate_per_s if scenario.mode == "open" else None,
        "amount": scenario.amount,
        "concurrency": scenario.concurrency,
        "procs": len(shares),
        "warmup_s": scenario.warmup_s,
        "duration_s": scenario.duration_s,
        "idempotency_keys": scenario.idempotency_keys,
        **summary,
        "denied": denied,
        "errors": dict(errors),
        "error_details": error_details,
        "committed_total": committed,
        "reserved_open_total": reserved_open,
        "server_cpu_pct": cpu_pct("server"),
        "client_cpu_pct": cpu_pct("clients"),
        "backing_cpu_pct": cpu_pct("backing") if backing_pids else None,
        "other_cpu_pct": other_cpu_pct,
        "steal_pct": steal_pct,
        "parts": {name: stats.summarize_ns(a, window_s) for name, a in parts.items()},
        "granted_units": granted_units,
        "committed_units": committed_units,
        "late_sends": late_sends,
        "elapsed_s": round(window_s, 3),
        "samples_us": stats.sample_for_cdf(samples),
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


def run_all(
    target: str,
    *,
    kinds: tuple[str, ...],
    concurrencies: tuple[int, ...],
    procs: int,
    warmup_s: float,
    duration_s: float,
    customers: tuple[str, ...],
    idempotency_keys: bool,
    server_pid: int | None,
    log: Any = print,
    backing_pids: Any = None,
) -> list[dict[str, Any]]:
    """Every (concurrency, kind), in that order: the kinds compared with each other run back to back, so that
    their ratio sees the same machine weather."""
    out = []
    for concurrency in concurrencies:
        for kind in kinds:
            scenario = Scenario(
                target=target,
                kind=kind,
                concurrency=concurrency,
                procs=procs,
                warmup_s=warmup_s,
                duration_s=duration_s,
                customers=customers,
                idempotency_keys=idempotency_keys,
            )
            res = run_scenario(scenario, server_pid, backing_pids() if backing_pids else None)
            _log_row(log, res, f"{res['label']} c={concurrency}")
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


def _log_row(log: Any, res: dict[str, Any], what: str) -> None:
    log(
        f"  {what:<28} {res['ops_per_s']:>9.0f} ops/s  p50 {res['p50_us']:>8.1f} us  p99 {res['p99_us']:>8.1f} us"
        f"  n={res['count']}"
        + (f"  denied={res['denied']}" if res["denied"] else "")
        + (f"  errors={res['errors']}" if res["errors"] else "")
        + (f"  late sends={res['late_sends']}" if res.get("late_sends") else "")
        + (f"  [other CPU on the machine: {res['other_cpu_pct']:.0f}%]" if (res.get("other_cpu_pct") or 0) > 40 else "")
    )


def run_open(
    target: str,
    *,
    kinds: tuple[str, ...],
    rates: tuple[float, ...],
    procs: int,
    warmup_s: float,
    duration_s: float,
    customers: tuple[str, ...],
    server_pid: int | None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Open loop: every (rate, kind), latency from the scheduled send time."""
    out = []
    for rate in rates:
        for kind in kinds:
            scenario = Scenario(
                target=target,
                kind=kind,
                concurrency=procs,
                procs=procs,
                warmup_s=warmup_s,
                duration_s=duration_s,
                customers=customers,
                mode="open",
                rate_per_s=rate,
            )
            res = run_scenario(scenario, server_pid)
            _log_row(log, res, f"{res['label']} @ {rate:g}/s")
            out.append(res)
    return out


def run_race(
    target: str, *, concurrency: int, procs: int, limit: int, amount: int, rounds: int, tag: str, log: Any = print
) -> dict[str, Any]:
    """The overspend check: `rounds` races, each on a fresh budget of `limit` units, `concurrency` clients looping
    Reserve(amount) -> Commit(amount) until denied. Overspend = units granted - limit (summed over rounds), and the
    same from the server's own books (spent - limit)."""
    from bench import server as bench_server  # noqa: PLC0415

    per_round = []
    for i in range(rounds):
        customer = f"race-{tag}-{i}-{time.time_ns()}"
        bench_server.create_budgets(target, [customer], limit=limit)
        scenario = Scenario(
            target=target,
            kind="reserve_commit",
            concurrency=concurrency,
            procs=procs,
            warmup_s=0.0,
            duration_s=0.0,
            customers=(customer,),
            mode="race",
            amount=amount,
        )
        res = run_scenario(scenario)
        spent, reserved = bench_server.total_spent_and_reserved(target, [customer])
        res.update(
            customer=customer,
            limit=limit,
            server_spent=spent,
            server_reserved=reserved,
            overspend_units=res["granted_units"] - limit,
            server_overspend_units=spent + reserved - limit,
        )
        per_round.append(res)
    granted = sum(r["granted_units"] for r in per_round)
    total_limit = limit * rounds
    samples = [x for r in per_round for x in r["samples_us"]]
    elapsed = sum(r["elapsed_s"] for r in per_round)
    ops = sum(r["committed_total"] for r in per_round)
    summary = {
        "concurrency": concurrency,
        "limit": limit,
        "amount": amount,
        "rounds": rounds,
        "granted_units": granted,
        "limit_total": total_limit,
        "overspend_units": granted - total_limit,
        "server_overspend_units": sum(r["server_overspend_units"] for r in per_round),
        "overspend_per_round": [r["overspend_units"] for r in per_round],
        "ops_per_s": ops / elapsed if elapsed else float("nan"),
        "p50_us": stats.percentile(sorted(samples), 50),
        "p99_us": stats.percentile(sorted(samples), 99),
        "errors": dict(sum((Counter(r["errors"]) for r in per_round), Counter())),
        "rounds_detail": [
            {
                k: r[k]
                for k in (
                    "customer",
                    "granted_units",
                    "server_spent",
                    "server_reserved",
                    "overspend_units",
                    "server_overspend_units",
                    "elapsed_s",
                    "committed_total",
                )
            }
            for r in per_round
        ],
    }
    log(
        f"  race x{rounds}: {concurrency} clients, limit {limit}, amount {amount}: granted {granted} of "
        f"{total_limit} units -> overspend {summary['overspend_units']} (server books: "
        f"{summary['server_overspend_units']}), {summary['ops_per_s']:.0f} ops/s on one hot budget"
    )
    return summary

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
        rows.append(
            {
                "transport": transport,
                "concurrency": concurrency,
                "events": events,
                "seconds": round(seconds, 3),
                "events_per_s": round(events / seconds, 1),
            }
        )
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
        for budget, customer in zip(budgets, CUSTOMERS, strict=True):
            engine.set_budget(budget, 1 << 50, customer)
        ticket = 0
        for i in range(events):
            hold = engine.reserve(budgets[i % len(budgets)], 10)
            ticket = engine.commit(hold.reservation_id, 1 + i % 7).ticket
            if i % FILL_WAIT_EVERY == 0:  # stay far below write_queue_capacity
                engine.wait_durable(ticket)
        engine.wait_durable(ticket)
        waiter = DurabilityWaiter(engine)
        # One event per commit (settle_auto_aggregate off): these rows measure the cost of an event; the backlog rows
        # below measure the defaults.
        settings = Settings(
            stripe_api_key="sk_test_bench",
            stripe_api_base=url,
            settle_transport=transport,
            settle_concurrency=concurrency,
            settle_interval_ms=50,
            settle_auto_aggregate=False,
        )
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
    lines = [
        "## 4. Settlement to Stripe (the fake, in its own process)",
        "",
        "Committed usages drained from the outbox to `spendgate.testing.fake_stripe` until empty: v1 sends one "
        "meter event a request, v2 the meter event stream with 100 a request, one event per commit "
        "(settle_auto_aggregate off). Exactly-once machinery included "
        "(claim before send, ack after acceptance).",
        "",
        "| transport | settler concurrency | events | seconds | events/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['transport']} | {r['concurrency']} | {r['events']:,} | {r['seconds']} | {r['events_per_s']:,.0f} |"
        )
    return lines + [""]


# -- keeping up: the sidecar committing at its top rate while it settles -----------------------------------------------

# Reserve+Commit in flight at once (the concurrency at which bench section 1 finds the sidecar's top commit rate).
KEEP_UP_CONCURRENCY: Final[int] = 64
KEEP_UP_LOAD_S: Final[float] = 20.0
KEEP_UP_QUICK_LOAD_S: Final[float] = 12.0
# After the load: how long the outbox may take to drain before the row says it did not.
KEEP_UP_DRAIN_S: Final[float] = 90.0
KEEP_UP_SAMPLE_S: Final[float] = 1.0
# Customers the load spreads over (each a Stripe customer the fake knows): aggregates are per customer and second.
KEEP_UP_CUSTOMERS: Final[tuple[str, ...]] = tuple(f"cus_keepup_{i:02d}" for i in range(50))
# (label, extra `spendgate serve` flags): the defaults, and the defaults without automatic pre-aggregation (the
# behaviour before it: one v1 event per commit).
KEEP_UP_MODES: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("defaults (v1, settle_auto_aggregate on)", ()),
    ("v1, --no-settle-auto-aggregate (one event per commit)", ("--no-settle-auto-aggregate",)),
)


def run_keeping_up(quick: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Per mode: a sidecar (`spendgate serve`, settling to the fake Stripe in its own process) under closed-loop
    Reserve+Commit at KEEP_UP_CONCURRENCY for the load time, then until the outbox is empty (or KEEP_UP_DRAIN_S).
    Sampled every second: the outbox depth. From the ledger afterwards (StoreReader): each commit's settlement lag
    (settled_ms - ts_ms), by the second it was committed in."""
    rows = []
    for label, flags in KEEP_UP_MODES:
        row = _keep_up_once(label, flags, KEEP_UP_QUICK_LOAD_S if quick else KEEP_UP_LOAD_S)
        rows.append(row)
        log(
            f"keeping up, {label}: {row['commits_per_s']:,.0f} commits/s for {row['load_s']} s; outbox peak "
            f"{row['peak_depth']:,}, at the end of the load {row['depth_at_load_end']:,}; drained "
            f"{row['drain_s']} s after; lag p99 {row['lag_p99_s']} s"
        )
    return rows


def _keep_up_once(label: str, flags: tuple[str, ...], load_s: float) -> dict[str, Any]:
    import threading  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import grpc  # noqa: PLC0415

    from bench import grpc_latency  # noqa: PLC0415
    from spendgate.store_reader import StoreReader  # noqa: PLC0415
    from spendgate.testing.sidecar import Sidecar  # noqa: PLC0415
    from spendgate.v1 import spendgate_pb2 as pb  # noqa: PLC0415
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc  # noqa: PLC0415

    fake, url = _start_fake(KEEP_UP_CUSTOMERS)
    try:
        with tempfile.TemporaryDirectory(prefix="spendgate-bench-keepup-") as tmp:
            env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("SPENDGATE_", "STRIPE_"))}
            env.update(STRIPE_API_KEY="sk_test_bench", STRIPE_API_BASE=url)
            data_dir = Path(tmp) / "data"
            budgets = [f"keepup-{i}" for i in range(len(KEEP_UP_CUSTOMERS))]
            samples: list[tuple[float, int]] = []
            with Sidecar(data_dir, extra_args=["--max-holds-per-budget", "1000000", *flags], env=env) as sidecar:
                with grpc.insecure_channel(sidecar.target) as channel:
                    admin = pb_grpc.AdminStub(channel)
                    for budget, customer in zip(budgets, KEEP_UP_CUSTOMERS, strict=True):
                        admin.SetBudget(
                            pb.SetBudgetRequest(customer_id=budget, limit=1 << 50, stripe_customer_id=customer),
                            timeout=30,
                        )
                    started = time.time()
                    stop = threading.Event()

                    def sample() -> None:
                        while not stop.is_set():
                            status = admin.GetSettlementStatus(pb.GetSettlementStatusRequest(), timeout=30)
                            samples.append((round(time.time() - started, 1), status.outbox_depth))
                            stop.wait(KEEP_UP_SAMPLE_S)

                    sampler = threading.Thread(target=sample, daemon=True)
                    sampler.start()
                    scenario = grpc_latency.Scenario(
                        target=sidecar.target,
                        kind="reserve_commit",
                        concurrency=KEEP_UP_CONCURRENCY,
                        procs=1,
                        warmup_s=0.0,
                        duration_s=load_s,
                        customers=tuple(budgets),
                    )
                    load = grpc_latency.run_scenario(scenario, server_pid=sidecar.pid)
                    load_end = time.time() - started
                    depth_at_load_end = samples[-1][1] if samples else 0
                    deadline = time.monotonic() + KEEP_UP_DRAIN_S
                    while time.monotonic() < deadline and (
                        not samples or samples[-1][1] > 0 or samples[-1][0] < load_end
                    ):
                        time.sleep(KEEP_UP_SAMPLE_S / 4)
                    drained = bool(samples) and samples[-1][1] == 0 and samples[-1][0] >= load_end
                    drain_s = round(samples[-1][0] - load_end, 1) if drained else None
                    stop.set()
                    sampler.join(timeout=30)
                    switches = [
                        line
                        for line in sidecar.log_tail(100_000).splitlines()
                        if "(settle_auto_aggregate)" in line or "one event per commit again" in line
                    ]
            with StoreReader(data_dir) as store:
                lags = [
                    (e["ts_ms"], e["settled_ms"] - e["ts_ms"])
                    for e in store.ledger()
                    if e.get("settled_ms") is not None
                ]
                unsettled = sum(1 for e in store.ledger() if e.get("settled_ms") is None)
    finally:
        fake.terminate()
        fake.wait(timeout=FAKE_START_TIMEOUT_S)
    by_second: dict[int, list[int]] = {}
    for ts_ms, lag_ms in lags:
        by_second.setdefault(int(ts_ms / 1000 - started), []).append(lag_ms)
    series = []
    for t, depth in samples:
        lag = by_second.get(int(t))
        series.append({"t_s": t, "depth": depth, "lag_p99_s": round(_p(lag, 0.99) / 1000, 2) if lag else None})
    all_lags = [lag for _, lag in lags]
    return {
        "mode": label,
        "flags": " ".join(flags),
        "load_s": load_s,
        "commits": load["committed_total"],
        "commits_per_s": round(load["committed_total"] / load_s, 1),
        "server_cpu_pct": load["server_cpu_pct"],
        "other_cpu_pct": load["other_cpu_pct"],
        "peak_depth": max((d for _, d in samples), default=0),
        "depth_at_load_end": depth_at_load_end,
        "drain_s": drain_s,
        "unsettled": unsettled,
        "lag_p50_s": round(_p(all_lags, 0.50) / 1000, 2) if all_lags else None,
        "lag_p99_s": round(_p(all_lags, 0.99) / 1000, 2) if all_lags else None,
        "series": series,
        "auto_switches": len(switches),
        "switch_log": switches[:6],
    }


# The backlog for the drain rows: committed with settlement off at the top rate for this long (so its timestamps spread
# over real seconds and customers, as a backlog after an outage does), then drained once per mode from a copy.
BACKLOG_FILL_S: Final[float] = 15.0
BACKLOG_QUICK_FILL_S: Final[float] = 6.0
BACKLOG_DRAIN_S: Final[float] = 180.0


def run_backlog_drain(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Fill an outbox through a sidecar with settlement off (Reserve+Commit at KEEP_UP_CONCURRENCY over
    KEEP_UP_CUSTOMERS), then per mode start `spendgate serve` with a key on a copy and time the drain to empty."""
    import shutil  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from bench import grpc_latency  # noqa: PLC0415
    from spendgate.testing.sidecar import Sidecar  # noqa: PLC0415

    fill_s = BACKLOG_QUICK_FILL_S if quick else BACKLOG_FILL_S
    base_env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("SPENDGATE_", "STRIPE_"))}
    with tempfile.TemporaryDirectory(prefix="spendgate-bench-backlog-") as tmp:
        filled = Path(tmp) / "filled"
        budgets = [f"keepup-{i}" for i in range(len(KEEP_UP_CUSTOMERS))]
        with Sidecar(filled, extra_args=["--max-holds-per-budget", "1000000"], env=base_env) as sidecar:
            _set_budgets(sidecar.target, budgets)
            scenario = grpc_latency.Scenario(
                target=sidecar.target,
                kind="reserve_commit",
                concurrency=KEEP_UP_CONCURRENCY,
                procs=1,
                warmup_s=0.0,
                duration_s=fill_s,
                customers=tuple(budgets),
            )
            load = grpc_latency.run_scenario(scenario, server_pid=sidecar.pid)
        commits = load["committed_total"]
        result: dict[str, Any] = {
            "fill_s": fill_s,
            "commits": commits,
            "commits_per_s": round(commits / fill_s, 1),
            "customers": len(KEEP_UP_CUSTOMERS),
            "drains": [],
        }
        log(f"backlog: {commits:,} commits in {fill_s} s ({commits / fill_s:,.0f}/s) with settlement off")
        for label, flags in KEEP_UP_MODES:
            copy = Path(tmp) / f"copy-{len(result['drains'])}"
            shutil.copytree(filled, copy)
            (copy / "spendgate.lock").unlink(missing_ok=True)
            fake, url = _start_fake(KEEP_UP_CUSTOMERS)
            try:
                env = dict(base_env, STRIPE_API_KEY="sk_test_bench", STRIPE_API_BASE=url)
                with Sidecar(copy, extra_args=list(flags), env=env) as sidecar:
                    # From the first event Stripe accepted (the process start and the first preflight are not the
                    # drain) until the outbox is empty.
                    started, depth_at_start = _wait_first_delivery(sidecar.target)
                    depth = _wait_depth_zero(sidecar.target, started + BACKLOG_DRAIN_S)
                    seconds = time.monotonic() - started
                    cpu_s = _process_cpu_s(sidecar.pid)
            finally:
                fake.terminate()
                fake.wait(timeout=FAKE_START_TIMEOUT_S)
            drained = depth == 0
            row = {
                "mode": label,
                "drained": drained,
                "seconds": round(seconds, 1),
                "left": depth,
                "entries_per_s": round((depth_at_start - depth) / seconds, 1),
                "sidecar_cpu_s": cpu_s,
            }
            result["drains"].append(row)
            log(
                f"backlog drain, {label}: {'drained' if drained else f'{depth:,} left'} after {seconds:.1f} s "
                f"(from the first delivery) = {row['entries_per_s']:,.0f} entries/s; sidecar CPU {cpu_s} s"
            )
    return result


def _set_budgets(target: str, budgets: list[str]) -> None:
    import grpc  # noqa: PLC0415

    from spendgate.v1 import spendgate_pb2 as pb  # noqa: PLC0415
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc  # noqa: PLC0415

    with grpc.insecure_channel(target) as channel:
        admin = pb_grpc.AdminStub(channel)
        for budget, customer in zip(budgets, KEEP_UP_CUSTOMERS, strict=True):
            admin.SetBudget(
                pb.SetBudgetRequest(customer_id=budget, limit=1 << 50, stripe_customer_id=customer), timeout=30
            )


def _wait_first_delivery(target: str) -> tuple[float, int]:
    """(monotonic time, outbox depth) when GetSettlementStatus first shows a delivered event."""
    import grpc  # noqa: PLC0415

    from spendgate.v1 import spendgate_pb2 as pb  # noqa: PLC0415
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc  # noqa: PLC0415

    deadline = time.monotonic() + BACKLOG_DRAIN_S
    with grpc.insecure_channel(target) as channel:
        admin = pb_grpc.AdminStub(channel)
        while True:
            status = admin.GetSettlementStatus(pb.GetSettlementStatusRequest(), timeout=30)
            if status.delivered_entries > 0 or time.monotonic() > deadline:
                return time.monotonic(), status.outbox_depth
            time.sleep(0.02)


def _wait_depth_zero(target: str, deadline: float) -> int:
    import grpc  # noqa: PLC0415

    from spendgate.v1 import spendgate_pb2 as pb  # noqa: PLC0415
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc  # noqa: PLC0415

    with grpc.insecure_channel(target) as channel:
        admin = pb_grpc.AdminStub(channel)
        while True:
            depth = admin.GetSettlementStatus(pb.GetSettlementStatusRequest(), timeout=30).outbox_depth
            if depth == 0 or time.monotonic() > deadline:
                return depth
            time.sleep(0.1)


def _process_cpu_s(pid: int) -> float | None:
    from bench import machine  # noqa: PLC0415

    cpu = machine.process_cpu_seconds(pid)
    return round(cpu, 1) if cpu is not None else None


def render_backlog(result: dict[str, Any] | None) -> list[str]:
    if not result:
        return []
    lines = [
        "### Draining a backlog committed at the top rate",
        "",
        f"{result['commits']:,} commits in {result['fill_s']} s ({result['commits_per_s']:,.0f}/s, the top "
        f"Reserve+Commit rate of this run, settlement off) over {result['customers']} customers, then drained "
        "from a copy of that data dir by `spendgate serve` with a key, once per mode (time from the "
        "first accepted event until GetSettlementStatus shows an empty outbox; a fresh fake Stripe each time). The "
        "outbox stays bounded at the top commit rate only where the drain is faster than that rate.",
        "",
        "| mode | drained | seconds | entries/s | vs the commit rate | sidecar CPU s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["drains"]:
        drained = "yes" if r["drained"] else f"no, {r['left']:,} left"
        lines.append(
            f"| {r['mode']} | {drained} | {r['seconds']} | "
            f"{r['entries_per_s']:,.0f} | {r['entries_per_s'] / result['commits_per_s']:.2f}x | "
            f"{r['sidecar_cpu_s']} |"
        )
    return lines + [""]


def _start_fake(customers: tuple[str, ...]) -> tuple[subprocess.Popen[str], str]:
    args = [sys.executable, "-m", "spendgate.testing.fake_stripe", "--same-host"]
    for customer in customers:
        args += ["--customer", customer]
    fake = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert fake.stdout is not None
    match = re.search(r"(http://\S+)", fake.stdout.readline())
    assert match, "the fake Stripe did not print its address"
    return fake, match.group(1)


def _p(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def render_keeping_up(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "### Keeping up: settling while the sidecar commits at its top rate",
        "",
        f"`spendgate serve` settling to the fake Stripe (its own process) under closed-loop Reserve+Commit at "
        f"concurrency {KEEP_UP_CONCURRENCY} (one load-generator process) over {len(KEEP_UP_CUSTOMERS)} customers, "
        "then until the outbox is empty. Outbox "
        "depth sampled every second (GetSettlementStatus); lag = settled_ms - ts_ms of every ledger entry, by the "
        "second it was committed in.",
        "",
        "| mode | commits/s | outbox peak | at load end | drained after | lag p50 | lag p99 | sidecar CPU "
        "| other CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        drained = f"{r['drain_s']} s" if r["drain_s"] is not None else f"not in {KEEP_UP_DRAIN_S:.0f} s"
        lines.append(
            f"| {r['mode']} | {r['commits_per_s']:,.0f} | {r['peak_depth']:,} | {r['depth_at_load_end']:,} | "
            f"{drained} | {r['lag_p50_s']} s | {r['lag_p99_s']} s | {r['server_cpu_pct']}% | "
            f"{r['other_cpu_pct']}% |"
        )
    lines += ["", "Over time (t from the start of the load; lag p99 of the commits made in that second):", ""]
    lines.append("| t (s) | " + " | ".join(f"depth, lag p99: {r['mode']}" for r in rows) + " |")
    lines.append("| ---: |" + " ---: |" * len(rows))
    longest = max(len(r["series"]) for r in rows)
    for i in range(0, longest, 2):
        cells = []
        t = None
        for r in rows:
            if i < len(r["series"]):
                point = r["series"][i]
                t = point["t_s"] if t is None else t
                lag = f"{point['lag_p99_s']} s" if point["lag_p99_s"] is not None else "-"
                cells.append(f"{point['depth']:,}, {lag}")
            else:
                cells.append("")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.settle_throughput [--quick] [--keeping-up]`: the drain rows, or the keeping-up rows, as
    markdown on stdout (bench/run.py runs both as section 4)."""
    import argparse  # noqa: PLC0415
    import json  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m bench.settle_throughput")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keeping-up", action="store_true", help="the keeping-up rows and the backlog drain")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.keeping_up:
        backlog = run_backlog_drain(args.quick, log)
        rows = run_keeping_up(args.quick, log)
        out: Any = {"backlog": backlog, "keeping_up": rows}
        text = render_backlog(backlog) + render_keeping_up(rows)
    else:
        out = run(args.quick, log)
        text = render(out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(out, file, indent=1)
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

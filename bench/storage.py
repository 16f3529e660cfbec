#!/usr/bin/env python3
"""What the data costs, and what a bloating client costs others: `python -m bench.storage` (about 3 minutes).

1. Bytes per Reserve+Commit pair, in process (the engine on a fresh LMDB, relaxed durability: bytes do not depend on
   fsync), counted as pages that hold data (map_used_bytes: LMDB's non-free pages, the gauge the sidecar exports):
   after the commits (unsettled: hold kept for retries, ledger entry, outbox entry, usage record), after settlement
   (outbox acknowledged: the entry rewritten with settled_ms), and after retention (resolved holds pruned and the
   settled entries of closed periods archived: what stays in LMDB per pair is then nothing).
2. Another customer's latency while one customer sends fresh dimension values, through the real sidecar over gRPC
   (fsync, as shipped): customer B's Reserve+Commit pairs at concurrency 1 while customer A commits in a loop with the
   same labels (the baseline), then after A sent 1,000 commits with 16 fresh 128-byte values each, while A goes on
   with fresh values. Before usage records were bounded, A's record grew to 3.3 MB and B's p50 went 13 -> 50 ms.

Prints a markdown section for bench/RESULTS.md (also written to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import machine

PAIRS = 20_000
ACK_CHUNK = 1_000
# The period the bytes test's budget runs in: short, so that its entries' period is closed for the archive pass.
PERIOD_MS = 2_000
# The engine prunes and archives every 60 s (EngineConfig::prune_interval_ms); wait for one pass, and a bit.
PRUNE_WAIT_S = 75.0
FRESH_COMMITS = 1_000
LATENCY_PAIRS = 1_500


def _dims(n: int, fresh: bool) -> dict[str, str]:
    tag = f"{n:012d}" if fresh else "same"
    return {f"key{k:02d}": f"{tag}-{k:02d}-" + "v" * (128 - len(tag) - 4) for k in range(16)}


def bytes_per_pair(pairs: int) -> dict[str, float]:
    from spendgate import _core

    with tempfile.TemporaryDirectory(prefix="spendgate-bench-bytes-") as tmp:
        engine = _core.Engine(tmp, durability="relaxed", resolved_retention_ms=1, ledger_retention_days=0)
        try:
            now_ms = time.time_ns() // 1_000_000
            period = {"kind": "fixed", "anchor_ms": now_ms, "length_ms": PERIOD_MS}
            engine.wait_durable(
                engine.update_budget("bytes", limit=2**53, stripe_customer_id="cus_b", period=period).ticket
            )
            engine.wait_durable(engine.set_budget("other", 2**53, "cus_o").ticket)
            base = engine.stats()["map_used_bytes"]
            ticket = 0
            for n in range(pairs):
                hold = engine.reserve("bytes", 5)
                ticket = engine.commit(hold.reservation_id, 3, dimensions={"feature": f"f{n % 10}"}).ticket
            engine.wait_durable(ticket)
            committed = engine.stats()["map_used_bytes"]
            while batch := engine.outbox_pending(ACK_CHUNK):
                seqs = [entry["seq"] for entry in batch]
                engine.outbox_claim(seqs, f"bench-{seqs[0]}")
                engine.wait_durable(engine.outbox_ack(seqs))
            settled = engine.stats()["map_used_bytes"]
            time.sleep(PERIOD_MS / 1000)
            engine.roll_due()
            deadline = time.monotonic() + PRUNE_WAIT_S
            retained = settled
            while time.monotonic() < deadline:
                time.sleep(1.0)
                # any durable op refreshes the gauge
                engine.wait_durable(engine.set_budget("other", 2**53, "cus_o").ticket)
                retained = engine.stats()["map_used_bytes"]
                if retained < base + (settled - base) // 10:
                    break
            archive_bytes = sum(p.stat().st_size for p in (Path(tmp) / "archive").glob("*.gz"))
        finally:
            engine.close()
    return {
        "before_settlement": (committed - base) / pairs,
        "after_settlement": (settled - base) / pairs,
        "after_retention": max(0, retained - base) / pairs,
        "archive": archive_bytes / pairs,
    }


async def _pairs(budget, customer: str, count: int, dims, samples: list[int] | None) -> None:  # type: ignore[no-untyped-def]
    from spendgate.v1 import spendgate_pb2 as pb

    for n in range(count):
        start = time.perf_counter_ns()
        hold = await budget.Reserve(pb.ReserveRequest(customer_id=customer, amount=5))
        await budget.Commit(pb.CommitRequest(reservation_id=hold.reservation_id, amount=3, dimensions=dims(n)))
        if samples is not None:
            samples.append(time.perf_counter_ns() - start)


async def _measure_b(target: str, a_dims, a_stop: threading.Event) -> list[int]:  # type: ignore[no-untyped-def]
    import grpc.aio

    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    samples: list[int] = []
    async with grpc.aio.insecure_channel(target) as a_channel, grpc.aio.insecure_channel(target) as b_channel:
        a, b = pb_grpc.BudgetStub(a_channel), pb_grpc.BudgetStub(b_channel)

        async def a_loop() -> None:
            n = 10_000_000
            while not a_stop.is_set():
                await _pairs(a, "bloat", 1, lambda _, n=n: a_dims(n), None)
                n += 1

        load = asyncio.create_task(a_loop())
        await _pairs(b, "other", LATENCY_PAIRS, lambda _: {"feature": "chat"}, samples)
        a_stop.set()
        await load
    return samples


def other_customer_latency() -> dict[str, float]:
    import grpc.aio

    from bench.server import create_budgets, sidecar
    from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

    with (
        tempfile.TemporaryDirectory(prefix="spendgate-bench-dims-") as tmp,
        sidecar(Path(tmp) / "data", ["--max-holds-per-budget", "1000000"]) as server,
    ):
        create_budgets(server.target, ["bloat", "other"])
        same = asyncio.run(_measure_b(server.target, lambda n: _dims(n, fresh=False), threading.Event()))

        async def bloat() -> None:
            async with grpc.aio.insecure_channel(server.target) as channel:
                await _pairs(pb_grpc.BudgetStub(channel), "bloat", FRESH_COMMITS, lambda n: _dims(n, fresh=True), None)

        asyncio.run(bloat())
        fresh = asyncio.run(_measure_b(server.target, lambda n: _dims(n, fresh=True), threading.Event()))
    p50_same, p50_fresh = statistics.median(same) / 1000, statistics.median(fresh) / 1000
    return {
        "p50_same_us": p50_same,
        "p50_fresh_us": p50_fresh,
        "ratio": p50_fresh / p50_same,
        "p99_same_us": sorted(same)[int(len(same) * 0.99)] / 1000,
        "p99_fresh_us": sorted(fresh)[int(len(fresh) * 0.99)] / 1000,
    }


def report(sizes: dict[str, float], latency: dict[str, float]) -> str:
    m = machine.describe()
    lines = [
        "## Storage: bytes per pair, and a customer bloating its labels (`python -m bench.storage`)",
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('nproc')} CPUs; commit {m.get('git_commit')}; "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Bytes of LMDB pages holding data per Reserve+Commit pair ({PAIRS:,} pairs, one label, in process):",
        "",
        "| stage | bytes per pair |",
        "| --- | --- |",
        "| committed, not yet settled (hold kept for retries, ledger entry, outbox entry) | "
        f"{sizes['before_settlement']:.0f} |",
        f"| settled (outbox acknowledged, entry marked settled) | {sizes['after_settlement']:.0f} |",
        "| after retention (resolved holds pruned, entries of the closed period archived) | "
        f"{sizes['after_retention']:.0f} |",
        f"| the archive file (gzip, outside LMDB) | {sizes['archive']:.0f} |",
        "",
        "With the defaults a pair keeps at most its settled bytes until retention ends (its hold goes after",
        (
            "`resolved_retention_ms`, 7 days; its entry after `ledger_retention_days`, 180): at 20 pairs/s, at most "
            f"{sizes['after_settlement'] * 20 * 86_400 / 2**30:.1f} GiB"
        ),
        "of map a day of retention. The map grows by itself up to `map_max_mb` (the disk past `disk_reserve_mb`); a",
        "shorter `ledger_retention_days` keeps less in LMDB (the archive keeps every entry).",
        "",
        f"Customer B's Reserve+Commit at concurrency 1 over gRPC ({LATENCY_PAIRS:,} pairs, fsync), while customer A",
        "commits in a loop with 16 labels of 128 bytes:",
        "",
        "| A's labels | B p50 (µs) | B p99 (µs) |",
        "| --- | --- | --- |",
        f"| the same values every call | {latency['p50_same_us']:,.0f} | {latency['p99_same_us']:,.0f} |",
        (
            f"| fresh values, after {FRESH_COMMITS:,} commits of fresh values | {latency['p50_fresh_us']:,.0f} | "
            f"{latency['p99_fresh_us']:,.0f} |"
        ),
        "",
        f"Ratio of B's p50, fresh / same: **{latency['ratio']:.2f}** (the target: at most 1.2).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    sizes = bytes_per_pair(args.pairs)
    latency = other_customer_latency()
    text = report(sizes, latency)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

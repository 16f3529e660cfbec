#!/usr/bin/env python3
"""Run the spendgate benchmarks: `python bench/run.py` (about 2 minutes), or `python bench/run.py --quick` (< 1 min).

Prints a Markdown report and writes it, with every number behind it, to bench/out/<UTC time>.{json,md} and
bench/out/latest.{json,md}. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _setup_path() -> None:
    """Make `bench` and the checkout's `spendgate` importable here and in the spawned processes (spawn passes
    sys.path on). Prefer python/ when the native module was built into it (maturin develop), or when spendgate is not
    installed at all."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    src = REPO / "python"
    if any((src / "spendgate").glob("_core*.so")) or importlib.util.find_spec("spendgate") is None:
        sys.path.insert(0, str(src))


_setup_path()

from bench import engine_inproc, grpc_latency, machine, report, server  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_procs = max(1, min(4, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count() or 1) // 2))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: short windows (0.25 s warm-up + 1 s per gRPC row, 0.5 s per engine figure)")
    ap.add_argument("--warmup-s", type=float, default=None, help="unrecorded warm-up per gRPC row (default 1)")
    ap.add_argument("--duration-s", type=float, default=None, help="recorded window per gRPC row (default 5)")
    ap.add_argument("--engine-duration-s", type=float, default=None,
                    help="recorded window per in-process engine figure (default 3)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="closed-loop concurrencies")
    ap.add_argument("--kinds", nargs="+", default=list(grpc_latency.KINDS), choices=grpc_latency.KINDS)
    ap.add_argument("--procs", type=int, default=default_procs,
                    help=f"load-generator processes (default: half the CPUs, 1..4; here {default_procs})")
    ap.add_argument("--budgets", type=int, default=256, help="budgets the load rotates over")
    ap.add_argument("--idempotency-keys", action="store_true",
                    help="send a unique idempotency_key with every Reserve (as spendgate.client does)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `spendgate serve` (repeat for each), e.g. --server-arg=--some-flag")
    ap.add_argument("--skip-grpc", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args(argv)
    quick = args.quick
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (0.25 if quick else 1.0)
    args.duration_s = args.duration_s if args.duration_s is not None else (1.0 if quick else 5.0)
    args.engine_duration_s = (args.engine_duration_s if args.engine_duration_s is not None
                              else (0.5 if quick else 3.0))
    return args


def run_grpc(args: argparse.Namespace, result: dict[str, Any]) -> None:
    customers = tuple(server.customer_ids(args.budgets))
    with tempfile.TemporaryDirectory(prefix="spendgate-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        t0 = time.monotonic()
        with server.sidecar(data_dir, args.server_arg) as running:
            result["server"] = {"how": running.how, "start_s": round(time.monotonic() - t0, 2)}
            log(f"sidecar pid {running.pid} at {running.target} ({running.how}); creating {len(customers)} budgets")
            try:
                server.create_budgets(running.target, customers)
                rows = grpc_latency.run_all(
                    running.target, kinds=tuple(args.kinds), concurrencies=tuple(args.concurrency),
                    procs=args.procs, warmup_s=args.warmup_s, duration_s=args.duration_s, customers=customers,
                    idempotency_keys=args.idempotency_keys, server_pid=running.pid, log=log)
                spent, reserved = server.total_spent_and_reserved(running.target, customers)
            except BaseException:
                log(f"--- sidecar log ({running.log_path}), last lines:")
                log("\n".join(Path(running.log_path).read_text(errors="replace").splitlines()[-40:]))
                raise
    result["grpc"] = rows
    result["ratios"] = grpc_latency.ratios(rows)
    committed = sum(r["committed_total"] for r in rows)
    held = sum(r["reserved_open_total"] for r in rows)
    errors = sum(sum(r["errors"].values()) for r in rows)
    # With errors (e.g. a deadline) a Commit may have happened without the client knowing: then only <= holds.
    result["checks"] = {
        "spent == acknowledged commits": {
            "ok": spent == committed if not errors else spent >= committed,
            "detail": f"server says {spent} units spent on the bench budgets; the load got {committed} Commit "
                      f"replies of 1 unit" + (f" ({errors} RPC errors: only >= is checked)" if errors else "")},
        "reserved <= open holds granted": {
            "ok": reserved <= held,
            "detail": f"server says {reserved} units reserved; the load left {held} holds of 1 unit open "
                      f"(fewer remain when some expired during the run)"},
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    result: dict[str, Any] = {
        "schema": 1,
        "machine": machine.describe(),
        "params": {
            "quick": args.quick, "warmup_s": args.warmup_s, "duration_s": args.duration_s,
            "engine_duration_s": args.engine_duration_s, "concurrency": args.concurrency, "kinds": args.kinds,
            "procs": args.procs, "budgets": args.budgets, "idempotency_keys": args.idempotency_keys,
            "server_extra_args": " ".join(args.server_arg),
        },
    }
    import spendgate  # noqa: PLC0415

    result["spendgate_path"] = str(Path(spendgate.__file__).parent)
    if not args.skip_engine:
        log("in-process engine:")
        # Before the sidecar starts, so it has the machine to itself.
        result["engine"] = engine_inproc.run_all(warmup_s=min(0.5, args.engine_duration_s),
                                                 duration_s=args.engine_duration_s, log=log)
    if not args.skip_grpc:
        log("gRPC, closed loop:")
        run_grpc(args, result)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["machine"]["loadavg_at_end"] = machine.load_average()

    markdown = report.render(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ("-quick" if args.quick else "")
    json_path = args.out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    (args.out_dir / f"{stamp}.md").write_text(markdown + "\n")
    shutil.copyfile(json_path, args.out_dir / "latest.json")
    shutil.copyfile(args.out_dir / f"{stamp}.md", args.out_dir / "latest.md")
    print(markdown)
    log(f"wrote {json_path} and .md (also latest.json/.md) in {result['elapsed_s']} s")
    failed = [name for name, c in result.get("checks", {}).items() if not c["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

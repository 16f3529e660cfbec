#!/usr/bin/env python3
"""Run spendgate's benchmark suite: `python bench/run.py` (about 6 minutes), or `--quick` (about a minute).

What the budget check costs, and that it is safe, on this machine, in one command:
  1. the engine in process: Rust (criterion) and the Python binding (pytest-benchmark);
  2. the sidecar over gRPC: closed loop at concurrency 1/16/64 and open loop at fixed rates (our load generator, a
     separate process), the empty RPC beside it, and h2load as an independent client;
  3. the same gRPC front over the do-it-yourself baselines (Postgres guarded UPDATE, Redis Lua, naive
     check-then-write), each with the overspend count under 64 concurrent clients;
  4. bench/RESULTS.md and two PNGs (bench/latency_cdf.png, bench/throughput_vs_concurrency.png).

Postgres, Redis and h2load come from Debian packages: when one is missing, run.py runs bench/setup.sh (as root), or
says what to run. Every server it starts (sidecars, baseline servers, Postgres, Redis) is stopped on exit.
The bench reports; it never fails on speed. Exit status 1 means a correctness check failed (see "Checks").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
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
    # `python bench/run.py` puts bench/ itself first on sys.path: drop it, so that no bench module can shadow a
    # standard one (here or in the subprocesses, which inherit sys.path as PYTHONPATH).
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != Path(here)]
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    src = REPO / "python"
    if any((src / "spendgate").glob("_core*.so")) or importlib.util.find_spec("spendgate") is None:
        sys.path.insert(0, str(src))


_setup_path()

from bench import machine  # noqa: E402

PY_MODULES = {
    "asyncpg": "asyncpg",
    "redis": "redis",
    "matplotlib": "matplotlib",
    "pytest_benchmark": "pytest-benchmark",
}
# The sidecar's settings for the bench: the defaults (fsync durability), except the per-budget cap on open holds:
# h2load sends the same Reserve body every time, so all its holds land on one budget.
SIDECAR_ARGS = ["--max-holds-per-budget", "1000000"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_procs = max(
        1, min(4, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // 2)
    )
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (about a minute once built): short windows, fewer rows; writes bench/out/ only",
    )
    ap.add_argument("--warmup-s", type=float, default=None, help="unrecorded warm-up per gRPC row (default 1)")
    ap.add_argument("--duration-s", type=float, default=None, help="recorded window per gRPC row (default 5)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="closed-loop concurrencies (1 16 64)")
    ap.add_argument(
        "--rates", type=float, nargs="+", default=None, help="open-loop rates, ops/s (default 500 1000 2000)"
    )
    ap.add_argument(
        "--procs",
        type=int,
        default=default_procs,
        help=f"load-generator processes (default: half the CPUs, 1..4; here {default_procs})",
    )
    ap.add_argument("--budgets", type=int, default=256, help="budgets the load rotates over")
    ap.add_argument("--race-limit", type=int, default=10_000, help="the race budget's limit, units (default 10000)")
    ap.add_argument("--race-amount", type=int, default=10, help="units per Reserve in the race (default 10)")
    ap.add_argument("--race-rounds", type=int, default=None, help="races per backend (default 3)")
    ap.add_argument("--pool-size", type=int, default=32, help="database connections per baseline server")
    ap.add_argument(
        "--idempotency-keys",
        action="store_true",
        help="send a unique idempotency_key with every Reserve to spendgate (as spendgate.client does)",
    )
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `spendgate serve` (repeat for each), e.g. --server-arg=--some-flag",
    )
    for part in ("rust", "binding", "grpc", "h2load", "relaxed", "baselines", "settlement", "profile"):
        ap.add_argument(f"--skip-{part}", action="store_true", help=f"skip the {part} section")
    ap.add_argument("--no-setup", action="store_true", help="never run bench/setup.sh; skip what is missing")
    ap.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="FILE",
        help="measure nothing: render RESULTS.md and the plots from a result file of an earlier run (bench/out/*.json)",
    )
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out")
    ap.add_argument(
        "--results",
        type=Path,
        default=None,
        help="where to write RESULTS.md and the PNGs' folder (default: bench/RESULTS.md and bench/ for a "
        "full run; bench/out/ for --quick)",
    )
    args = ap.parse_args(argv)
    quick = args.quick
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (0.25 if quick else 1.0)
    args.duration_s = args.duration_s if args.duration_s is not None else (0.75 if quick else 5.0)
    args.concurrency = args.concurrency or ([1, 64] if quick else [1, 16, 64])
    args.rates = args.rates or ([1000.0] if quick else [500.0, 1000.0, 2000.0])
    args.race_rounds = args.race_rounds or (1 if quick else 3)
    if args.results is None:
        args.results = (args.out_dir / "RESULTS.md") if quick else (REPO / "bench" / "RESULTS.md")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Prerequisites


def missing_prereqs() -> list[str]:
    from bench import services  # noqa: PLC0415

    missing = []
    if services.postgres_bindir() is None:
        missing.append("postgresql")
    if services.redis_server_binary() is None:
        missing.append("redis-server")
    if shutil.which("h2load") is None:
        missing.append("nghttp2-client (h2load)")
    missing += [pkg for mod, pkg in PY_MODULES.items() if importlib.util.find_spec(mod) is None]
    if shutil.which("py-spy") is None:
        missing.append("py-spy")
    return missing


def ensure_prereqs(args: argparse.Namespace) -> list[str]:
    """Run bench/setup.sh when something is missing (as root, unless --no-setup); returns what is still missing."""
    missing = missing_prereqs()
    if not missing:
        return []
    setup = REPO / "bench" / "setup.sh"
    if args.no_setup or os.geteuid() != 0:
        log(
            f"missing: {', '.join(missing)}. Install them with:\n  sudo bash {setup.relative_to(REPO)}\n"
            "(continuing without the sections that need them)"
        )
        return missing
    log(f"missing: {', '.join(missing)}; running bench/setup.sh")
    done = subprocess.run(["bash", str(setup)], cwd=REPO, check=False)
    if done.returncode != 0:
        log(f"bench/setup.sh failed ({done.returncode}); continuing without the sections that need it")
    importlib.invalidate_caches()
    return missing_prereqs()


# ---------------------------------------------------------------------------------------------------------------------
# Sections


def run_engine_sections(args: argparse.Namespace, result: dict[str, Any], missing: list[str]) -> None:
    from bench import engine_suites  # noqa: PLC0415

    if not args.skip_rust:
        log("1a. the engine in Rust (criterion):")
        result["rust"] = engine_suites.run_criterion(args.quick, log=log)
        if "error" in result["rust"]:
            log("  " + result["rust"]["error"])
    if not args.skip_binding:
        log("1b. the engine through the Python binding (pytest-benchmark):")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        result["binding"] = engine_suites.run_pytest_benchmark(
            args.out_dir / "pytest-benchmark.json", args.quick, log=log
        )
        if "error" in result["binding"]:
            log("  " + result["binding"]["error"])


def run_spendgate(args: argparse.Namespace, result: dict[str, Any], missing: list[str]) -> None:
    from bench import grpc_latency, h2load, profiling, server  # noqa: PLC0415

    customers = tuple(server.customer_ids(args.budgets))
    with tempfile.TemporaryDirectory(prefix="spendgate-bench-") as tmp:
        t0 = time.monotonic()
        with server.sidecar(Path(tmp) / "data", SIDECAR_ARGS + args.server_arg) as running:
            result["server"] = {
                "how": running.how,
                "start_s": round(time.monotonic() - t0, 2),
                "args": " ".join(SIDECAR_ARGS + args.server_arg),
            }
            log(f"2. spendgate sidecar pid {running.pid} at {running.target}; {len(customers)} budgets")
            try:
                server.create_budgets(running.target, customers)
                log(" closed loop (our load generator):")
                rows = grpc_latency.run_all(
                    running.target,
                    kinds=grpc_latency.KINDS,
                    concurrencies=tuple(args.concurrency),
                    procs=args.procs,
                    warmup_s=args.warmup_s,
                    duration_s=args.duration_s,
                    customers=customers,
                    idempotency_keys=args.idempotency_keys,
                    server_pid=running.pid,
                    log=log,
                )
                result["grpc"] = rows
                result["ratios"] = grpc_latency.ratios(rows)
                log(" open loop (latency from the scheduled send time):")
                result["open_loop"] = grpc_latency.run_open(
                    running.target,
                    kinds=("ping", "reserve_commit"),
                    rates=tuple(args.rates),
                    procs=args.procs,
                    warmup_s=min(args.warmup_s, 0.5),
                    duration_s=min(args.duration_s, 3.0),
                    customers=customers,
                    server_pid=running.pid,
                    log=log,
                )
                if not args.skip_h2load and shutil.which("h2load"):
                    log(" h2load (an independent HTTP/2 client):")
                    result["h2load"] = h2load.run_all(
                        running.target,
                        kinds=("ping", "reserve"),
                        concurrencies=tuple(args.concurrency),
                        warmup_s=args.warmup_s,
                        duration_s=min(args.duration_s, 4.0),
                        server_pid=running.pid,
                        log=log,
                    )
                log(" race (overspend check):")
                result["race"] = grpc_latency.run_race(
                    running.target,
                    concurrency=64,
                    procs=args.procs,
                    limit=args.race_limit,
                    amount=args.race_amount,
                    rounds=args.race_rounds,
                    tag="spendgate",
                    log=log,
                )
                if not args.skip_profile:
                    log(" profile (Reserve+Commit, concurrency 64, py-spy + perf on the server):")
                    profile_s = 3.0 if args.quick else 6.0

                    def drive() -> dict[str, Any]:
                        scenario = grpc_latency.Scenario(
                            target=running.target,
                            kind="reserve_commit",
                            concurrency=64,
                            procs=args.procs,
                            warmup_s=1.0,
                            duration_s=profile_s + 3.0,
                            customers=customers,
                        )
                        return grpc_latency.run_scenario(scenario, running.pid)

                    result["profile"] = profiling.profile_server(running.pid, profile_s, drive, log=log)
                spent, reserved = server.total_spent_and_reserved(running.target, customers)
            except BaseException:
                log(f"--- sidecar log ({running.log_path}), last lines:")
                log("\n".join(Path(running.log_path).read_text(errors="replace").splitlines()[-40:]))
                raise
    loads = result["grpc"] + result["open_loop"] + ([result["profile"]["load"]] if "profile" in result else [])
    committed = sum(r["committed_total"] for r in loads)
    held = sum(r.get("reserved_open_total", 0) for r in loads)
    errors = sum(sum(r["errors"].values()) for r in loads)
    checks = result.setdefault("checks", {})
    # With RPC errors (a deadline) a Commit may have happened without the client knowing: then only >= holds.
    checks["spendgate: spent == acknowledged commits"] = {
        "ok": spent == committed if not errors else spent >= committed,
        "detail": f"server says {spent} units spent on the bench budgets; the load got {committed} Commit replies of "
        f"1 unit" + (f" ({errors} RPC errors: only >= is checked)" if errors else ""),
    }
    # A call that failed on the client (a refused stream, a deadline) may still have left a hold, or a Commit
    # refused after its Reserve leaves its hold open: each such error accounts for at most one unit more.
    checks["spendgate: reserved <= open holds granted"] = {
        "ok": reserved <= held + errors,
        "detail": f"server says {reserved} units reserved; the load left {held} holds of 1 unit open (fewer remain "
        f"when some expired)" + (f", and {errors} RPC errors may each have left one more" if errors else ""),
    }
    race = result["race"]
    checks["spendgate: zero overspend under 64 concurrent clients"] = {
        "ok": race["overspend_units"] == 0 and race["server_overspend_units"] == 0 and not race["errors"],
        "detail": f"granted {race['granted_units']} units against limits totalling {race['limit_total']}; "
        f"the server's books agree ({race['server_overspend_units']:+d})",
    }
    for r in result.get("h2load", []):
        if r["kind"] == "reserve":
            checks[f"h2load Reserve c={r['concurrency']}: every success is a hold"] = {
                "ok": bool(r["check_ok"]),
                "detail": f"{r['holds_made']} holds made >= {r.get('requests_succeeded')} responses h2load counted",
            }


def run_relaxed(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """h2load, Ping and Reserve, against a sidecar with --durability relaxed: the check without the disk."""
    from bench import h2load, server  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="spendgate-bench-relaxed-") as tmp:
        with server.sidecar(Path(tmp) / "data", SIDECAR_ARGS + ["--durability", "relaxed"] + args.server_arg) as s:
            log(f"2b. spendgate sidecar with --durability relaxed (no fsync), pid {s.pid}; h2load:")
            rows = h2load.run_all(
                s.target,
                kinds=("ping", "reserve"),
                concurrencies=(1, 64),
                warmup_s=min(args.warmup_s, 0.5),
                duration_s=min(args.duration_s, 3.0),
                server_pid=s.pid,
                log=log,
            )
    for r in rows:
        r["relaxed"] = True
    result["h2load_relaxed"] = rows


def run_baselines(args: argparse.Namespace, result: dict[str, Any], missing: list[str]) -> None:
    from bench import grpc_latency, server, services  # noqa: PLC0415

    customers = tuple(server.customer_ids(args.budgets))
    baselines: dict[str, Any] = {}
    result["baselines"] = baselines
    checks = result.setdefault("checks", {})
    log("3. baselines behind the same gRPC front: starting Postgres and Redis")
    with (
        services.postgres() as pg,
        services.redis() as rd,
        tempfile.TemporaryDirectory(prefix="spendgate-bench-baselines-") as tmp,
    ):
        result["baseline_servers"] = {
            "postgres": pg.version,
            "redis": rd.version,
            "pool_size": args.pool_size,
            "postgres_settings": "fsync=on, synchronous_commit=on (defaults)",
            "redis_settings": "appendonly yes, appendfsync always",
        }
        for backend in ("postgres", "redis", "naive"):
            dsn = services.create_database(pg, f"bench_{backend}") if backend != "redis" else None
            if backend == "redis":

                def backing(pid: int = rd.pid) -> list[int]:
                    return [pid]
            else:

                def backing(data_dir: str = pg.data_dir) -> list[int]:
                    return machine.process_tree(services.postmaster_pid(data_dir))

            with server.baseline(
                backend, Path(tmp) / f"{backend}.log", dsn=dsn, redis_url=rd.url, pool_size=args.pool_size
            ) as running:
                log(f" {backend}: pid {running.pid} at {running.target}")
                try:
                    server.create_budgets(running.target, customers)
                    rows = grpc_latency.run_all(
                        running.target,
                        kinds=("reserve", "reserve_commit"),
                        concurrencies=tuple(args.concurrency),
                        procs=args.procs,
                        warmup_s=args.warmup_s,
                        duration_s=args.duration_s,
                        customers=customers,
                        idempotency_keys=False,
                        server_pid=running.pid,
                        log=log,
                        backing_pids=backing,
                    )
                    race = grpc_latency.run_race(
                        running.target,
                        concurrency=64,
                        procs=args.procs,
                        limit=args.race_limit,
                        amount=args.race_amount,
                        rounds=args.race_rounds,
                        tag=backend,
                        log=log,
                    )
                    spent, _ = server.total_spent_and_reserved(running.target, customers)
                except BaseException:
                    log(f"--- {backend} server log, last lines:")
                    log("\n".join(Path(running.log_path).read_text(errors="replace").splitlines()[-40:]))
                    raise
            baselines[backend] = {"grpc": rows, "race": race}
            committed = sum(r["committed_total"] for r in rows)
            errors = sum(sum(r["errors"].values()) for r in rows)
            checks[f"{backend}: spent == acknowledged commits"] = {
                "ok": spent == committed if not errors else spent >= committed,
                "detail": f"{spent} units spent; {committed} Commit replies of 1 unit",
            }
            if backend != "naive":
                checks[f"{backend}: zero overspend under 64 concurrent clients"] = {
                    "ok": race["overspend_units"] == 0 and race["server_overspend_units"] == 0,
                    "detail": f"granted {race['granted_units']} units against limits totalling {race['limit_total']}",
                }


# ---------------------------------------------------------------------------------------------------------------------


def write_outputs(args: argparse.Namespace, result: dict[str, Any]) -> list[Path]:
    """RESULTS.md (at args.results) and the PNGs beside it; returns the PNGs."""
    from bench import report  # noqa: PLC0415

    plots: list[Path] = []
    # The plots show the gRPC rows; a run that skipped them has nothing to plot.
    if importlib.util.find_spec("matplotlib") is not None and result.get("grpc"):
        from bench import plots as plotting  # noqa: PLC0415

        plots = plotting.render_all(result, args.results.parent)
    markdown = report.render(result, plots=[p.name for p in plots])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(markdown + "\n")
    return plots


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        plots = write_outputs(args, result)
        log(f"rendered {args.results} and {', '.join(str(p) for p in plots)} from {args.from_json}")
        return 0
    started = time.monotonic()
    missing = ensure_prereqs(args)
    import spendgate  # noqa: PLC0415

    result: dict[str, Any] = {
        "schema": 2,
        "machine": machine.describe(),
        "params": {
            "quick": args.quick,
            "warmup_s": args.warmup_s,
            "duration_s": args.duration_s,
            "concurrency": args.concurrency,
            "rates": args.rates,
            "procs": args.procs,
            "budgets": args.budgets,
            "race": {"clients": 64, "limit": args.race_limit, "amount": args.race_amount, "rounds": args.race_rounds},
            "idempotency_keys": args.idempotency_keys,
            "server_extra_args": " ".join(args.server_arg),
            "missing": missing,
        },
        "spendgate_path": str(Path(spendgate.__file__).parent),
    }
    result["machine"]["fsync_probe"] = machine.fsync_probe(tempfile.gettempdir())
    log(
        f"machine: {result['machine']['nproc']} CPUs, load {result['machine']['loadavg_at_start']}, "
        f"fsync p50 {result['machine']['fsync_probe']['p50_us']:.0f} us"
    )

    # The in-process figures first, with the machine to themselves.
    run_engine_sections(args, result, missing)
    if not args.skip_grpc:
        run_spendgate(args, result, missing)
        if not args.skip_relaxed and shutil.which("h2load"):
            run_relaxed(args, result)
    if not args.skip_settlement:
        from bench import settle_throughput  # noqa: PLC0415

        log("4. settlement throughput to the fake Stripe")
        result["settlement"] = settle_throughput.run(args.quick, log=log)
        log("4. settlement: draining a backlog committed at the top rate, and keeping up while committing")
        result["settlement_backlog"] = settle_throughput.run_backlog_drain(args.quick, log=log)
        result["settlement_keeping_up"] = settle_throughput.run_keeping_up(args.quick, log=log)
    if not args.skip_baselines:
        if any(m in missing for m in ("postgresql", "redis-server", "asyncpg", "redis")):
            log("3. baselines skipped: Postgres/Redis or their clients are missing (bash bench/setup.sh)")
        else:
            run_baselines(args, result, missing)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["machine"]["loadavg_at_end"] = machine.load_average()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ("-quick" if args.quick else "")
    json_path = args.out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    shutil.copyfile(json_path, args.out_dir / "latest.json")

    plots = write_outputs(args, result)
    markdown = args.results.read_text().rstrip("\n")
    (args.out_dir / f"{stamp}.md").write_text(markdown + "\n")
    shutil.copyfile(args.out_dir / f"{stamp}.md", args.out_dir / "latest.md")
    print(markdown)
    log(
        f"wrote {args.results}, {', '.join(str(p) for p in plots) or 'no plots (matplotlib missing)'}, and "
        f"{json_path} in {result['elapsed_s']} s"
    )
    failed = [name for name, c in result.get("checks", {}).items() if not c["ok"]]
    if failed:
        log("CHECKS FAILED: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

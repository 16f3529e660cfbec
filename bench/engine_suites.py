"""The engine in process: the Rust harness (criterion, bench/rust/engine.rs) and the Python binding (pytest-benchmark,
bench/python/). Both run as subprocesses; this module runs them and reads their own result files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CRITERION_QUICK_ARGS = ["--warm-up-time", "0.1", "--measurement-time", "0.3", "--sample-size", "10"]


def _target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


def run_criterion(quick: bool, log: Any = print) -> dict[str, Any]:
    cargo = shutil.which("cargo")
    if cargo is None:
        return {"error": "cargo not found: the Rust harness needs a Rust toolchain"}
    argv = [cargo, "bench", "--quiet", "--bench", "engine", "--", "--noplot"] + (CRITERION_QUICK_ARGS if quick else [])
    log(f"  $ {' '.join(['cargo'] + argv[1:])}   (the first run compiles criterion: a minute or two)")
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        return {"error": f"cargo bench failed ({done.returncode}): {done.stderr[-3000:]}"}
    ids = []
    for line in done.stdout.splitlines():
        m = re.match(r"^Benchmarking (\S+): Analyzing", line.strip())
        if m and m.group(1) not in ids:
            ids.append(m.group(1))
    if not ids:  # criterion prints the id alone on a line before "time:" when it is long
        ids = re.findall(r"^(\S+/\S+)\s*(?:time:|$)", done.stdout, flags=re.M)
    rows = []
    for bench_id in ids:
        folder = _target_dir() / "criterion" / bench_id / "new"
        try:
            estimates = json.loads((folder / "estimates.json").read_text())
            meta = json.loads((folder / "benchmark.json").read_text())
        except (OSError, ValueError):
            continue
        per_iter_ns = estimates["mean"]["point_estimate"]
        lo = estimates["mean"]["confidence_interval"]["lower_bound"]
        hi = estimates["mean"]["confidence_interval"]["upper_bound"]
        elements = (meta.get("throughput") or {}).get("Elements", 1)
        rows.append(
            {
                "id": bench_id,
                "elements_per_iter": elements,
                "ns_per_iter": per_iter_ns,
                "ns_per_iter_ci": [lo, hi],
                "ns_per_op": per_iter_ns / elements,
                "ops_per_s": elements * 1e9 / per_iter_ns,
                "ops_per_s_ci": [elements * 1e9 / hi, elements * 1e9 / lo],
            }
        )
        log(f"  {bench_id:<55} {rows[-1]['ops_per_s']:>14,.0f} ops/s  {rows[-1]['ns_per_op']:>10,.1f} ns/op")
    return {"rows": rows, "argv": " ".join(argv[1:]), "quick": quick}


def run_pytest_benchmark(out_json: Path, quick: bool, log: Any = print) -> dict[str, Any]:
    try:
        import pytest_benchmark  # noqa: F401, PLC0415
    except ImportError:
        return {"error": "pytest-benchmark is not installed: run `bash bench/setup.sh`"}
    timing = (
        ["--benchmark-max-time=0.05", "--benchmark-min-rounds=3", "--benchmark-warmup=off"]
        if quick
        else ["--benchmark-max-time=1.0", "--benchmark-min-rounds=5", "--benchmark-warmup=on"]
    )
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "bench/python",
        "--benchmark-only",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={out_json}",
        "--benchmark-columns=min,median,mean,ops,rounds",
        *timing,
    ]
    log(f"  $ python -m pytest bench/python --benchmark-only {' '.join(timing)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, check=False, env=env)
    if done.returncode != 0:
        return {"error": f"pytest-benchmark failed ({done.returncode}): {done.stdout[-3000:]}{done.stderr[-2000:]}"}
    data = json.loads(out_json.read_text())
    rows = []
    for b in data["benchmarks"]:
        per_call = b["extra_info"].get("ops_per_call", 1)
        s = b["stats"]
        rows.append(
            {
                "name": b["name"],
                "figure": b["extra_info"].get("figure", b["name"]),
                "ops_per_call": per_call,
                "mean_s": s["mean"],
                "median_s": s["median"],
                "min_s": s["min"],
                "rounds": s["rounds"],
                "ops_per_s": per_call / s["mean"],
                "us_per_op_median": s["median"] / per_call * 1e6,
            }
        )
        log(f"  {rows[-1]['figure']:<80} {rows[-1]['ops_per_s']:>12,.0f} ops/s")
    return {"rows": rows, "machine_info": data.get("machine_info", {}).get("cpu", {}).get("brand_raw")}

"""Where the server's time goes: py-spy (Python stacks) and perf (native: which library, which thread) on the running
sidecar, while the load generator drives Reserve+Commit at concurrency 64 (a separate run from the timed ones, since
sampling costs the server a little).

py-spy runs with --nonblocking (it never pauses the server) and cannot see inside Cython or C: time spent in grpc's
Cython layer (grpc.aio's request and response handling, protobuf) shows up as the asyncio callback that runs it,
`Handle._run`, with no Python frame under it. perf fills that gap by shared object: libpython (the interpreter),
cygrpc (grpc's Cython + C-core), _core (spendgate's engine), the kernel (syscalls, scheduling, the disk).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

# py-spy frame -> category, by the first rule that matches (checked on the whole stack for "servicer").
_SERVICER = ("spendgate/server/",)


def _classify(frames: list[str]) -> str:
    if not frames[0].startswith("_run_module_as_main"):
        return "other threads (grpc's poller thread, inside C-core)"
    if any(any(s in f for s in _SERVICER) for f in frames):
        return "spendgate servicers (convert, engine call, durability wait)"
    leaf = frames[-1]
    if leaf.startswith("Handle._run (asyncio/events.py"):
        return "grpc.aio Cython/C-core callbacks run by the loop (no Python frame under them)"
    if "selectors.py" in leaf or "EpollSelector" in leaf:
        return "event loop idle in epoll"
    if "asyncio/" in leaf or "<frozen abc>" in leaf:
        return "asyncio machinery (tasks, futures, scheduling)"
    return "other Python"


def summarize_pyspy(raw: str, top: int = 12) -> dict[str, Any]:
    total = 0
    categories: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        categories[_classify(frames)] += n
        leaves[frames[-1]] += n
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "categories": [{"what": k, "pct": round(100 * v / total, 1)} for k, v in categories.most_common()],
        "top_self": [{"frame": k, "pct": round(100 * v / total, 1)} for k, v in leaves.most_common(top)],
    }


def _perf_table(perf: str, data: Path, sort: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [
            perf,
            "report",
            "-i",
            str(data),
            "--no-children",
            "--sort",
            sort,
            "--stdio",
            "-g",
            "none",
            "--percent-limit",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    rows = []
    for line in done.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "%" not in line:
            continue
        pct, _, name = line.partition("%")
        try:
            rows.append({"name": name.strip(), "pct": float(pct)})
        except ValueError:
            continue
    return rows


def profile_server(pid: int, duration_s: float, drive: Any, log: Any = print) -> dict[str, Any]:
    """Sample `pid` with py-spy and perf (each if installed and permitted) while `drive()` runs the load."""
    out: dict[str, Any] = {"duration_s": duration_s}
    pyspy = shutil.which("py-spy")
    perf = shutil.which("perf")
    with tempfile.TemporaryDirectory(prefix="spendgate-profile-") as tmp:
        procs: dict[str, subprocess.Popen[str]] = {}
        raw = Path(tmp) / "pyspy.txt"
        data = Path(tmp) / "perf.data"
        load_error: list[BaseException] = []
        result: dict[str, Any] = {}

        def run_load() -> None:
            try:
                result.update(drive())
            except BaseException as exc:  # noqa: BLE001 - reported below
                load_error.append(exc)

        thread = threading.Thread(target=run_load, name="profile-load")
        thread.start()
        # Let the load generator spawn and connect before sampling (it warms up for a second or more).
        thread.join(timeout=2.5)
        if pyspy:
            procs["py-spy"] = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(duration_s)),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        if perf:
            procs["perf"] = subprocess.Popen(
                [
                    perf,
                    "record",
                    "-F",
                    "499",
                    "-g",
                    "-p",
                    str(pid),
                    "-o",
                    str(data),
                    "--",
                    "sleep",
                    str(int(duration_s)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        for name, proc in procs.items():
            try:
                _, err = proc.communicate(timeout=duration_s + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode != 0:
                out[f"{name}_error"] = (err or "").strip()[-500:]
        thread.join()
        if load_error:
            raise load_error[0]
        out["load"] = {
            k: result.get(k)
            for k in ("label", "concurrency", "ops_per_s", "p50_us", "server_cpu_pct", "committed_total", "errors")
        }
        if pyspy is None:
            out["py-spy_error"] = "py-spy is not installed (pip install py-spy)"
        elif raw.exists():
            out["pyspy"] = summarize_pyspy(raw.read_text())
        if perf is None:
            out["perf_error"] = "perf is not installed (apt-get install linux-perf)"
        elif data.exists() and "perf_error" not in out:
            out["perf_by_dso"] = _perf_table(perf, data, "dso")
            out["perf_by_thread"] = _perf_table(perf, data, "comm")
            out["perf_by_thread_and_dso"] = _perf_table(perf, data, "comm,dso")[:10]
            out["perf_top_symbols"] = _perf_table(perf, data, "dso,sym")[:15]
    log(
        "  profile: "
        + ", ".join(f"{c['what'].split(' (')[0]} {c['pct']}%" for c in out.get("pyspy", {}).get("categories", [])[:4])
    )
    return out

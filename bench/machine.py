"""What the numbers were measured on. Every result file carries this, because absolute numbers mean nothing without
it (and even with it, compare ratios, not absolutes: the machines we run on are shared and noisy)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1024 * 1024), 1)
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def describe() -> dict[str, Any]:
    """nproc, CPU model, memory, OS, Python and library versions, date (UTC) and the git commit."""
    import grpc  # noqa: PLC0415 - only the parent process needs it here

    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cpus = os.cpu_count() or 0
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        # Tracked files changed since that commit: the numbers are for the working tree, not exactly the commit.
        "git_dirty": bool(status) if status is not None else None,
        "nproc": usable_cpus,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "loadavg_at_start": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine (a build, a test run) shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far, from /proc (None where there is no /proc or it has exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the ")" that closes comm: fields[0] is state (field 3), so utime (14) and stime (15) are [11] and [12].
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fsync_probe(directory: str | None = None, count: int = 200) -> dict[str, float]:
    """Write 4 KiB and fsync it, `count` times, in a temp file where the bench's data dirs live: what one durable
    write costs on this disk (every durable Reserve waits for at least one; LMDB's commit does two)."""
    import tempfile  # noqa: PLC0415
    import time  # noqa: PLC0415

    samples = []
    block = b"\0" * 4096
    with tempfile.NamedTemporaryFile(dir=directory, prefix="spendgate-fsync-probe-") as f:
        fd = f.fileno()
        for _ in range(count):
            t0 = time.perf_counter_ns()
            os.pwrite(fd, block, 0)
            os.fsync(fd)
            samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return {
        "count": count,
        "p50_us": samples[len(samples) // 2] / 1e3,
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1e3,
    }


def machine_cpu_seconds() -> dict[str, float] | None:
    """CPU time of the whole machine so far (all CPUs added up), from /proc/stat: `busy` (user, nice, system) and
    `steal` (taken by the hypervisor). Compared with the bench's own processes over a window, it shows
    how much other work shared the machine with a measurement. `irq` (irq + softirq) is apart."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    # Interrupt time is left out: it is mostly the bench's own loopback traffic and disk completions, which the
    # kernel accounts to no process.
    return {"busy": (user + nice + system) / tick, "irq": (irq + softirq) / tick, "steal": steal / tick}


def process_tree(pid: int) -> list[int]:
    """`pid` and every process descended from it (e.g. a postmaster and its backends), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out

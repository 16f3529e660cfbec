"""The same server measured by an independent HTTP/2 load tool: h2load (Debian's nghttp2-client), so that the figures
do not depend on our own (Python) client.

A gRPC unary call is an HTTP/2 POST to /<service>/<method> with `content-type: application/grpc` and `te: trailers`,
whose body is one length-prefixed message: a 0 byte (not compressed), the protobuf's length as 4 bytes big-endian,
then the protobuf. The body is encoded once into a file and h2load sends it for every request:
- Ping: the empty PingRequest (5 bytes).
- Reserve: Reserve(customer_id=H2LOAD_CUSTOMER, amount=1, ttl_ms=1 h), every request the same (a new hold each time).

Concurrency C is one connection with C streams in flight (`-c 1 -m C`), like an app's one channel to its sidecar.
Latency percentiles come from h2load's per-request log (`--log-file`), throughput from its summary. h2load judges a
response by its HTTP status only, and a gRPC error is an HTTP 200 with a grpc-status trailer; so for Reserve the bench
checks the server's books: the budget's `reserved` must have grown by at least the number of responses h2load counted
as successes (each one a real, durable hold).
"""

from __future__ import annotations

import re
import resource
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import machine, stats

H2LOAD_CUSTOMER = "h2load-hot"
PATHS = {"ping": "/spendgate.v1.Budget/Ping", "reserve": "/spendgate.v1.Budget/Reserve"}


def available() -> str | None:
    return shutil.which("h2load")


def grpc_frame(message: Any) -> bytes:
    body = message.SerializeToString()
    return struct.pack(">BI", 0, len(body)) + body


def body_for(kind: str) -> bytes:
    from spendgate.v1 import spendgate_pb2 as pb  # noqa: PLC0415

    if kind == "ping":
        return grpc_frame(pb.PingRequest())
    if kind == "reserve":
        return grpc_frame(pb.ReserveRequest(customer_id=H2LOAD_CUSTOMER, amount=1, ttl_ms=3_600_000))
    raise ValueError(kind)


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


def parse_summary(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = _FINISHED.search(text)
    if m:
        secs = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
        out.update(finished_s=secs, req_per_s=float(m.group(3)))
    m = _REQUESTS.search(text)
    if m:
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        out.update({f"requests_{k}": int(v) for k, v in zip(keys, m.groups(), strict=True)})
    return out


def run_one(
    target: str, kind: str, concurrency: int, warmup_s: float, duration_s: float, server_pid: int | None = None
) -> dict[str, Any]:
    binary = available()
    if binary is None:
        raise RuntimeError("h2load is not installed: run `bash bench/setup.sh` (apt-get install nghttp2-client)")
    with tempfile.TemporaryDirectory(prefix="spendgate-h2load-") as tmp:
        body = Path(tmp) / "body.bin"
        body.write_bytes(body_for(kind))
        log_file = Path(tmp) / "requests.tsv"
        argv = [
            binary,
            "-c",
            "1",
            "-m",
            str(concurrency),
            "-t",
            "1",
            "-D",
            f"{round(duration_s * 1000)}ms",
            f"--warm-up-time={round(warmup_s * 1000)}ms",
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"--log-file={log_file}",
            f"http://{target}{PATHS[kind]}",
        ]
        cpu0 = machine.process_cpu_seconds(server_pid) if server_pid else None
        whole0 = machine.machine_cpu_seconds()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=warmup_s + duration_s + 60, check=False)
        wall = time.monotonic() - t0
        cpu1 = machine.process_cpu_seconds(server_pid) if server_pid else None
        whole1 = machine.machine_cpu_seconds()
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # h2load is the only child reaped in between: its CPU is the growth of the children's total.
        client_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr[-2000:]}\n{done.stdout[-2000:]}")
        summary = parse_summary(done.stdout)
        latencies_ns = []
        statuses: dict[str, int] = {}
        for line in log_file.read_text().splitlines():
            cols = line.split("\t")
            if len(cols) < 3:
                continue
            statuses[cols[1]] = statuses.get(cols[1], 0) + 1
            if cols[1] == "200":
                latencies_ns.append(int(cols[2]) * 1000)
    window = summary.get("finished_s") or duration_s
    lat = stats.summarize_ns(latencies_ns, window)
    server_cpu = other_cpu = None
    if cpu0 is not None and cpu1 is not None:
        server_cpu = round(100.0 * (cpu1 - cpu0) / wall, 1)  # over the whole run, warm-up included
        if whole0 and whole1:
            other_cpu = round(100.0 * ((whole1["busy"] - whole0["busy"]) - (cpu1 - cpu0) - client_cpu) / wall, 1)
    return {
        "tool": "h2load",
        "kind": kind,
        "concurrency": concurrency,
        "warmup_s": warmup_s,
        "duration_s": duration_s,
        "argv": " ".join(["h2load"] + argv[1:-1] + [f"http://HOST:PORT{PATHS[kind]}"])
        .replace(str(body), "BODY.bin")
        .replace(str(log_file), "LOG.tsv")
        .replace("content-type: application/grpc", "'content-type: application/grpc'")
        .replace("te: trailers", "'te: trailers'"),
        **summary,
        **lat,
        # h2load's own rate (succeeded / measurement window) is the throughput; the log gives the latencies.
        "ops_per_s": summary.get("req_per_s", lat["ops_per_s"]),
        "log_statuses": statuses,
        "server_cpu_pct": server_cpu,
        "client_cpu_pct": round(100.0 * client_cpu / wall, 1),
        "other_cpu_pct": other_cpu,
        "samples_us": stats.sample_for_cdf(latencies_ns),
    }


def run_all(
    target: str,
    *,
    kinds: tuple[str, ...],
    concurrencies: tuple[int, ...],
    warmup_s: float,
    duration_s: float,
    server_pid: int | None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Every (concurrency, kind). For Reserve, checks the server's books (see the module docstring)."""
    from bench import server as bench_server  # noqa: PLC0415

    bench_server.create_budgets(target, [H2LOAD_CUSTOMER])
    out = []
    for concurrency in concurrencies:
        for kind in kinds:
            before = bench_server.total_spent_and_reserved(target, [H2LOAD_CUSTOMER])[1] if kind == "reserve" else 0
            res = run_one(target, kind, concurrency, warmup_s, duration_s, server_pid)
            if kind == "reserve":
                grown = bench_server.total_spent_and_reserved(target, [H2LOAD_CUSTOMER])[1] - before
                res["holds_made"] = grown
                res["check_ok"] = grown >= res.get("requests_succeeded", 0) > 0
            log(
                f"  h2load {kind:<8} c={concurrency:<3} {res['ops_per_s']:>9.0f} req/s  p50 {res['p50_us']:>8.1f} us"
                f"  p99 {res['p99_us']:>8.1f} us  n={res['count']}"
                + (
                    f"  holds made {res['holds_made']} >= {res.get('requests_succeeded')} succeeded: "
                    f"{'ok' if res['check_ok'] else 'MISMATCH'}"
                    if kind == "reserve"
                    else ""
                )
            )
            out.append(res)
    return out

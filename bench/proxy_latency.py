"""What the HTTP proxy adds to an LLM call: the same requests straight to the fake upstream and through the proxy.

    python bench/proxy_latency.py [--requests 400] [--durability fsync|relaxed] [--write-results]

The fake upstream (spendgate.testing.fake_llm, its own process) answers at once, so every microsecond measured
through the proxy beyond the direct figure is the proxy's: identify, bound, Reserve (durable), forward, Commit
(durable), relay. Rows: non-streamed Chat Completions at concurrency 1 and 64 (p50, p99), and a streamed call's time
to its first byte at concurrency 1 and 64. The load generator is one aiohttp client in this process; the sidecar and
the fake run in processes of their own, all on loopback. --write-results replaces the proxy section of
bench/RESULTS.md. Compare the two columns of one run, not runs: the machine is small and shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT))

from bench.stats import percentile
from spendgate.client import Client
from spendgate.testing import Sidecar

CUSTOMER = "bench-proxy"
BODY = {"model": "gpt-6-sol", "messages": [{"role": "user", "content": "Say hello."}], "max_completion_tokens": 64}
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- proxy-bench:begin -->", "<!-- proxy-bench:end -->"
TARGET_ADDED_P50_US = 1_000.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def one(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> tuple[int, int]:
    """(ns to the first body byte, ns to the end) of one call."""
    started = time.perf_counter_ns()
    async with session.post(
        url, data=body, headers={"content-type": "application/json", "x-spendgate-customer-id": CUSTOMER}
    ) as response:
        first = 0
        async for _ in response.content.iter_any():
            first = first or time.perf_counter_ns()
        assert response.status == 200, (response.status, await response.text())
    return first - started, time.perf_counter_ns() - started


async def measure(url: str, concurrency: int, requests: int, stream: bool) -> dict[str, float]:
    body = json.dumps({**BODY, "stream": stream}).encode()
    connector = aiohttp.TCPConnector(limit=concurrency)
    samples: list[tuple[int, int]] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(min(50, requests)):  # warm the connections and both servers
            await one(session, url, body, stream)
        queue = iter(range(requests))

        async def worker() -> None:
            for _ in queue:
                samples.append(await one(session, url, body, stream))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        window = time.perf_counter() - started
    ttfb, total = sorted(s[0] for s in samples), sorted(s[1] for s in samples)
    return {
        "p50_us": percentile(total, 50) / 1e3,
        "p99_us": percentile(total, 99) / 1e3,
        "ttfb_p50_us": percentile(ttfb, 50) / 1e3,
        "ttfb_p99_us": percentile(ttfb, 99) / 1e3,
        "ops_per_s": len(samples) / window,
    }


def run(requests: int, durability: str) -> list[dict[str, Any]]:
    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "spendgate.testing.fake_llm", str(port)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "python")},
    )
    assert fake.stdout is not None
    fake.stdout.readline()  # it prints its address once it listens
    upstream = f"http://127.0.0.1:{port}/v1"
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        Sidecar(
            Path(tmp) / "data",
            proxy=True,
            extra_args=[
                "--proxy-openai-base-url",
                upstream,
                "--durability",
                durability,
                "--log-level",
                "warning",
                "--max-holds-per-budget",
                "1000000",
            ],
        ) as sidecar,
    ):
        with Client(sidecar.target) as client:
            client.set_budget(CUSTOMER, limit=2**53)
        proxied = sidecar.proxy_url + "/v1/chat/completions"
        try:
            for stream in (False, True):
                for concurrency in (1, 64):
                    direct = asyncio.run(measure(upstream + "/chat/completions", concurrency, requests, stream))
                    through = asyncio.run(measure(proxied, concurrency, requests, stream))
                    rows.append({"stream": stream, "concurrency": concurrency, "direct": direct, "proxy": through})
                    print(row_text(rows[-1]), flush=True)
        finally:
            fake.terminate()
            fake.wait()
    return rows


def row_text(row: dict[str, Any]) -> str:
    d, p = row["direct"], row["proxy"]
    kind = "streamed, time to first byte" if row["stream"] else "whole response"
    keys = ("ttfb_p50_us", "ttfb_p99_us") if row["stream"] else ("p50_us", "p99_us")
    return (
        f"| {kind} | {row['concurrency']} | {d[keys[0]]:,.0f} / {d[keys[1]]:,.0f} | {p[keys[0]]:,.0f} / "
        f"{p[keys[1]]:,.0f} | +{p[keys[0]] - d[keys[0]]:,.0f} / +{p[keys[1]] - d[keys[1]]:,.0f} | "
        f"{d['ops_per_s']:,.0f} / {p['ops_per_s']:,.0f} |"
    )


def section(rows: list[dict[str, Any]], requests: int, durability: str) -> str:
    added = [r["proxy"]["p50_us"] - r["direct"]["p50_us"] for r in rows if not r["stream"]]
    worst = max(added)
    status = "**met**" if worst < TARGET_ADDED_P50_US else f"missed: +{worst:,.0f} µs at p50"
    return "\n".join(
        [
            BEGIN,
            "## The HTTP proxy (`python bench/proxy_latency.py`)",
            "",
            (
                "Chat Completions against the fake upstream (its own process, answering at once), straight and "
                f"through the proxy; {requests} calls a row, durability {durability}, "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Latency in µs in the client (p50 / p99)."
            ),
            "",
            "| call | conc. | direct | through the proxy | added | calls/s direct / proxy |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *(row_text(r) for r in rows),
            "",
            (
                f"Target: under 1 ms added at p50, and no extra time to first byte beyond that: {status}. Through the "
                "proxy a call waits for two durable LMDB writes (its Reserve before it is forwarded, its Commit before "
                "the reply ends), which the direct call does not."
            ),
            END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--durability", choices=("fsync", "relaxed"), default="fsync")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    rows = run(args.requests, args.durability)
    text = section(rows, args.requests, args.durability)
    print(text)
    if args.write_results:
        current = RESULTS.read_text()
        if BEGIN in current:
            current = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, current, flags=re.DOTALL)
        else:
            current = current.rstrip("\n") + "\n\n" + text + "\n"
        RESULTS.write_text(current)


if __name__ == "__main__":
    main()

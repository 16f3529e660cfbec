"""Keeps the benchmark suite from rotting, without timing anything: the baselines it compares spendgate with start
from Debian's Postgres and Redis, speak the same gRPC service, and are correct where they claim to be.

Under 64 concurrent clients racing for one small budget (Reserve, then Commit, until denied), spendgate, the Postgres
baseline and the Redis baseline never grant past the limit; the naive check-then-write may (that is what the bench
shows). Every system's own books must agree with what the clients were granted.

Needs postgresql and redis-server (bench/setup.sh installs them; .ci/run runs it); skipped where they are missing.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from bench import h2load, report, server, services
from spendgate.testing import Sidecar
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

CLIENTS = 64
LIMIT = 1_000
AMOUNT = 10


async def race(target: str, customer: str) -> tuple[int, int, int]:
    """64 clients on one channel: Reserve(AMOUNT) then Commit, until denied. Returns (granted units, the server's
    spent, the server's reserved)."""
    async with grpc.aio.insecure_channel(target) as channel:
        admin, budget = pb_grpc.AdminStub(channel), pb_grpc.BudgetStub(channel)
        created = await admin.SetBudget(pb.SetBudgetRequest(customer_id=customer, limit=LIMIT), timeout=30)
        assert created.balance.limit == LIMIT
        granted = 0

        async def client() -> None:
            nonlocal granted
            while True:
                held = await budget.Reserve(pb.ReserveRequest(customer_id=customer, amount=AMOUNT), timeout=30)
                if not held.granted:
                    assert held.reason == pb.DENY_REASON_INSUFFICIENT_BUDGET
                    return
                granted += AMOUNT
                done = await budget.Commit(
                    pb.CommitRequest(reservation_id=held.reservation_id, amount=AMOUNT), timeout=30
                )
                assert done.charged == AMOUNT

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        balance = await budget.GetBalance(pb.GetBalanceRequest(customer_id=customer), timeout=30)
        assert (await budget.Ping(pb.PingRequest(), timeout=30)) == pb.PingResponse()
    return granted, balance.spent, balance.reserved


@pytest.fixture(scope="module")
def databases() -> Iterator[tuple[services.Postgres, services.Redis]]:
    if services.postgres_bindir() is None or services.redis_server_binary() is None:
        pytest.skip("postgresql and redis-server are not installed (bash bench/setup.sh)")
    pytest.importorskip("asyncpg")
    pytest.importorskip("redis")
    with services.postgres() as pg, services.redis() as rd:
        yield pg, rd


@pytest.mark.parametrize("backend", ["postgres", "redis", "naive"])
def test_baseline_books_and_overspend(
    backend: str, databases: tuple[services.Postgres, services.Redis], tmp_path: Path
) -> None:
    pg, rd = databases
    dsn = services.create_database(pg, f"test_{backend}") if backend != "redis" else None
    with server.baseline(backend, tmp_path / f"{backend}.log", dsn=dsn, redis_url=rd.url, pool_size=16) as running:
        granted, spent, reserved = asyncio.run(race(running.target, "race"))
    # Every grant was committed in full: the server's books show exactly what the clients were granted.
    assert (spent, reserved) == (granted, 0)
    if backend == "naive":
        assert granted >= LIMIT  # it may overspend (the bench reports by how much); it never under-grants
    else:
        assert granted == LIMIT, f"{backend} overspent by {granted - LIMIT} units"


def test_spendgate_never_overspends(tmp_path: Path) -> None:
    with Sidecar(tmp_path / "data") as sidecar:
        granted, spent, reserved = asyncio.run(race(sidecar.target, "race"))
    assert (granted, spent, reserved) == (LIMIT, LIMIT, 0)


def test_h2load_bodies_are_grpc_frames() -> None:
    for kind, message_type in (("ping", pb.PingRequest), ("reserve", pb.ReserveRequest)):
        body = h2load.body_for(kind)
        flag, length = struct.unpack(">BI", body[:5])
        assert (flag, length) == (0, len(body) - 5)
        message = message_type.FromString(body[5:])
        if kind == "reserve":
            assert (message.customer_id, message.amount) == (h2load.H2LOAD_CUSTOMER, 1)


def test_h2load_summary_parses() -> None:
    text = (
        "finished in 4.00s, 6644.33 req/s, 402.61KB/s\n"
        "requests: 26577 total, 26577 started, 26577 done, 26570 succeeded, 7 failed, 0 errored, 0 timeout\n"
    )
    parsed = h2load.parse_summary(text)
    assert parsed["req_per_s"] == 6644.33
    assert (parsed["requests_succeeded"], parsed["requests_failed"]) == (26570, 7)


def test_report_renders_the_targets() -> None:
    def row(kind: str, conc: int, ops: float, p50: float) -> dict[str, object]:
        return {
            "kind": kind,
            "label": kind,
            "concurrency": conc,
            "ops_per_s": ops,
            "p50_us": p50,
            "p90_us": p50,
            "p99_us": p50,
            "p99_9_us": p50,
            "count": 100,
            "denied": 0,
            "errors": {},
            "server_cpu_pct": 1.0,
            "client_cpu_pct": 1.0,
            "parts": {},
            "samples_us": [p50],
        }

    race_ok = {
        "overspend_units": 0,
        "server_overspend_units": 0,
        "limit_total": 100,
        "rounds": 1,
        "granted_units": 100,
        "limit": 100,
        "amount": 10,
        "ops_per_s": 1.0,
        "p50_us": 1.0,
        "p99_us": 1.0,
        "errors": {},
    }
    result = {
        "machine": {
            "date_utc": "2026-01-01T00:00:00+00:00",
            "git_commit": "abc",
            "nproc": 2,
            "cpu_model": "cpu",
            "mem_total_gib": 1,
            "os": "Linux",
            "python": "3.11",
            "grpcio": "1",
        },
        "params": {"quick": True, "warmup_s": 0, "duration_s": 1, "procs": 1},
        "grpc": [row("ping", 64, 1000, 100), row("reserve", 64, 900, 110), row("reserve_commit", 64, 450, 220)],
        "race": race_ok,
        "baselines": {
            "postgres": {"grpc": [row("reserve", 64, 300, 300), row("reserve_commit", 64, 150, 600)], "race": race_ok},
            "naive": {"grpc": [row("reserve_commit", 64, 100, 900)], "race": {**race_ok, "overspend_units": 30}},
        },
    }
    text = report.render(result)
    targets = {t["target"].split(" ")[0]: t for t in report.targets(result)}
    assert targets["Reserve"]["met"] is True  # 110/100 = 1.10 <= 1.15
    assert "3.00×" in text and "+30 units" in text

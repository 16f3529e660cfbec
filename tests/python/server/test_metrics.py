"""GET /metrics: what a Prometheus scrape of a real sidecar shows after real gRPC calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import aiohttp
import grpc.aio
from prometheus_client.parser import text_string_to_metric_families

from spendgate.server.app import Sidecar
from spendgate.server.metrics import Metrics
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

from .test_app import create_budget, settings_for, with_sidecar

HANG_GUARD_S = 30.0  # a guard against a hang, not a timing assertion
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(sidecar: Sidecar, headers: Mapping[str, str] | None = None) -> Samples:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{sidecar.http_address}/metrics", headers=headers) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/plain")
            return parse(await response.text())


def test_every_rpc_is_counted_by_method_decision_and_reason_with_its_latency(tmp_path: object) -> None:
    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> Samples:
        budget = pb_grpc.BudgetStub(channel)
        await create_budget(channel, "cus_a", 100)
        first = await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=60))
        denied = await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=60))
        assert first.granted and not denied.granted
        await budget.Commit(pb.CommitRequest(reservation_id=first.reservation_id, amount=70))  # over its hold
        second = await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=10))
        await budget.Release(pb.ReleaseRequest(reservation_id=second.reservation_id))
        try:
            await budget.GetBalance(pb.GetBalanceRequest(customer_id="cus_nobody"))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
        return await scrape(sidecar)

    samples = with_sidecar(settings_for(tmp_path, http_listen="127.0.0.1:0"), body)  # type: ignore[arg-type]
    decisions = "spendgate_decisions_total"
    assert sample(samples, decisions, method="Reserve", decision="granted", reason="new") == 2
    assert sample(samples, decisions, method="Reserve", decision="denied", reason="insufficient_budget") == 1
    assert sample(samples, decisions, method="Commit", decision="committed", reason="over_reserved") == 1
    assert sample(samples, decisions, method="Release", decision="released", reason="new") == 1
    assert sample(samples, decisions, method="GetBalance", decision="error", reason="not_found") == 1
    assert sample(samples, decisions, method="SetBudget", decision="ok", reason="none") == 1
    latency = "spendgate_rpc_duration_seconds_count"
    assert sample(samples, latency, method="Reserve", decision="granted") == 2
    assert sample(samples, latency, method="Reserve", decision="denied") == 1
    assert sample(samples, latency, method="Commit", decision="committed") == 1
    assert sample(samples, latency, method="Release", decision="released") == 1
    assert sample(samples, "spendgate_rpc_duration_seconds_sum", method="Reserve", decision="granted") > 0


def test_engine_and_outbox_gauges_are_read_at_scrape_time(tmp_path: object) -> None:
    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> tuple[Samples, Samples]:
        budget = pb_grpc.BudgetStub(channel)
        await create_budget(channel, "cus_a", 1_000)
        await create_budget(channel, "cus_b", 1_000)
        for amount in (5, 7):
            held = await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=amount))
            await budget.Commit(pb.CommitRequest(reservation_id=held.reservation_id, amount=amount))
        await budget.Reserve(pb.ReserveRequest(customer_id="cus_b", amount=3))  # stays open
        before = await scrape(sidecar)
        await budget.Reserve(pb.ReserveRequest(customer_id="cus_b", amount=4, ttl_ms=1))  # the reaper takes it
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            after = await scrape(sidecar)
            if sample(after, "spendgate_expired_holds_total") >= 1 or time.monotonic() > deadline:
                return before, after
            await asyncio.sleep(0.05)

    settings = settings_for(tmp_path, http_listen="127.0.0.1:0", map_size_mb=64)  # type: ignore[arg-type]
    before, after = with_sidecar(settings, body)
    assert sample(before, "spendgate_engine_up") == 1
    assert sample(before, "spendgate_budgets") == 2
    assert sample(before, "spendgate_active_holds") == 1
    assert sample(before, "spendgate_outbox_depth") == 2  # settlement is off: both commits wait
    assert sample(before, "spendgate_outbox_oldest_age_seconds") >= 0
    assert sample(before, "spendgate_dead_letters") == 0
    assert sample(before, "spendgate_lmdb_map_size_bytes") == 64 * 1024 * 1024
    assert 0 < sample(before, "spendgate_lmdb_map_used_ratio") < 1
    assert sample(before, "spendgate_lmdb_file_bytes") > 0
    assert sample(before, "spendgate_settlement_enabled") == 0
    assert sample(after, "spendgate_expired_holds_total") == 1
    assert sample(after, "spendgate_active_holds") == 1


def test_events_other_code_reports_appear_in_the_scrape(tmp_path: object) -> None:
    async def body(sidecar: Sidecar, _: grpc.aio.Channel) -> Samples:
        sidecar.metrics.alerts.labels(kind="outbox_filling").inc(2)
        sidecar.metrics.stripe_error("rate_limit")
        return await scrape(sidecar)

    samples = with_sidecar(settings_for(tmp_path, http_listen="127.0.0.1:0"), body)  # type: ignore[arg-type]
    assert sample(samples, "spendgate_alerts_total", kind="outbox_filling") == 2
    assert sample(samples, "spendgate_stripe_errors_total", code="rate_limit") == 1


def test_two_sidecars_in_one_process_have_registries_of_their_own() -> None:
    first, second = Metrics(), Metrics()
    first.alerts.labels(kind="b").inc()
    assert 'spendgate_alerts_total{kind="b"}' in first.render()[0].decode()
    assert 'kind="b"' not in second.render()[0].decode()


def test_metrics_can_require_an_admin_token(tmp_path: object) -> None:
    admin = "admin-token-0123456789abcdef"
    app = "app-token-0123456789abcdef"

    async def body(sidecar: Sidecar, _: grpc.aio.Channel) -> list[int]:
        statuses = []
        async with aiohttp.ClientSession() as session:
            for headers in ({}, {"Authorization": f"Bearer {app}"}, {"Authorization": f"Bearer {admin}"}):
                async with session.get(f"http://{sidecar.http_address}/metrics", headers=headers) as response:
                    statuses.append(response.status)
        return statuses

    settings = settings_for(
        tmp_path,
        http_listen="127.0.0.1:0",
        admin_tokens=admin,
        app_tokens=app,  # type: ignore[arg-type]
        metrics_require_token=True,
    )
    assert with_sidecar(settings, body) == [401, 401, 200]


def test_a_breaker_trip_and_a_period_roll_over_are_counted(tmp_path: object) -> None:
    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> Samples:
        budget, admin = pb_grpc.BudgetStub(channel), pb_grpc.AdminStub(channel)
        now_ms = int(time.time() * 1000)
        period = pb.Period(kind=pb.PERIOD_KIND_FIXED, start_ms=now_ms - 1_000, end_ms=now_ms)
        await admin.SetBudget(pb.SetBudgetRequest(customer_id="cus_run", limit=10_000))
        await admin.SetBudget(pb.SetBudgetRequest(customer_id="cus_roll", limit=10, period=period))
        hold = await budget.Reserve(pb.ReserveRequest(customer_id="cus_run", amount=500))
        assert (await budget.Commit(pb.CommitRequest(reservation_id=hold.reservation_id, amount=500))).breaker_tripped
        deadline = time.monotonic() + 10
        while (samples := await scrape(sidecar)) and sample(samples, "spendgate_periods_rolled_total") < 1:
            assert time.monotonic() < deadline, "the ended period never rolled over"
            await asyncio.sleep(0.05)
        return samples

    # No history yet: only breaker_min_units can trip it, and 500 > 100 does.
    settings = settings_for(tmp_path, http_listen="127.0.0.1:0", breaker_min_units=100)  # type: ignore[arg-type]
    samples = with_sidecar(settings, body)
    assert sample(samples, "spendgate_breaker_trips_total") == 1
    assert sample(samples, "spendgate_periods_rolled_total") >= 1

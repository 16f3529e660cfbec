"""The server in-process: the services over real gRPC on a loopback port, health, reflection, options, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from spendgate.config import Settings
from spendgate.server.app import Sidecar, bound_address
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

T = TypeVar("T")
HANG_GUARD_S = 60.0  # not a timing assertion: a guard so that a bug fails the test instead of hanging it
SERVING = health_pb2.HealthCheckResponse.SERVING


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    return dataclasses.replace(Settings(listen="127.0.0.1:0", data_dir=str(tmp_path / "data")), **overrides)


def with_sidecar(settings: Settings, body: Callable[[Sidecar, grpc.aio.Channel], Awaitable[T]]) -> T:
    """Start a Sidecar, run body(sidecar, channel), always stop it."""

    async def main() -> T:
        sidecar = Sidecar(settings)
        await sidecar.start()
        try:
            async with grpc.aio.insecure_channel(sidecar.address) as channel:
                return await asyncio.wait_for(body(sidecar, channel), HANG_GUARD_S)
        finally:
            await sidecar.stop()

    return asyncio.run(main())


async def create_budget(channel: grpc.aio.Channel, customer_id: str, limit: int) -> pb.SetBudgetResponse:
    reply: pb.SetBudgetResponse = await pb_grpc.AdminStub(channel).SetBudget(
        pb.SetBudgetRequest(customer_id=customer_id, limit=limit)
    )
    return reply


# -- the services ------------------------------------------------------------------------------------------------------


def test_reserve_commit_and_release_move_the_counters(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        budget = pb_grpc.BudgetStub(channel)
        created = await create_budget(channel, "cus_a", 1000)
        assert created.created and created.balance.limit == 1000 and created.balance.stripe_customer_id == "cus_a"

        first = await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=300))
        assert first.granted and first.reservation_id and first.amount == 300 and first.remaining == 700
        assert first.reason == pb.DENY_REASON_UNSPECIFIED and first.message == ""
        second = await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=200))

        committed = await budget.Commit(pb.CommitRequest(reservation_id=first.reservation_id, amount=250))
        assert committed.charged == 250 and not committed.over_reserved and not committed.replayed
        released = await budget.Release(pb.ReleaseRequest(reservation_id=second.reservation_id))
        assert released.released and released.state == pb.HOLD_STATE_RELEASED

        balance = await budget.GetBalance(pb.GetBalanceRequest(customer_id="cus_a"))
        assert (balance.limit, balance.spent, balance.reserved, balance.remaining) == (1000, 250, 0, 750)
        assert balance.active_holds == 0

    with_sidecar(settings_for(tmp_path), body)


def test_a_denial_is_an_ok_reply_with_a_reason_and_a_message(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        await create_budget(channel, "cus_a", 100)
        reply = await pb_grpc.BudgetStub(channel).Reserve(pb.ReserveRequest(customer_id="cus_a", amount=101))
        assert not reply.granted
        assert reply.reservation_id == ""
        assert reply.reason == pb.DENY_REASON_INSUFFICIENT_BUDGET
        assert "cus_a" in reply.message and "101" in reply.message

    with_sidecar(settings_for(tmp_path), body)


def test_too_many_holds_is_a_denial_too(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        await create_budget(channel, "cus_a", 100)
        budget = pb_grpc.BudgetStub(channel)
        assert (await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=1))).granted
        reply = await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=1))
        assert not reply.granted and reply.reason == pb.DENY_REASON_TOO_MANY_HOLDS
        assert "max_holds_per_budget" in reply.message

    with_sidecar(settings_for(tmp_path, max_holds_per_budget=1), body)


def test_a_retried_reserve_with_the_same_idempotency_key_replays(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        await create_budget(channel, "cus_a", 100)
        budget = pb_grpc.BudgetStub(channel)
        request = pb.ReserveRequest(customer_id="cus_a", amount=10, idempotency_key="call-1")
        first, again = await budget.Reserve(request), await budget.Reserve(request)
        assert again.replayed and again.reservation_id == first.reservation_id
        assert first.state == again.state == pb.HOLD_STATE_ACTIVE

    with_sidecar(settings_for(tmp_path), body)


def test_a_replay_after_the_hold_ended_says_how_it_ended(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        await create_budget(channel, "cus_a", 100)
        budget = pb_grpc.BudgetStub(channel)
        request = pb.ReserveRequest(customer_id="cus_a", amount=10, idempotency_key="call-1")
        first = await budget.Reserve(request)
        await budget.Commit(pb.CommitRequest(reservation_id=first.reservation_id, amount=4))
        again = await budget.Reserve(request)
        assert (again.granted, again.replayed, again.state) == (False, True, pb.HOLD_STATE_COMMITTED)
        assert again.reason == pb.DENY_REASON_HOLD_ENDED and "new idempotency_key" in again.message
        denied = await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=1_000))
        assert (denied.granted, denied.state) == (False, pb.HOLD_STATE_UNSPECIFIED)

    with_sidecar(settings_for(tmp_path), body)


def test_a_frozen_budget_denies_with_a_reason_until_unfrozen(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        await create_budget(channel, "cus_a", 100)
        admin, budget = pb_grpc.AdminStub(channel), pb_grpc.BudgetStub(channel)
        frozen = await admin.FreezeBudget(pb.FreezeBudgetRequest(customer_id="cus_a", frozen=True))
        assert frozen.balance.frozen
        denied = await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=1))
        assert (denied.granted, denied.reason) == (False, pb.DENY_REASON_FROZEN)
        assert "frozen" in denied.message
        await admin.FreezeBudget(pb.FreezeBudgetRequest(customer_id="cus_a", frozen=False))
        assert (await budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=1))).granted
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await admin.FreezeBudget(pb.FreezeBudgetRequest(customer_id="cus_nobody", frozen=True))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND

    with_sidecar(settings_for(tmp_path), body)


def test_list_budgets_returns_them_in_id_order_filtered_by_prefix(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        for customer_id in ("team-b", "team-a", "solo"):
            await create_budget(channel, customer_id, 100)
        admin = pb_grpc.AdminStub(channel)
        listed = await admin.ListBudgets(pb.ListBudgetsRequest(prefix="team-"))
        assert [b.customer_id for b in listed.budgets] == ["team-a", "team-b"]
        everything = await admin.ListBudgets(pb.ListBudgetsRequest())
        assert [b.customer_id for b in everything.budgets] == ["solo", "team-a", "team-b"]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await admin.ListBudgets(pb.ListBudgetsRequest(limit=10_001))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "10000" in (error.value.details() or "")

    with_sidecar(settings_for(tmp_path), body)


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.ReserveRequest(customer_id="cus_nobody", amount=1), grpc.StatusCode.NOT_FOUND),
        (pb.ReserveRequest(customer_id="cus_a", amount=-1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ReserveRequest(customer_id="cus_a", amount=2**63 - 1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ReserveRequest(customer_id="cus_a", amount=1, ttl_ms=2**64 - 1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ReserveRequest(customer_id="", amount=1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ReserveRequest(customer_id="x" * 129, amount=1), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["unknown customer", "negative amount", "amount past 2^53", "ttl past max", "empty id", "id too long"],
)
def test_bad_reserve_requests_are_errors_with_the_engine_message(
    tmp_path: Path, request_: pb.ReserveRequest, code: grpc.StatusCode
) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        await create_budget(channel, "cus_a", 100)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.BudgetStub(channel).Reserve(request_)
        assert caught.value.code() == code, caught.value.details()
        assert caught.value.details()  # the engine's message, saying what to fix

    with_sidecar(settings_for(tmp_path), body)


def test_commit_of_an_unknown_reservation_is_not_found(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.BudgetStub(channel).Commit(pb.CommitRequest(reservation_id="res_nope", amount=1))
        assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)

    with_sidecar(settings_for(tmp_path), body)


def test_ping_answers(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        assert await pb_grpc.BudgetStub(channel).Ping(pb.PingRequest()) == pb.PingResponse()

    with_sidecar(settings_for(tmp_path), body)


# -- health, reflection, options ---------------------------------------------------------------------------------------


def test_health_is_serving_for_the_server_and_both_services(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "spendgate.v1.Budget", "spendgate.v1.Admin"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == SERVING, service

    with_sidecar(settings_for(tmp_path), body)


def test_health_turns_not_serving_for_good_when_the_engine_fails(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar, channel: grpc.aio.Channel) -> None:
        # A real writer failure (a full disk, an I/O error) cannot be made on demand: call what the DurabilityWaiter
        # calls when it sees engine.failure() (tests/python/server/test_durability.py covers that part).
        sidecar._on_engine_failure("simulated writer failure")
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "spendgate.v1.Budget", "spendgate.v1.Admin"):
            while (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == SERVING:
                await asyncio.sleep(0)  # the status is set by a task the callback scheduled
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING, service

    with_sidecar(settings_for(tmp_path), body)


async def reflected_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names: set[str] = set()
    async for reply in call:
        names |= {s.name for s in reply.list_services_response.service}
    return names


def test_reflection_lists_the_services_by_default(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        assert {"spendgate.v1.Budget", "spendgate.v1.Admin", "grpc.health.v1.Health"} <= await reflected_services(
            channel
        )

    with_sidecar(settings_for(tmp_path), body)


def test_reflection_can_be_turned_off(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reflected_services(channel)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

    with_sidecar(settings_for(tmp_path, reflection=False), body)


def test_a_message_past_max_message_bytes_is_refused(tmp_path: Path) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.BudgetStub(channel).GetBalance(pb.GetBalanceRequest(customer_id="x" * 2048))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    with_sidecar(settings_for(tmp_path, max_message_bytes=1024), body)


def test_a_second_server_cannot_take_the_same_port(tmp_path: Path) -> None:
    async def body(sidecar: Sidecar, _: grpc.aio.Channel) -> None:
        second = Sidecar(dataclasses.replace(sidecar.settings, listen=sidecar.address, data_dir=str(tmp_path / "b")))
        with pytest.raises(RuntimeError):
            await second.start()  # and a failed start cleans up after itself

    with_sidecar(settings_for(tmp_path), body)


# -- lifecycle ---------------------------------------------------------------------------------------------------------


def test_acknowledged_changes_survive_a_stop_and_a_restart_on_the_same_data_dir(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)

    async def write(_: Sidecar, channel: grpc.aio.Channel) -> str:
        await create_budget(channel, "cus_a", 1000)
        reply = await pb_grpc.BudgetStub(channel).Reserve(pb.ReserveRequest(customer_id="cus_a", amount=100))
        await pb_grpc.BudgetStub(channel).Commit(pb.CommitRequest(reservation_id=reply.reservation_id, amount=60))
        return str(reply.reservation_id)

    async def read(_: Sidecar, channel: grpc.aio.Channel) -> pb.Balance:
        return await pb_grpc.BudgetStub(channel).GetBalance(pb.GetBalanceRequest(customer_id="cus_a"))

    with_sidecar(settings, write)
    # The engine frees the data dir's lock when it is freed, not on close(), and grpc holds the servicers (and so the
    # engine) in reference cycles: collect them before opening the data dir again in this process.
    gc.collect()
    balance = with_sidecar(settings, read)
    assert (balance.limit, balance.spent, balance.reserved) == (1000, 60, 0)


def test_stop_is_idempotent(tmp_path: Path) -> None:
    async def main() -> None:
        sidecar = Sidecar(settings_for(tmp_path))
        await sidecar.start()
        await sidecar.stop()
        await sidecar.stop()

    asyncio.run(main())


def test_bound_address_reports_the_port_chosen_for_port_zero() -> None:
    assert bound_address("127.0.0.1:0", 43210) == "127.0.0.1:43210"
    assert bound_address("[::1]:0", 43210) == "[::1]:43210"
    assert bound_address("127.0.0.1:50051", 50051) == "127.0.0.1:50051"

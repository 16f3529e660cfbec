"""spendgate.client against a real sidecar in a child process (fixtures in tests/conftest.py).

Lost replies are simulated with client interceptors: the request reaches the server and takes effect, then the client
sees UNAVAILABLE, exactly like a connection dropped on the way back.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

from spendgate.client import (
    AlreadyExists,
    AsyncClient,
    BudgetExceeded,
    Client,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    SpendgateError,
    Unavailable,
    error_from_rpc,
)
from spendgate.testing import Sidecar
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

CreateBudget = Callable[..., str]

# Fast retries: the tests only care how many attempts happen, never how long they take.
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


class LostReply(grpc.RpcError):
    """What a client sees when the connection drops after the server acted: UNAVAILABLE."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "reply lost (simulated by the test)"


def _method_name(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


class LoseFirstReply(grpc.UnaryUnaryClientInterceptor):
    """Let every call through to the server, but hide the first reply of `method` behind UNAVAILABLE."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.requests: list[Any] = []

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        outcome = continuation(client_call_details, request)
        if not _method_name(client_call_details).endswith(self.method):
            return outcome
        self.requests.append(request)
        if len(self.requests) == 1:
            outcome.result()  # the server has acted on it
            raise LostReply()
        return outcome


class AsyncLoseFirstReply(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, method: str) -> None:
        self.method = method
        self.requests: list[Any] = []

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        call = await continuation(client_call_details, request)
        if not _method_name(client_call_details).endswith(self.method):
            return call
        self.requests.append(request)
        if len(self.requests) == 1:
            await call  # the server has acted on it
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="reply lost (simulated by the test)",
            )
        return call


@pytest.fixture
def refused_target() -> Iterator[str]:
    """An address where nothing listens: bound (so no one else gets it) but never listening, so connects fail."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def assert_settled(balance: pb.Balance, *, spent: int) -> None:
    assert balance.spent == spent
    assert balance.reserved == 0
    assert balance.active_holds == 0
    assert balance.remaining == balance.limit - spent


# -- blocking client ---------------------------------------------------------------------------------------------


def test_commit_in_block_records_actual_usage(client: Client, admin: CreateBudget) -> None:
    customer = admin(1_000)
    with client.reserve(customer, amount=500) as hold:
        assert client.balance(customer).reserved == 500
        reply = hold.commit(120)
    assert reply.charged == 120
    assert_settled(client.balance(customer), spent=120)


def test_clean_exit_without_commit_charges_the_whole_hold(client: Client, admin: CreateBudget) -> None:
    customer = admin(1_000)
    with client.reserve(customer, amount=500):
        pass
    assert_settled(client.balance(customer), spent=500)


def test_exception_in_block_releases_and_propagates(client: Client, admin: CreateBudget) -> None:
    customer = admin(1_000)
    with pytest.raises(RuntimeError, match="llm failed"):
        with client.reserve(customer, amount=500):
            raise RuntimeError("llm failed")
    assert_settled(client.balance(customer), spent=0)


def test_denial_raises_before_the_block_runs(client: Client, admin: CreateBudget) -> None:
    customer = admin(100)
    body_ran = False
    with pytest.raises(BudgetExceeded) as denied:
        with client.reserve(customer, amount=500):
            body_ran = True
    assert not body_ran
    assert denied.value.reason == pb.DENY_REASON_INSUFFICIENT_BUDGET
    assert denied.value.remaining == 100
    assert denied.value.message
    assert denied.value.code is None  # a denial is an OK reply, not a gRPC error
    assert_settled(client.balance(customer), spent=0)


def test_reserve_raw_returns_a_denial_instead_of_raising(client: Client, admin: CreateBudget) -> None:
    customer = admin(100)
    reply = client.reserve_raw(customer, 500)
    assert not reply.granted
    assert reply.reason == pb.DENY_REASON_INSUFFICIENT_BUDGET


def test_auto_key_makes_a_retried_reserve_return_the_same_reservation(sidecar: Sidecar, admin: CreateBudget) -> None:
    customer = admin(1_000)
    lose = LoseFirstReply("/Reserve")
    with grpc.intercept_channel(grpc.insecure_channel(sidecar.target), lose) as channel:
        hold = Client(channel=channel, retry=FAST_RETRY).reserve(customer, amount=300)
    assert len(lose.requests) == 2, "the lost reply was retried once"
    assert lose.requests[0].idempotency_key, "a key was generated"
    assert lose.requests[0].idempotency_key == lose.requests[1].idempotency_key
    assert hold.replayed
    with Client(sidecar.target) as client:
        balance = client.balance(customer)
        assert (balance.reserved, balance.active_holds) == (300, 1), "one hold, not two"
        client.commit(hold.reservation_id, 300)


def test_retried_commit_charges_once(sidecar: Sidecar, client: Client, admin: CreateBudget) -> None:
    customer = admin(1_000)
    hold = client.reserve(customer, amount=300)
    lose = LoseFirstReply("/Commit")
    with grpc.intercept_channel(grpc.insecure_channel(sidecar.target), lose) as channel:
        reply = Client(channel=channel, retry=FAST_RETRY).commit(hold.reservation_id, 200)
    assert len(lose.requests) == 2
    assert reply.replayed and reply.charged == 200
    assert_settled(client.balance(customer), spent=200)


def test_same_key_twice_replays_and_another_amount_is_already_exists(client: Client, admin: CreateBudget) -> None:
    customer = admin(1_000)
    first = client.reserve_raw(customer, 100, idempotency_key="order-1")
    again = client.reserve_raw(customer, 100, idempotency_key="order-1")
    assert (again.reservation_id, again.replayed) == (first.reservation_id, True)
    with pytest.raises(AlreadyExists) as err:
        client.reserve_raw(customer, 200, idempotency_key="order-1")
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and err.value.message


def test_errors_carry_the_servers_status_and_message(sidecar: Sidecar, client: Client, admin: CreateBudget) -> None:
    customer, missing = admin(1_000), "cus_that_does_not_exist"
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.BudgetStub(channel)
        cases: list[tuple[Callable[[], Any], Callable[[], Any], type[SpendgateError]]] = [
            (
                lambda: stub.Reserve(pb.ReserveRequest(customer_id=customer, amount=0, idempotency_key="k")),
                lambda: client.reserve_raw(customer, 0, idempotency_key="k"),
                InvalidArgument,
            ),
            (
                lambda: stub.GetBalance(pb.GetBalanceRequest(customer_id=missing)),
                lambda: client.balance(missing),
                NotFound,
            ),
        ]
        for raw_call, client_call, error in cases:
            with pytest.raises(grpc.RpcError) as raw:
                raw_call()
            with pytest.raises(error) as mapped:
                client_call()
            assert mapped.value.code == raw.value.code()
            assert mapped.value.message == raw.value.details() != ""
            assert type(error_from_rpc(raw.value)) is error


def test_unavailable_after_bounded_retries(refused_target: str) -> None:
    with Client(refused_target, retry=FAST_RETRY, timeout_s=2.0) as client:
        with pytest.raises(Unavailable) as err:
            client.commit("res_nowhere", 1)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_error_mapping_covers_unlisted_codes() -> None:
    class Aborted(LostReply):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.ABORTED

    mapped = error_from_rpc(Aborted())
    assert type(mapped) is SpendgateError and mapped.code == grpc.StatusCode.ABORTED


def test_ping_and_close(sidecar: Sidecar) -> None:
    client = Client(sidecar.target)
    client.ping()
    client.close()
    client.close()  # idempotent
    with pytest.raises(ValueError):  # grpc refuses calls on a closed channel
        client.ping()


# -- asyncio client ----------------------------------------------------------------------------------------------


def test_async_commit_release_and_clean_exit(sidecar: Sidecar, admin: CreateBudget) -> None:
    customer = admin(1_000)

    async def scenario() -> pb.Balance:
        async with AsyncClient(sidecar.target) as client:
            async with client.reserve(customer, amount=500) as hold:
                await hold.commit(120)
            with pytest.raises(RuntimeError):
                async with client.reserve(customer, amount=500):
                    raise RuntimeError("llm failed")
            async with client.reserve(customer, amount=30):
                pass
            return await client.balance(customer)

    assert_settled(asyncio.run(scenario()), spent=150)


def test_list_ledger_pages_the_audit_trail_in_both_clients(
    client: Client, sidecar: Sidecar, admin: CreateBudget
) -> None:
    customer = admin(1_000)
    for amount in (3, 4, 5):
        with client.reserve(customer, amount=amount) as hold:
            hold.commit(amount)
    first = client.list_ledger(customer, limit=2)
    assert [e.amount for e in first.entries] == [3, 4] and first.more
    rest = client.list_ledger(customer, after=first.next_after, limit=2)
    assert [e.amount for e in rest.entries] == [5] and not rest.more

    async def scenario() -> list[int]:
        async with AsyncClient(sidecar.target) as async_client:
            page = await async_client.list_ledger(customer, "current")
            return [e.amount for e in page.entries]

    assert asyncio.run(scenario()) == [3, 4, 5]
    with pytest.raises(InvalidArgument, match="1..=1000"):
        client.list_ledger(customer, limit=5_000)
    with pytest.raises(NotFound):
        client.list_ledger("cus_test_nobody_here")


def test_async_denial_raises_before_the_block_runs(sidecar: Sidecar, admin: CreateBudget) -> None:
    customer = admin(100)
    body_ran = False

    async def scenario() -> None:
        nonlocal body_ran
        async with AsyncClient(sidecar.target) as client:
            async with client.reserve(customer, amount=500):
                body_ran = True

    with pytest.raises(BudgetExceeded) as denied:
        asyncio.run(scenario())
    assert not body_ran
    assert (denied.value.reason, denied.value.remaining) == (pb.DENY_REASON_INSUFFICIENT_BUDGET, 100)


def test_async_auto_key_makes_a_retried_reserve_return_the_same_reservation(
    sidecar: Sidecar, admin: CreateBudget
) -> None:
    customer = admin(1_000)
    lose = AsyncLoseFirstReply("/Reserve")

    async def scenario() -> tuple[bool, pb.Balance]:
        channel = grpc.aio.insecure_channel(sidecar.target, interceptors=[lose])
        async with channel, AsyncClient(channel=channel, retry=FAST_RETRY) as client:
            async with client.reserve(customer, amount=300) as hold:
                balance = await client.balance(customer)
                await hold.commit(300)
            return hold.replayed, balance

    replayed, balance = asyncio.run(scenario())
    assert len(lose.requests) == 2
    assert lose.requests[0].idempotency_key == lose.requests[1].idempotency_key != ""
    assert replayed
    assert (balance.reserved, balance.active_holds) == (300, 1), "one hold, not two"


def test_async_errors_carry_the_servers_status_and_message(sidecar: Sidecar, admin: CreateBudget) -> None:
    customer = admin(1_000)

    async def scenario() -> None:
        async with AsyncClient(sidecar.target) as client:
            await client.ping()
            with pytest.raises(InvalidArgument) as bad:
                await client.reserve_raw(customer, 0)
            assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.message
            with pytest.raises(NotFound) as missing:
                await client.balance(customer + "_missing")
            assert missing.value.code == grpc.StatusCode.NOT_FOUND and missing.value.message

    asyncio.run(scenario())

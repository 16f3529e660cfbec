"""Helpers for the end-to-end specification tests.

Every test talks to a real `python -m spendgate serve` process through raw gRPC stubs generated from
proto/spendgate/v1/spendgate.proto, so these tests pin the wire contract, not the client library.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

MAX_AMOUNT = 2**53
MAX_ID_BYTES = 128
# A hold lifetime far longer than any test, so holds never expire unless a test wants them to.
LONG_TTL_MS = 600_000
RPC_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 20.0
POLL_DEADLINE_S = 10.0

INSUFFICIENT = pb.DENY_REASON_INSUFFICIENT_BUDGET
TOO_MANY_HOLDS = pb.DENY_REASON_TOO_MANY_HOLDS
HOLD_ENDED = pb.DENY_REASON_HOLD_ENDED
NO_STATE = pb.HOLD_STATE_UNSPECIFIED
ACTIVE = pb.HOLD_STATE_ACTIVE
COMMITTED = pb.HOLD_STATE_COMMITTED
RELEASED = pb.HOLD_STATE_RELEASED
EXPIRED = pb.HOLD_STATE_EXPIRED

T = TypeVar("T")


def model_prices(markup_percent: int) -> str:
    """A price table (TOML) with one model, "test-model": $3 input, $0.30 cached input, $3.75 cache write, $15
    output, $20 reasoning per MTok, plus the markup; unknown models denied. Expected figures stay put when the bundled
    prices move."""
    return PRICE_TABLE.format(markup=markup_percent)


PRICE_TABLE = """
as_of = 2026-11-01
markup_percent = "{markup}"
use_bundled = false

[unknown_model]
policy = "deny"

[models."test-model"]
input = 3_000_000
cached_input = 300_000
cache_write = 3_750_000
output = 15_000_000
reasoning = 20_000_000
"""

CHANNEL_OPTIONS = (
    # Each Conn gets its own subchannel (its own TCP connection): "64 clients" means 64 connections, and a fresh Conn
    # after a restart never inherits a subchannel stuck in reconnect backoff.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class Conn:
    """One client: its own channel, with the Budget and Admin stubs on it."""

    def __init__(self, target: str, *, wait_ready: bool = True) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        if wait_ready:
            grpc.channel_ready_future(self.channel).result(timeout=CONNECT_TIMEOUT_S)
        self.budget = pb_grpc.BudgetStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def reserve(self, customer_id: str, amount: int, idempotency_key: str = "", ttl_ms: int = 0) -> pb.ReserveResponse:
        return self.budget.Reserve(
            pb.ReserveRequest(customer_id=customer_id, amount=amount, idempotency_key=idempotency_key, ttl_ms=ttl_ms),
            timeout=RPC_TIMEOUT_S,
        )

    def commit(self, reservation_id: str, amount: int) -> pb.CommitResponse:
        return self.budget.Commit(pb.CommitRequest(reservation_id=reservation_id, amount=amount), timeout=RPC_TIMEOUT_S)

    def release(self, reservation_id: str) -> pb.ReleaseResponse:
        return self.budget.Release(pb.ReleaseRequest(reservation_id=reservation_id), timeout=RPC_TIMEOUT_S)

    def balance(self, customer_id: str) -> pb.Balance:
        return self.budget.GetBalance(pb.GetBalanceRequest(customer_id=customer_id), timeout=RPC_TIMEOUT_S)

    def set_budget(self, customer_id: str, limit: int, stripe_customer_id: str = "") -> pb.SetBudgetResponse:
        return self.admin.SetBudget(
            pb.SetBudgetRequest(customer_id=customer_id, limit=limit, stripe_customer_id=stripe_customer_id),
            timeout=RPC_TIMEOUT_S,
        )

    def list_budgets(self, prefix: str = "", limit: int = 0) -> pb.ListBudgetsResponse:
        return self.admin.ListBudgets(pb.ListBudgetsRequest(prefix=prefix, limit=limit), timeout=RPC_TIMEOUT_S)

    def ping(self) -> pb.PingResponse:
        return self.budget.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT_S)


def new_customer(prefix: str = "cust") -> str:
    """A customer id no other test (or earlier run against the same data dir) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def counters(balance: pb.Balance) -> dict[str, Any]:
    """Every field of a Balance, for exact before/after comparisons."""
    return {
        "customer_id": balance.customer_id,
        "limit": balance.limit,
        "spent": balance.spent,
        "reserved": balance.reserved,
        "remaining": balance.remaining,
        "active_holds": balance.active_holds,
        "stripe_customer_id": balance.stripe_customer_id,
        "overdraft": balance.overdraft,
    }


def assert_balance_consistent(balance: pb.Balance, *, quiescent: bool = True) -> None:
    """What must hold for a Balance reply. GetBalance reads live counters, so while other calls (or the server's
    expiry reaper) are changing them, only the invariant is promised; once nothing is in flight, every identity."""
    b = counters(balance)
    assert b["limit"] >= 0 and b["spent"] >= 0 and b["reserved"] >= 0 and b["overdraft"] >= 0, b
    assert b["active_holds"] >= 0 and b["remaining"] >= 0, b
    assert b["spent"] + b["reserved"] <= b["limit"] + b["overdraft"], f"spent + reserved > limit + overdraft: {b}"
    if not quiescent:
        return
    assert b["remaining"] == max(0, b["limit"] - b["spent"] - b["reserved"]), f"remaining is wrong: {b}"
    # Every hold is for a positive amount, so units are reserved exactly when some hold is open.
    assert (b["reserved"] == 0) == (b["active_holds"] == 0), f"reserved and active_holds disagree: {b}"


def expect_rpc_error(
    code: grpc.StatusCode, call: Callable[..., Any], *args: Any, mentions: str | None = None, **kwargs: Any
) -> grpc.RpcError:
    """Call, expect a gRPC error with this status, and (if `mentions`) a message naming that field."""
    try:
        reply = call(*args, **kwargs)
    except grpc.RpcError as err:
        assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()!r}"
        details = err.details() or ""
        assert details.strip(), f"{code.name} must come with a message saying what was wrong"
        if mentions is not None:
            assert mentions in details, f"the {code.name} message should name {mentions!r}: {details!r}"
        return err
    raise AssertionError(f"expected {code.name}, got an OK reply: {reply!r}")


def wait_until(
    probe: Callable[[], T], accept: Callable[[T], bool], *, what: str, deadline_s: float = POLL_DEADLINE_S
) -> T:
    """Poll `probe` until `accept(value)`; a bounded wait, never a timing assertion."""
    end = time.monotonic() + deadline_s
    value = probe()
    while not accept(value):
        if time.monotonic() > end:
            raise AssertionError(f"gave up after {deadline_s} s waiting for {what}; last value: {value!r}")
        time.sleep(0.05)
        value = probe()
    return value


def now_ms() -> int:
    return int(time.time() * 1000)


def crash_and_restart(sidecar: Any) -> None:
    """kill -9 the server, then start it again on the same data dir."""
    sidecar.kill9()
    sidecar.restart()


def reservation_id_unknown_to(real_id: str) -> str:
    """A reservation_id in the same format as `real_id` that the server never handed out.

    Ids are `rsv_`, the data dir's instance id and the hold number, 16 hex digits each (the format the malformed-id
    message documents); the largest hold number is one the server would hand out only after 2**64 holds.
    """
    prefix, sep, digits = real_id.rpartition("_")
    assert sep and len(digits) == 32 and all(c in "0123456789abcdef" for c in digits), (
        f"unexpected reservation_id format {real_id!r}; update reservation_id_unknown_to()"
    )
    return f"{prefix}_{digits[:16]}{'f' * 16}"


class Tally:
    """Thread-safe record of what clients were told, for checking the books afterwards."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[str, int] = {}

    def add(self, key: str, amount: int) -> None:
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount

    def get(self, key: str) -> int:
        with self.lock:
            return self.values.get(key, 0)

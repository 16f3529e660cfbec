"""Budgets as policy, through a real sidecar process: prices from tokens, unknown models, orgs under 64 concurrent
clients, period roll-over across a kill -9, soft mode, the kill switch, the circuit breaker, and GetUsage adding up to
the ledger. Every number here is exact.

The sidecars run on a test price table (below), so that the expected figures do not move when the bundled prices do.
"""

from __future__ import annotations

import collections
import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from spendgate.store_reader import StoreReader
from spendgate.testing import Sidecar
from spendgate.v1 import spendgate_pb2 as pb
from tests.conftest import SidecarFactory
from tests.python.e2e._support import (
    LONG_TTL_MS,
    RPC_TIMEOUT_S,
    Conn,
    expect_rpc_error,
    model_prices,
    new_customer,
    now_ms,
    wait_until,
)

# $3 input, $0.30 cached input, $3.75 cache write, $15 output, $20 reasoning (per MTok), plus a 10 % markup.
PRICES = model_prices(markup_percent=10)


@pytest.fixture
def priced(sidecar_factory: SidecarFactory, tmp_path: Path) -> Sidecar:
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    return sidecar_factory("priced", extra_args=["--price-table", str(prices)])


def set_budget(conn: Conn, customer_id: str, **fields: object) -> pb.SetBudgetResponse:
    return conn.admin.SetBudget(pb.SetBudgetRequest(customer_id=customer_id, **fields), timeout=RPC_TIMEOUT_S)


def reserve(conn: Conn, customer_id: str, **fields: object) -> pb.ReserveResponse:
    request = pb.ReserveRequest(customer_id=customer_id, ttl_ms=LONG_TTL_MS, **fields)
    return conn.budget.Reserve(request, timeout=RPC_TIMEOUT_S)


def commit(conn: Conn, reservation_id: str, **fields: object) -> pb.CommitResponse:
    return conn.budget.Commit(pb.CommitRequest(reservation_id=reservation_id, **fields), timeout=RPC_TIMEOUT_S)


def usage(conn: Conn, customer_id: str, period: str = "") -> pb.Usage:
    return conn.budget.GetUsage(pb.GetUsageRequest(customer_id=customer_id, period=period), timeout=RPC_TIMEOUT_S)


def test_an_estimate_reserves_the_worst_case_and_usage_is_charged_exactly(priced: Sidecar) -> None:
    customer = new_customer()
    with Conn(priced.target) as conn:
        set_budget(conn, customer, limit=1_000_000)
        estimate = pb.TokenEstimate(model="test-model", input_tokens=1_000, max_output_tokens=500)
        hold = reserve(conn, customer, estimate=estimate)
        # Worst case: 1,000 input tokens at the dearest input rate ($3.75), 500 at the dearest output rate ($20):
        # 3,750 + 10,000 = 13,750 micro-USD, plus 10 % = 15,125.
        assert (hold.granted, hold.amount, hold.priced_model) == (True, 15_125, "test-model")
        used = pb.TokenUsage(
            input_tokens=400, cached_input_tokens=500, cache_write_tokens=100, output_tokens=300, reasoning_tokens=100
        )
        committed = commit(conn, hold.reservation_id, usage=used)
        # 1,200 + 150 (cached at $0.30, not at the input rate) + 375 + 4,500 + 2,000 = 8,225; x 1.1 = 9,047.5 -> 9,048
        # (rounded up once per call).
        assert committed.charged == 9_048
        parts = {part.token_type: (part.tokens, part.units) for part in committed.parts}
        assert set(parts) == {"input", "cached_input", "cache_write", "output", "reasoning"}
        assert sum(units for _, units in parts.values()) == 9_048
        assert parts["cached_input"] == (500, 165)
        assert conn.balance(customer).spent == 9_048


def test_a_cache_hit_charges_nothing(priced: Sidecar) -> None:
    customer = new_customer()
    with Conn(priced.target) as conn:
        set_budget(conn, customer, limit=1_000_000)
        hold = reserve(
            conn, customer, estimate=pb.TokenEstimate(model="test-model", input_tokens=10, max_output_tokens=10)
        )
        reply = commit(
            conn, hold.reservation_id, usage=pb.TokenUsage(input_tokens=10, output_tokens=10, cache_hit=True)
        )
        assert (reply.charged, list(reply.parts)) == (0, [])
        assert conn.balance(customer).spent == 0


def test_an_unknown_model_is_denied_and_holds_nothing(priced: Sidecar) -> None:
    customer = new_customer()
    with Conn(priced.target) as conn:
        set_budget(conn, customer, limit=1_000_000)
        denied = reserve(
            conn, customer, estimate=pb.TokenEstimate(model="gpt-nope", input_tokens=10, max_output_tokens=10)
        )
        assert (denied.granted, denied.reason) == (False, pb.DENY_REASON_UNKNOWN_MODEL)
        assert "gpt-nope" in denied.message
        balance = conn.balance(customer)
        assert (balance.reserved, balance.active_holds) == (0, 0)
        expect_rpc_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            reserve,
            conn,
            customer,
            amount=5,
            estimate=pb.TokenEstimate(model="test-model", input_tokens=1),
            mentions="not both",
        )


def test_64_clients_across_an_org_s_members_never_overspend_either_level(sidecar: Sidecar) -> None:
    org = new_customer("org")
    members = [new_customer("seat") for _ in range(4)]
    with Conn(sidecar.target) as conn:
        set_budget(conn, org, limit=1_000)
        for member in members:
            assert set_budget(conn, member, limit=400, parent_id=org).balance.parent_id == org
    granted: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    start = threading.Barrier(64)

    def client(index: int) -> None:
        member = members[index % 4]
        with Conn(sidecar.target) as own:
            start.wait()
            for _ in range(40):
                reply = own.reserve(member, 1, ttl_ms=LONG_TTL_MS)
                if reply.granted:
                    with lock:
                        granted[member] += 1
                else:
                    assert reply.reason == pb.DENY_REASON_INSUFFICIENT_BUDGET
                    assert reply.decided_by in (member, org)

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(client, range(64)))
    assert sum(granted.values()) == 1_000, granted  # the org's limit, used exactly
    assert all(count <= 400 for count in granted.values()), granted
    with Conn(sidecar.target) as conn:
        assert (conn.balance(org).reserved, conn.balance(org).active_holds) == (1_000, 1_000)
        for member in members:
            assert conn.balance(member).reserved == granted[member]


def test_a_period_rolls_over_keeps_its_history_and_survives_kill_9(sidecar: Sidecar) -> None:
    customer = new_customer()
    start_ms = now_ms()
    period = pb.Period(kind=pb.PERIOD_KIND_FIXED, start_ms=start_ms, end_ms=start_ms + 3_000)
    with Conn(sidecar.target) as conn:
        created = set_budget(conn, customer, limit=100, included=50, period=period)
        assert (created.balance.period_start_ms, created.balance.period_end_ms) == (start_ms, start_ms + 3_000)
        hold = conn.reserve(customer, 70, ttl_ms=LONG_TTL_MS)
        conn.commit(hold.reservation_id, 70)
        assert not conn.reserve(customer, 40).granted
    sidecar.kill9()
    sidecar.restart()
    with Conn(sidecar.target) as conn:
        rolled = wait_until(
            lambda: conn.balance(customer), lambda b: b.period_start_ms > start_ms, what="the period to roll over"
        )
        assert (rolled.spent, rolled.limit, rolled.included) == (0, 100, 50)
        assert rolled.period_end_ms - rolled.period_start_ms == 3_000
        hold = conn.reserve(customer, 40, ttl_ms=LONG_TTL_MS)
        assert hold.granted, "spend starts again in the new period"
        conn.commit(hold.reservation_id, 40)
        previous = usage(conn, customer, "previous")
        assert (previous.total, previous.current, previous.overage, previous.period_start_ms) == (
            70,
            False,
            20,
            start_ms,
        )
        current = usage(conn, customer)
        assert (current.total, current.current, current.included_remaining) == (40, True, 10)


def test_soft_mode_grants_past_the_limit_and_the_kill_switch_blocks_overage(sidecar: Sidecar) -> None:
    soft, blocked = new_customer("soft"), new_customer("blocked")
    with Conn(sidecar.target) as conn:
        set_budget(conn, soft, limit=100, mode=pb.ENFORCEMENT_MODE_SOFT)
        over = conn.reserve(soft, 150, ttl_ms=LONG_TTL_MS)
        assert (over.granted, over.over_limit, over.decided_by) == (True, True, soft)
        assert commit(conn, over.reservation_id, amount=150).over_limit
        set_budget(conn, blocked, limit=1_000, included=100, block_overage=True)
        assert conn.reserve(blocked, 100, ttl_ms=LONG_TTL_MS).granted
        denied = conn.reserve(blocked, 1)
        assert (denied.granted, denied.reason) == (False, pb.DENY_REASON_OVERAGE_BLOCKED)
        assert "block-overage" in denied.message
        set_budget(conn, blocked, block_overage=False)  # limit absent: unchanged
        assert conn.reserve(blocked, 1).granted
        assert conn.balance(blocked).limit == 1_000


def test_the_breaker_freezes_a_runaway_after_steady_use(sidecar_factory: SidecarFactory) -> None:
    # A 1.2 s "hour" and a 12 s trailing window, so that a runaway is seconds of real time.
    sidecar = sidecar_factory(
        "breaker",
        extra_args=["--breaker-multiplier", "10", "--breaker-recent-ms", "1200", "--breaker-window-ms", "12000"],
    )
    customer = new_customer()
    with Conn(sidecar.target) as conn:
        set_budget(conn, customer, limit=10**12)
        started = now_ms()
        while now_ms() - started < 4_000:  # steady: about 10 units every 25 ms
            hold = conn.reserve(customer, 10, ttl_ms=LONG_TTL_MS)
            assert not commit(conn, hold.reservation_id, amount=10).breaker_tripped, "steady use never trips"
            threading.Event().wait(0.025)
        runaway = conn.reserve(customer, 100_000, ttl_ms=LONG_TTL_MS)
        assert commit(conn, runaway.reservation_id, amount=100_000).breaker_tripped
        balance = conn.balance(customer)
        assert balance.frozen and "circuit breaker" in balance.frozen_reason, balance
        assert conn.reserve(customer, 1).reason == pb.DENY_REASON_FROZEN
        conn.admin.FreezeBudget(pb.FreezeBudgetRequest(customer_id=customer, frozen=False), timeout=RPC_TIMEOUT_S)
        assert conn.reserve(customer, 1).granted, "an operator can unfreeze it"


def test_get_usage_adds_up_to_the_ledger(priced: Sidecar) -> None:
    org, alice, bob = new_customer("org"), new_customer("alice"), new_customer("bob")
    with Conn(priced.target) as conn:
        set_budget(conn, org, limit=10**9)
        for member in (alice, bob):
            set_budget(conn, member, limit=10**9, parent_id=org)
        for n in range(30):
            member = (alice, bob)[n % 2]
            feature = ("chat", "search", "summarize")[n % 3]
            estimate = pb.TokenEstimate(model="test-model", input_tokens=100 + n, max_output_tokens=50)
            hold = reserve(conn, member, estimate=estimate, dimensions={"feature": feature})
            if n % 5 == 0:
                commit(conn, hold.reservation_id, amount=7 * n, dimensions={"action": f"a{n % 4}"})
            else:
                used = pb.TokenUsage(
                    input_tokens=90 + n, cached_input_tokens=n, output_tokens=40, reasoning_tokens=n % 3
                )
                commit(conn, hold.reservation_id, usage=used, dimensions={"action": f"a{n % 4}"})
        reports = {customer: usage(conn, customer) for customer in (org, alice, bob)}
    with StoreReader(priced.data_dir) as store:
        ledger = list(store.ledger())
    for customer, report in reports.items():
        mine = [
            e
            for e in ledger
            if customer in (e["customer_id"], e.get("parent"))
            and (e["period_start_ms"] if e["customer_id"] == customer else report.period_start_ms)
            == report.period_start_ms
        ]
        assert report.total == sum(e["amount"] for e in mine) and report.commits == len(mine)
        by_day = collections.Counter(
            dt.datetime.fromtimestamp(e["ts_ms"] / 1000, dt.UTC).date().isoformat()
            for e in mine
            for _ in range(e["amount"])
        )
        assert {d.date: d.units for d in report.daily if d.units} == dict(by_day)
        models: collections.Counter[tuple[str, str]] = collections.Counter()
        for entry in mine:
            for part in (entry.get("usage") or {}).get("parts", []):
                models[(part["token_type"], "tokens")] += part["tokens"]
                models[(part["token_type"], "units")] += part["units"]
        for row in report.by_model:
            assert row.model == "test-model"
            assert (row.tokens, row.units) == (models[(row.token_type, "tokens")], models[(row.token_type, "units")])
        dims: collections.Counter[tuple[str, str]] = collections.Counter()
        for entry in mine:
            labels = dict(entry.get("dimensions") or {})
            if entry["customer_id"] != customer:
                labels["member"] = entry["customer_id"]
            for key, value in labels.items():
                dims[(key, value)] += entry["amount"]
        assert {(d.key, d.value): d.units for d in report.by_dimension} == dict(dims)
    assert reports[org].total == reports[alice].total + reports[bob].total


def test_the_price_file_reloads_while_serving_on_change_and_on_sighup(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    import os
    import signal

    prices = tmp_path / "reloading.toml"
    prices.write_text(PRICES)
    sidecar = sidecar_factory(
        "reloading", extra_args=["--price-table", str(prices), "--price-reload-interval-ms", "50"]
    )
    customer = new_customer()
    estimate = pb.TokenEstimate(model="test-model", input_tokens=1_000, max_output_tokens=500)
    with Conn(sidecar.target) as conn:
        set_budget(conn, customer, limit=10**9)

        def priced_amount() -> int:
            hold = reserve(conn, customer, estimate=estimate)
            conn.release(hold.reservation_id)
            return hold.amount

        assert priced_amount() == 15_125
        prices.write_text(PRICES.replace('markup_percent = "10"', 'markup_percent = "0"'))
        wait_until(priced_amount, lambda amount: amount == 13_750, what="the changed file to be picked up")
        prices.write_text("this is [not TOML")
        os.kill(sidecar.pid, signal.SIGHUP)  # a bad file is logged; the table in force stays
        prices.write_text(PRICES.replace('markup_percent = "10"', 'markup_percent = "100"'))
        os.kill(sidecar.pid, signal.SIGHUP)
        wait_until(priced_amount, lambda amount: amount == 27_500, what="SIGHUP to reload the table")
        assert conn.ping() is not None


def test_an_operator_sets_and_removes_a_customers_stop_at_and_get_balance_shows_it(sidecar: Sidecar) -> None:
    customer = new_customer()
    with Conn(sidecar.target) as conn:
        set_reply = conn.admin.SetBudget(
            pb.SetBudgetRequest(customer_id=customer, limit=1_000, stop_at=300), timeout=RPC_TIMEOUT_S
        )
        assert set_reply.balance.stop_at == 300
        assert conn.balance(customer).stop_at == 300
        assert conn.reserve(customer, 300).granted
        denied = conn.reserve(customer, 1)
        assert not denied.granted and "stop-at" in denied.message, denied
        conn.admin.SetBudget(pb.SetBudgetRequest(customer_id=customer, stop_at=0), timeout=RPC_TIMEOUT_S)
        assert conn.balance(customer).stop_at == 0
        assert conn.reserve(customer, 700).granted, "without its stop-at the budget's limit is what binds"
        assert not conn.reserve(customer, 1).granted

"""Budget.Quote and Admin.GrantCredits through a real sidecar process (with app and admin tokens, and a test price
table): a Quote answers what the Reserve right after it does, for amounts and estimates, granted and denied, and
holds nothing; grants apply exactly once per key under concurrency and replays, survive a restart and a kill -9, and
show in GetUsage. Every number here is exact.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from spendgate.client import (
    AlreadyExists,
    AsyncClient,
    Client,
    Estimate,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from spendgate.testing import Sidecar
from spendgate.v1 import spendgate_pb2 as pb
from tests.conftest import SidecarFactory
from tests.python.e2e._support import LONG_TTL_MS, model_prices, new_customer

APP_TOKEN = "app-quote-0123456789abcdef012345"
ADMIN_TOKEN = "admin-quote-0123456789abcdef0123"
# Per MTok, no markup. The worst case of 1,000 input + 500 output tokens prices every input token at the dearest input
# rate (cache write, $3.75: 3,750 units) and every output token at the dearest output rate (reasoning, $20: 10,000).
PRICES = model_prices(markup_percent=0)
ESTIMATE = Estimate("test-model", input_tokens=1_000, max_output_tokens=500)
ESTIMATE_UNITS = 13_750
THREADS = 32


@pytest.fixture
def gate(sidecar_factory: SidecarFactory, tmp_path: Path) -> Sidecar:
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    return sidecar_factory(
        "gate", extra_args=["--price-table", str(prices), "--app-tokens", APP_TOKEN, "--admin-tokens", ADMIN_TOKEN]
    )


@pytest.fixture
def admin(gate: Sidecar) -> Iterator[Client]:
    with Client(gate.target, token=ADMIN_TOKEN) as client:
        yield client


@pytest.fixture
def app(gate: Sidecar) -> Iterator[Client]:
    with Client(gate.target, token=APP_TOKEN) as client:
        yield client


def books(client: Client, customer_id: str) -> dict[str, Any]:
    """What a call may change: the balance and the period's usage record."""
    balance, usage = client.balance(customer_id), client.usage(customer_id)
    return {
        "balance": (
            balance.limit,
            balance.spent,
            balance.reserved,
            balance.remaining,
            balance.active_holds,
            balance.overdraft,
            balance.credits,
        ),
        "usage": (usage.total, usage.commits, usage.credits_granted, usage.grants, usage.credits, usage.limit),
    }


def parts(message: pb.QuoteResponse | pb.ReserveResponse) -> list[tuple[str, int, int]]:
    return [(p.token_type, p.tokens, p.units) for p in message.parts]


# -- Quote ----------------------------------------------------------------------------------------------------------


def quote_then_reserve(
    app: Client, admin: Client, customer: str, **asked: Any
) -> tuple[pb.QuoteResponse, pb.ReserveResponse]:
    """Quote, check it changed nothing, then Reserve the same thing (released again if granted)."""
    before = books(admin, customer)
    quoted = app.quote(customer, **asked)
    assert books(admin, customer) == before, "a Quote must hold and change nothing"
    reserved = app.reserve_raw(customer, ttl_ms=LONG_TTL_MS, **asked)
    # What is available before the call (the lesser of the budget's and its org's), as the Reserve saw it.
    if not reserved.granted:
        assert quoted.remaining == reserved.remaining
    elif not reserved.over_limit:
        assert quoted.remaining - reserved.amount == reserved.remaining
    if reserved.granted:
        app.release(reserved.reservation_id)
    return quoted, reserved


def assert_same_answer(quoted: pb.QuoteResponse, reserved: pb.ReserveResponse) -> None:
    assert (quoted.granted, quoted.reason, quoted.message) == (reserved.granted, reserved.reason, reserved.message)
    assert (quoted.over_limit, quoted.decided_by) == (reserved.over_limit, reserved.decided_by)
    assert (quoted.priced_model, quoted.fallback_price) == (reserved.priced_model, reserved.fallback_price)
    if reserved.granted:
        assert quoted.amount == reserved.amount and parts(quoted) == parts(reserved)


def test_a_quote_answers_what_the_reserve_right_after_it_does(app: Client, admin: Client) -> None:
    customer = new_customer()
    admin.set_budget(customer, 20_000)

    quoted, reserved = quote_then_reserve(app, admin, customer, amount=500)
    assert_same_answer(quoted, reserved)
    assert (quoted.granted, quoted.amount, parts(quoted), quoted.remaining) == (True, 500, [], 20_000)

    quoted, reserved = quote_then_reserve(app, admin, customer, estimate=ESTIMATE)
    assert_same_answer(quoted, reserved)
    assert (quoted.granted, quoted.amount, quoted.priced_model) == (True, ESTIMATE_UNITS, "test-model")
    # The worst case per token type, summing to the amount.
    assert parts(quoted) == [("input", 1_000, 3_750), ("output", 500, 10_000)]

    quoted, reserved = quote_then_reserve(app, admin, customer, amount=20_001)
    assert_same_answer(quoted, reserved)
    assert (quoted.granted, quoted.reason) == (False, pb.DENY_REASON_INSUFFICIENT_BUDGET)
    assert "20001" in quoted.message.replace(",", "") or "20,001" in quoted.message, quoted.message

    quoted, reserved = quote_then_reserve(app, admin, customer, estimate=Estimate("no-such-model", 10, 10))
    assert_same_answer(quoted, reserved)
    assert (quoted.granted, quoted.reason) == (False, pb.DENY_REASON_UNKNOWN_MODEL)
    assert "no-such-model" in quoted.message

    admin.freeze(customer, True, "card declined")
    for asked in ({"amount": 500}, {"estimate": ESTIMATE}):
        quoted, reserved = quote_then_reserve(app, admin, customer, **asked)
        assert_same_answer(quoted, reserved)
        assert (quoted.granted, quoted.reason) == (False, pb.DENY_REASON_FROZEN)
        assert "frozen" in quoted.message
    admin.freeze(customer, False)

    # Soft mode: past the limit is granted, flagged over_limit, as the Reserve is.
    admin.set_budget(customer, mode="soft")
    quoted, reserved = quote_then_reserve(app, admin, customer, amount=25_000)
    assert_same_answer(quoted, reserved)
    assert (quoted.granted, quoted.over_limit) == (True, True)


def test_a_quote_is_decided_by_the_org_and_the_kill_switch_as_the_reserve_is(app: Client, admin: Client) -> None:
    org, member = new_customer("org"), new_customer("member")
    admin.set_budget(org, 1_000)
    admin.set_budget(member, 5_000, parent_id=org)
    quoted, reserved = quote_then_reserve(app, admin, member, amount=1_001)  # fits the member, not its org
    assert_same_answer(quoted, reserved)
    assert (quoted.granted, quoted.reason, quoted.decided_by) == (False, pb.DENY_REASON_INSUFFICIENT_BUDGET, org)
    assert quoted.remaining == 1_000  # the lesser of the member's and the org's

    capped = new_customer()
    admin.set_budget(capped, 10_000, included=2_000, block_overage=True)
    quoted, reserved = quote_then_reserve(app, admin, capped, amount=2_001)
    assert_same_answer(quoted, reserved)
    assert (quoted.granted, quoted.reason) == (False, pb.DENY_REASON_OVERAGE_BLOCKED)
    quoted, reserved = quote_then_reserve(app, admin, capped, amount=2_000)
    assert_same_answer(quoted, reserved)
    assert quoted.granted


def test_a_quote_of_what_an_open_hold_leaves_follows_the_hold(app: Client, admin: Client) -> None:
    customer = new_customer()
    admin.set_budget(customer, 20_000)
    with app.reserve(customer, 15_000, ttl_ms=LONG_TTL_MS) as hold:
        assert not app.quote(customer, estimate=ESTIMATE).granted  # 13,750 > 5,000 left
        assert app.quote(customer, 5_000).granted
        denied = app.reserve_raw(customer, estimate=ESTIMATE)
        assert (denied.granted, denied.reason) == (False, pb.DENY_REASON_INSUFFICIENT_BUDGET)
        hold.release()
    assert app.quote(customer, estimate=ESTIMATE).granted


def test_many_quotes_hold_nothing_and_the_whole_budget_stays_reservable(app: Client, admin: Client) -> None:
    customer = new_customer()
    admin.set_budget(customer, 12_000)
    before = books(admin, customer)
    with ThreadPoolExecutor(THREADS) as pool:
        replies = list(pool.map(lambda _: app.quote(customer, 12_000), range(THREADS * 4)))
    assert all(reply.granted and reply.amount == 12_000 and reply.remaining == 12_000 for reply in replies)
    assert books(admin, customer) == before
    hold = app.reserve_raw(customer, 12_000)
    assert hold.granted and hold.remaining == 0


def test_a_quote_with_bad_input_says_what_was_wrong(app: Client, admin: Client) -> None:
    customer = new_customer()
    admin.set_budget(customer, 1_000)
    with pytest.raises(NotFound):
        app.quote(new_customer(), 10)
    with pytest.raises(InvalidArgument, match="amount"):
        app.quote(customer, 0)
    with pytest.raises(InvalidArgument, match="amount"):
        app.quote(customer, -5)
    request = pb.QuoteRequest(customer_id=customer, amount=10)
    request.estimate.CopyFrom(pb.TokenEstimate(model="test-model", input_tokens=1, max_output_tokens=1))
    with pytest.raises(InvalidArgument, match="not both"):
        app._call(app._budget.Quote, request, retryable=False, timeout_s=None)


def test_the_async_client_quotes_too(gate: Sidecar, admin: Client) -> None:
    import asyncio

    customer = new_customer()
    admin.set_budget(customer, 20_000)

    async def body() -> pb.QuoteResponse:
        async with AsyncClient(gate.target, token=APP_TOKEN) as client:
            return await client.quote(customer, estimate=ESTIMATE)

    quoted = asyncio.run(body())
    assert (quoted.granted, quoted.amount, quoted.remaining) == (True, ESTIMATE_UNITS, 20_000)


# -- GrantCredits -----------------------------------------------------------------------------------------------------


def test_an_app_token_may_quote_but_never_grant(app: Client, admin: Client) -> None:
    customer = new_customer()
    admin.set_budget(customer, 100)
    before = books(admin, customer)
    with pytest.raises(PermissionDenied, match="admin_tokens"):
        app.grant_credits(customer, 50, "app-tries")
    assert books(admin, customer) == before
    assert admin.grant_credits(customer, 50, "app-tries").replayed is False  # the key was never used


def test_credits_raise_the_limit_and_show_in_balance_and_usage(app: Client, admin: Client) -> None:
    customer = new_customer()
    admin.set_budget(customer, 100)
    granted = admin.grant_credits(customer, 50, "purchase-1", "bought a pack")
    assert (granted.amount, granted.reason, granted.replayed) == (50, "bought a pack", False)
    assert (granted.limit_after, granted.credits_after) == (150, 50)
    assert (granted.balance.limit, granted.balance.credits, granted.balance.remaining) == (150, 50, 150)
    assert app.quote(customer, 150).granted and not app.quote(customer, 151).granted
    with app.reserve(customer, 130) as hold:
        hold.commit(130)
    usage = admin.usage(customer)
    # The credits stay in the period's limit (30 of them used: spend draws the configured limit first).
    assert (usage.total, usage.limit, usage.credits_granted, usage.grants, usage.credits) == (130, 150, 50, 1, 50)
    # SetBudget's limit is the limit without credits: changing it keeps them.
    updated = admin.set_budget(customer, 200)
    assert (updated.balance.limit, updated.balance.credits, updated.balance.remaining) == (250, 50, 120)


def test_concurrent_grants_with_distinct_keys_all_apply_exactly_once(admin: Client) -> None:
    customer = new_customer()
    admin.set_budget(customer, 1_000)
    amounts = {f"grant-{i}": 1 + i % 7 for i in range(THREADS * 4)}
    with ThreadPoolExecutor(THREADS) as pool:
        replies = list(pool.map(lambda key: admin.grant_credits(customer, amounts[key], key), amounts))
    assert not any(reply.replayed for reply in replies)
    total = sum(amounts.values())
    # Grants are applied one after another: in the order they were applied, each limit_after is the one before plus
    # that grant's amount, from 1,000 up to 1,000 plus them all (nothing lost, nothing counted twice).
    limit = 1_000
    for reply in sorted(replies, key=lambda r: r.limit_after):
        limit += reply.amount
        assert reply.limit_after == limit and reply.credits_after == limit - 1_000, reply
    assert limit == 1_000 + total
    balance = admin.balance(customer)
    assert (balance.limit, balance.credits) == (1_000 + total, total)
    usage = admin.usage(customer)
    assert (usage.credits_granted, usage.grants, usage.credits) == (total, len(amounts), total)


def test_replays_of_one_key_apply_once_concurrent_or_sequential(admin: Client) -> None:
    customer = new_customer()
    other = new_customer()
    admin.set_budget(customer, 1_000)
    admin.set_budget(other, 1_000)
    start = threading.Barrier(THREADS)

    def grant(_: int) -> pb.GrantCreditsResponse:
        start.wait()
        return admin.grant_credits(customer, 300, "invoice-in_123", "paid invoice")

    with ThreadPoolExecutor(THREADS) as pool:
        replies = list(pool.map(grant, range(THREADS)))
    assert sum(not reply.replayed for reply in replies) == 1
    answers = {(r.amount, r.reason, r.granted_ms, r.limit_after, r.credits_after) for r in replies}
    assert len(answers) == 1, answers
    again = admin.grant_credits(customer, 300, "invoice-in_123")
    assert again.replayed and (again.amount, again.reason, again.limit_after) == (300, "paid invoice", 1_300)
    before = books(admin, customer), books(admin, other)

    with pytest.raises(AlreadyExists) as caught:
        admin.grant_credits(customer, 301, "invoice-in_123")
    assert "invoice-in_123" in caught.value.message and "300" in caught.value.message
    assert "new key" in caught.value.message
    with pytest.raises(AlreadyExists):
        admin.grant_credits(other, 300, "invoice-in_123")
    assert (books(admin, customer), books(admin, other)) == before
    assert (admin.balance(customer).credits, admin.usage(customer).grants) == (300, 1)


def test_a_grant_with_bad_input_changes_nothing_and_says_how_to_fix_it(admin: Client) -> None:
    customer = new_customer()
    admin.set_budget(customer, 1_000)
    before = books(admin, customer)
    cases: list[tuple[Callable[[], Any], type[Exception], str]] = [
        (lambda: admin.grant_credits(customer, 10, ""), InvalidArgument, "idempotency_key is required"),
        (lambda: admin.grant_credits(customer, 0, "k-zero"), InvalidArgument, "amount"),
        (lambda: admin.grant_credits(customer, -3, "k-neg"), InvalidArgument, "amount"),
        (lambda: admin.grant_credits(customer, 2**53, "k-big"), InvalidArgument, "MAX_AMOUNT_UNITS"),
        (lambda: admin.grant_credits(customer, 10, "k" * 129), InvalidArgument, "idempotency_key"),
        (lambda: admin.grant_credits(customer, 10, "k-reason", "r" * 1025), InvalidArgument, "reason"),
        (lambda: admin.grant_credits(new_customer(), 10, "k-nobody"), NotFound, "budget"),
    ]
    for call, error, mentions in cases:
        with pytest.raises(error, match=mentions):
            call()
    assert books(admin, customer) == before
    # None of the refused keys was used up.
    assert not admin.grant_credits(customer, 1, "k-zero").replayed


def test_grants_survive_a_restart_and_a_kill_9(gate: Sidecar) -> None:
    customer = new_customer()
    with Client(gate.target, token=ADMIN_TOKEN) as admin:
        admin.set_budget(customer, 100)
        admin.grant_credits(customer, 40, "before-restart", "first pack")
    gate.restart()
    with Client(gate.target, token=ADMIN_TOKEN) as admin:
        replay = admin.grant_credits(customer, 40, "before-restart")
        assert (replay.replayed, replay.reason, replay.limit_after) == (True, "first pack", 140)
        acked = admin.grant_credits(customer, 25, "before-kill")
        assert not acked.replayed
    gate.kill9()
    gate.restart()
    with Client(gate.target, token=ADMIN_TOKEN) as admin:
        balance = admin.balance(customer)
        assert (balance.limit, balance.credits) == (165, 65)
        for key, amount in (("before-restart", 40), ("before-kill", 25)):
            assert admin.grant_credits(customer, amount, key).replayed
        with pytest.raises(AlreadyExists):
            admin.grant_credits(customer, 26, "before-kill")
        usage = admin.usage(customer)
        assert (usage.credits_granted, usage.grants, usage.credits, usage.limit, usage.total) == (65, 2, 65, 165, 0)
        assert admin.quote(customer, 165).granted and not admin.quote(customer, 166).granted

"""Token commits settled by Stripe's LLM token-billing convention, in-process: the real engine commits token usage
(engine.commit(..., usage=...)), the real settler sends through the real stripe SDK to the fake Stripe over HTTP, whose
token-billing meter groups by the dimensions model and token_type. And the dead-letter alerts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import stripe

from spendgate import _core
from spendgate.settle.aggregate import MeterEvent, parse_token_aggregate_claim
from spendgate.settle.settler import MAX_DEAD_LETTER_ALERTS_PER_CUSTOMER, SettleOptions, wall_ms
from spendgate.testing.fake_stripe import FakeStripe

from ._support import (
    CrashAfterSend,
    CrashBeforeSend,
    budget,
    commit,
    commit_tokens,
    engine_with_budgets,
    meter_event_posts,
    rounds,
    settle,
    token_usage,
)

UNITS, TOKENS = "spendgate_usage", "token-billing-tokens"
CUSTOMERS = ("cus_alpha", "cus_beta")
EVENT_PATHS = {"v1": "/v1/billing/meter_events", "v2": "/v2/billing/meter_event_stream"}


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[_core.Engine]:
    with engine_with_budgets(tmp_path / "data", CUSTOMERS) as engine:
        yield engine


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(customers=CUSTOMERS, same_host=True, seed=5) as fake:
        yield fake


def commit_mix(engine: _core.Engine) -> dict[tuple[str, str, str], int]:
    """Token commits of two models and a plain one; returns the tokens each (customer, model, token_type) must get."""
    commit_tokens(engine, "alpha", token_usage("gpt-6-sol", input=1200, cached_input=300, output=500, reasoning=250))
    commit_tokens(engine, "alpha", token_usage("gpt-6-sol", input=40, output=9))
    commit_tokens(engine, "beta", token_usage("claude-sonnet-5", input=70, cache_write=30, cached_input=20, output=5))
    commit(engine, "alpha", 17)  # plain units
    return {
        ("cus_alpha", "gpt-6-sol", "input"): 1240, ("cus_alpha", "gpt-6-sol", "cached_input"): 300,
        ("cus_alpha", "gpt-6-sol", "output"): 759,
        ("cus_beta", "claude-sonnet-5", "input"): 70, ("cus_beta", "claude-sonnet-5", "cached_write"): 30,
        ("cus_beta", "claude-sonnet-5", "cached_input"): 20, ("cus_beta", "claude-sonnet-5", "output"): 5,
    }  # fmt: skip


def grouped_summaries(fake: FakeStripe, customer: str) -> dict[tuple[str, str, str], int]:
    """What Stripe's token meter says per (customer, model, token_type): its event summaries, grouped by dimension."""
    client = fake.client()
    meter_id = fake.meter(TOKENS)["id"]
    now = int(fake.now())
    params: Any = {
        "customer": customer,
        "start_time": now - now % 60 - 86_400,
        "end_time": now - now % 60 + 120,
        "dimension_group_by_keys": ["model", "token_type"],
    }
    summaries = client.v1.billing.meters.event_summaries.list(meter_id, params).auto_paging_iter()
    found = {}
    for summary in summaries:
        dimensions = summary.to_dict()["dimensions"]
        found[(customer, dimensions["model"], dimensions["token_type"])] = int(summary.aggregated_value)
    return found


def token_totals(fake: FakeStripe) -> dict[tuple[str, str, str], int]:
    return {k: v for customer in CUSTOMERS for k, v in grouped_summaries(fake, customer).items() if v}


# -- the wire format ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_a_token_commit_is_one_event_per_token_type_with_model_and_token_type(
    engine: _core.Engine, fake: FakeStripe, transport: str
) -> None:
    expected = commit_mix(engine)
    entries = {e["identifier"]: e for e in engine.outbox_pending(100)}
    settle(engine, fake, transport=transport)

    assert token_totals(fake) == expected  # Stripe's own summaries, per customer, model and token type
    assert fake.totals_by_customer(UNITS) == {"cus_alpha": 17}  # the plain commit, as before
    first = next(e for e in entries.values() if e["usage"] and e["usage"]["parts"][0][1] == 1200)
    sent = {ev["identifier"]: ev for ev in fake.events() if ev["identifier"].startswith(first["identifier"])}
    assert {i: (ev["event_name"], ev["payload"], ev["timestamp"]) for i, ev in sent.items()} == {
        f"{first['identifier']}-{token_type}": (
            TOKENS,
            {"stripe_customer_id": "cus_alpha", "value": value, "model": "gpt-6-sol", "token_type": token_type},
            first["ts_ms"] // 1000,
        )  # the commit's time
        for token_type, value in (("input", "1200"), ("output", "750"), ("cached_input", "300"))
    }
    assert len(fake.events()) == 10 and fake.errors() == []  # 3 + 2 + 4 token events, 1 units event
    assert engine.outbox_stats()["depth"] == 0 and engine.dead_letters(10) == []


def test_a_cache_hit_is_acknowledged_without_a_call(engine: _core.Engine, fake: FakeStripe) -> None:
    commit(engine, "alpha", 0, usage={"model": "gpt-6-sol", "parts": [], "cache_hit": True, "fallback": False})
    settle(engine, fake)
    assert engine.outbox_stats()["depth"] == 0 and meter_event_posts(fake) == 0


def test_with_the_token_meter_off_token_commits_settle_as_units(engine: _core.Engine, fake: FakeStripe) -> None:
    commit_tokens(engine, "alpha", token_usage("gpt-6-sol", input=1000, output=100))  # 100 + 10 units
    settle(engine, fake, token_event_name="")
    assert fake.totals_by_customer(UNITS) == {"cus_alpha": 110} and fake.totals_by_customer(TOKENS) == {}


def test_the_token_meter_must_be_another_meter() -> None:
    with pytest.raises(ValueError, match="token counts and units on one meter would be added up"):
        SettleOptions(event_name="usage", token_event_name="usage")


# -- exactly once -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("transport", "window_ms"), [("v1", 0), ("v2", 0), ("v1", 1), ("v2", 1)])
@pytest.mark.parametrize("crash", [CrashAfterSend, CrashBeforeSend])
def test_a_crash_between_claim_and_ack_resends_the_same_token_events_and_stripe_counts_them_once(
    engine: _core.Engine, fake: FakeStripe, transport: str, window_ms: int, crash: type[CrashAfterSend]
) -> None:
    expected = commit_mix(engine)
    later = wall_ms() + 10  # every 1-ms window has closed
    rounds(engine, fake, transport=transport, aggregate_window_ms=window_ms, wrap=crash, clock_ms=lambda: later)
    claimed = engine.outbox_pending(100)
    assert len(claimed) == 4 and all(e["sent_as"] for e in claimed)  # claimed durably, not acknowledged
    first = fake.events()
    assert bool(first) == (crash is CrashAfterSend)

    settle(engine, fake, transport=transport, aggregate_window_ms=window_ms, clock_ms=lambda: later)
    assert token_totals(fake) == expected and fake.totals_by_customer(UNITS) == {"cus_alpha": 17}
    resent = fake.events()
    assert [ev["identifier"] for ev in resent[: len(first)]] == [ev["identifier"] for ev in first]
    if crash is CrashAfterSend and transport == "v1":
        assert fake.duplicates_rejected == len(first)  # every event went again, and Stripe dropped each
    assert engine.outbox_stats()["depth"] == 0 and engine.dead_letters(10) == []


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_an_entry_is_acknowledged_only_once_every_token_event_is_accepted(
    engine: _core.Engine, fake: FakeStripe, transport: str
) -> None:
    commit_tokens(engine, "alpha", token_usage("gpt-6-sol", input=100, output=20, cached_input=5))
    fake.fail_next("500", path=EVENT_PATHS[transport])  # the first request of the entry's events fails
    rounds(engine, fake, transport=transport, batch_size=1, max_attempts=1)
    (entry,) = engine.outbox_pending(10)
    assert entry["sent_as"] == f"{entry['identifier']}-tokens"
    assert len(fake.events()) == 2  # two of its three events are at Stripe, the entry waits for the third

    settle(engine, fake, transport=transport, batch_size=1)
    assert grouped_summaries(fake, "cus_alpha") == {
        ("cus_alpha", "gpt-6-sol", "input"): 100,
        ("cus_alpha", "gpt-6-sol", "output"): 20,
        ("cus_alpha", "gpt-6-sol", "cached_input"): 5,
    }
    assert len(fake.events()) == 3 and engine.outbox_stats()["depth"] == 0


def test_pre_aggregation_sums_tokens_per_customer_model_and_type_in_fewer_calls(
    engine: _core.Engine, fake: FakeStripe
) -> None:
    expected: dict[tuple[str, str, str], int] = {}
    for n in range(30):
        model = ("gpt-6-sol", "claude-sonnet-5")[n % 2]
        commit_tokens(engine, "alpha", token_usage(model, input=10 + n, output=n + 1))
        for token_type, tokens in (("input", 10 + n), ("output", n + 1)):
            key = ("cus_alpha", model, token_type)
            expected[key] = expected.get(key, 0) + tokens
    later = wall_ms() + 120_000
    settle(engine, fake, aggregate_window_ms=60_000, clock_ms=lambda: later)
    assert token_totals(fake) == expected
    assert fake.count_requests("/v1/billing/meter_events") <= 8  # 2 models x 2 types, in at most 2 windows
    claims = [ev["identifier"] for ev in fake.events()]
    assert all("-tagg" in identifier for identifier in claims if not identifier.endswith(("-input", "-output")))


def test_a_token_aggregate_claimed_before_a_crash_is_resent_whole_when_read_a_few_members_at_a_time(
    engine: _core.Engine, fake: FakeStripe
) -> None:
    for n in range(5):
        commit_tokens(engine, "alpha", token_usage("gpt-6-sol", input=100 * (n + 1), output=n + 1))
    later = wall_ms() + 120_000
    rounds(engine, fake, aggregate_window_ms=60_000, clock_ms=lambda: later, wrap=CrashBeforeSend)
    (claim,) = {e["sent_as"] for e in engine.outbox_pending(100)}
    parsed = parse_token_aggregate_claim(claim or "")
    assert parsed is not None and (parsed.count, parsed.tokens) == (5, (1500, 15, 0, 0))
    settle(engine, fake, aggregate_window_ms=60_000, clock_ms=lambda: later, batch_size=1, concurrency=2)
    assert grouped_summaries(fake, "cus_alpha") == {
        ("cus_alpha", "gpt-6-sol", "input"): 1500,
        ("cus_alpha", "gpt-6-sol", "output"): 15,
    }
    assert len(fake.events()) == 2 and engine.outbox_stats()["depth"] == 0


# -- refusals and dead letters ----------------------------------------------------------------------------------------


def test_without_a_token_meter_token_commits_are_dead_lettered_and_units_still_flow(engine: _core.Engine) -> None:
    with FakeStripe(customers=CUSTOMERS, same_host=True, meters=[UNITS]) as fake:
        commit_mix(engine)
        settle(engine, fake, transport="v2")  # the stream would accept them and fail later: the settler asks first
        assert fake.totals_by_customer() == {"cus_alpha": 17}
    letters = engine.dead_letters(10)
    assert len(letters) == 3 and all(letter["usage"] for letter in letters)
    assert all(
        "no active meter for event_name 'token-billing-tokens'" in letter["reason"]
        and "settle_token_event_name" in letter["reason"]
        for letter in letters
    )


def test_a_token_event_refused_after_another_was_accepted_says_so_in_the_dead_letter_and_the_alert(
    engine: _core.Engine, fake: FakeStripe
) -> None:
    commit_tokens(engine, "alpha", token_usage("gpt-6-sol", input=100, output=20))
    (entry,) = engine.outbox_pending(10)
    refused = f"{entry['identifier']}-output"

    class RefusesOutput(CrashAfterSend):
        def send(self, events: Sequence[MeterEvent]) -> None:
            if any(e.identifier == refused for e in events):
                raise stripe.InvalidRequestError(
                    "payload[token_type] is invalid.", "payload", code="parameter_invalid_string", http_status=400
                )
            self.inner.send(events)

    settle(engine, fake, wrap=RefusesOutput)
    (letter,) = engine.dead_letters(10)
    assert letter["seq"] == entry["seq"]
    assert letter["reason"].startswith(f"event {refused}: Stripe HTTP 400")
    assert f"Stripe accepted {entry['identifier']}-input" in letter["reason"]
    assert "check `spendgate reconcile` first" in letter["reason"]
    (alert,) = engine.alerts_after(0)
    assert (alert["kind"], alert["customer_id"], alert["message"]) == (
        "settlement_dead_letter",
        "alpha",
        letter["reason"],
    )
    assert alert["values"] == {"seq": entry["seq"], "amount": entry["amount"]}


def test_every_dead_lettered_entry_raises_an_alert_and_a_flood_raises_one_with_the_count(
    engine: _core.Engine, fake: FakeStripe
) -> None:
    budget(engine, "orphan", "cus_orphan")  # Stripe has no such customers: dead-lettered before any event is sent
    budget(engine, "stray", "cus_stray")
    flood = MAX_DEAD_LETTER_ALERTS_PER_CUSTOMER + 1
    for n in range(flood):
        commit(engine, "orphan", n + 1)
    commit(engine, "stray", 5)
    commit_tokens(engine, "stray", token_usage("gpt-6-sol", input=30))
    settle(engine, fake)
    assert engine.outbox_stats()["dead_letters"] == flood + 2 and meter_event_posts(fake) == 0

    alerts = engine.alerts_after(0)
    assert all(alert["kind"] == "settlement_dead_letter" for alert in alerts)
    (orphan,) = [alert for alert in alerts if alert["customer_id"] == "orphan"]
    seqs = sorted(letter["seq"] for letter in engine.dead_letters(1000) if letter["customer_id"] == "orphan")
    assert orphan["values"] == {
        "count": flood,
        "amount": flood * (flood + 1) // 2,
        "first_seq": seqs[0],
        "last_seq": seqs[-1],
    }
    assert orphan["message"].startswith(f"{flood} outbox entries") and "no customer 'cus_orphan'" in orphan["message"]
    stray = sorted(
        (alert["values"]["seq"], alert["values"]["amount"]) for alert in alerts if alert["customer_id"] == "stray"
    )
    assert stray == sorted(
        (letter["seq"], letter["amount"]) for letter in engine.dead_letters(1000) if letter["customer_id"] == "stray"
    )
    assert len(stray) == 2


def test_a_token_claim_cannot_be_resent_once_the_token_meter_is_turned_off(
    engine: _core.Engine, fake: FakeStripe
) -> None:
    commit_tokens(engine, "alpha", token_usage("gpt-6-sol", input=100))
    rounds(engine, fake, wrap=CrashAfterSend)  # sent to the token meter, not acknowledged
    settle(engine, fake, token_event_name="")
    (letter,) = engine.dead_letters(10)
    assert "settle_token_event_name is now empty" in letter["reason"]
    assert fake.totals_by_customer(UNITS) == {} and fake.totals_by_customer(TOKENS) == {"cus_alpha": 100}

"""Outbox entries -> meter events, and a claimed event rebuilt exactly as it was first sent."""

from __future__ import annotations

from typing import Any

from spendgate import _core
from spendgate.settle.aggregate import (
    MAX_CLAIM_BYTES,
    TOKEN_WIRE_TYPES,
    EventNames,
    TokenAggregateId,
    aggregate_identifier,
    claimed_events,
    event_identifiers,
    fresh_events,
    parse_aggregate_identifier,
    parse_token_aggregate_claim,
    token_aggregate_claim,
)
from spendgate.settle.rules import MAX_EVENT_VALUE

WINDOW = 1000
NAMES = EventNames("spendgate_usage", "token-billing-tokens")


def entry(
    seq: int,
    amount: int,
    ts_ms: int,
    *,
    customer: str = "cus_a",
    sent_as: str | None = None,
    first_attempt_ms: int | None = None,
    usage: Any = None,
) -> Any:
    """An outbox entry shaped as _core.OutboxEntry."""
    return {
        "seq": seq,
        "identifier": f"sg-rsv_{seq:016x}",
        "customer_id": customer.removeprefix("cus_"),
        "stripe_customer_id": customer,
        "amount": amount,
        "ts_ms": ts_ms,
        "sent_as": sent_as,
        "first_attempt_ms": first_attempt_ms,
        "attempts": 1 if sent_as else 0,
        "usage": usage,
    }


def test_without_a_window_each_entry_is_its_own_event_under_its_ledger_identifier() -> None:
    events = fresh_events([entry(1, 5, 100), entry(2, 7, 200, customer="cus_b")], 0, now_ms=10_000, names=NAMES)
    assert [(e.identifier, e.value, e.ts_ms, e.seqs, e.claimed) for e in events] == [
        ("sg-rsv_0000000000000001", 5, 100, (1,), False),
        ("sg-rsv_0000000000000002", 7, 200, (2,), False),
    ]


def test_a_window_sums_a_customers_entries_stamped_with_the_latest_time() -> None:
    entries = [entry(1, 5, 1100), entry(2, 7, 1900), entry(3, 1, 1500, customer="cus_b"), entry(4, 2, 2100)]
    events = {e.identifier: e for e in fresh_events(entries, WINDOW, now_ms=3000, names=NAMES)}
    aggregate = events[aggregate_identifier("sg-rsv_0000000000000001", 2, 12, 1900)]
    assert (aggregate.value, aggregate.ts_ms, aggregate.seqs, aggregate.stripe_customer_id) == (
        12,
        1900,
        (1, 2),
        "cus_a",
    )
    assert events["sg-rsv_0000000000000003"].value == 1  # alone in its window: its own identifier
    assert events["sg-rsv_0000000000000004"].seqs == (4,)


def test_an_open_window_waits() -> None:
    entries = [entry(1, 5, 1100), entry(2, 7, 2100)]
    assert [e.seqs for e in fresh_events(entries, WINDOW, now_ms=2999, names=NAMES)] == [(1,)]
    assert fresh_events(entries, WINDOW, now_ms=1999, names=NAMES) == []


def test_an_aggregate_never_exceeds_stripes_largest_value() -> None:
    big = MAX_EVENT_VALUE // 2 + 1
    entries = [entry(1, big, 1000), entry(2, big, 1001), entry(3, 1, 1002)]
    events = fresh_events(entries, WINDOW, now_ms=5000, names=NAMES)
    assert sorted(e.value for e in events) == [big, big + 1]


def test_the_identifier_records_the_event() -> None:
    identifier = aggregate_identifier("sg-rsv_00000000000000ff-requeue2", 3, 12345, 1_700_000_000_123)
    assert len(identifier) <= 100
    parsed = parse_aggregate_identifier(identifier)
    assert parsed is not None
    assert (parsed.base, parsed.count, parsed.value, parsed.ts_ms) == (
        "sg-rsv_00000000000000ff-requeue2",
        3,
        12345,
        1_700_000_000_123,
    )
    assert parse_aggregate_identifier("sg-rsv_00000000000000ff") is None


def test_a_claimed_aggregate_is_rebuilt_from_its_identifier_even_with_members_missing() -> None:
    identifier = aggregate_identifier("sg-rsv_0000000000000001", 3, 20, 1900)
    # Only two of the three members are in this batch: the event is still the one first sent.
    entries = [
        entry(1, 5, 1100, sent_as=identifier, first_attempt_ms=50),
        entry(3, 8, 1900, sent_as=identifier, first_attempt_ms=40),
        entry(9, 1, 5000),
    ]
    (event,) = claimed_events(entries, NAMES)
    assert (event.identifier, event.value, event.ts_ms, event.seqs) == (identifier, 20, 1900, (1, 3))
    assert event.claimed and event.first_attempt_ms == 40


def test_a_claimed_single_entry_is_resent_under_its_claim() -> None:
    (event,) = claimed_events([entry(4, 6, 1234, sent_as="sg-rsv_0000000000000004", first_attempt_ms=99)], NAMES)
    assert (event.identifier, event.value, event.ts_ms, event.claimed) == ("sg-rsv_0000000000000004", 6, 1234, True)
    assert fresh_events([entry(4, 6, 1234, sent_as="sg-rsv_0000000000000004")], 0, now_ms=0, names=NAMES) == []


# -- token usage: Stripe's LLM token-billing convention -------------------------------------------------------------

TOKENS = "token-billing-tokens"


def usage(model: str = "gpt-6-sol", **tokens: int) -> Any:
    """A UsageDetail; units are 1 per token type with tokens (the settler sends tokens, not units)."""
    return {"model": model, "parts": [(t, n, 1) for t, n in tokens.items()], "cache_hit": False, "fallback": False}


def wire(events: list[Any]) -> list[tuple[str, str, int, dict[str, str], str]]:
    return [(e.identifier, e.event_name, e.value, dict(e.dimensions), e.claim_id) for e in events]


def test_a_token_entry_is_one_event_per_token_type_with_reasoning_billed_as_output() -> None:
    detail = usage(input=1200, cached_input=300, cache_write=40, output=500, reasoning=250)
    events = fresh_events([entry(7, 5, 4242, usage=detail)], 0, now_ms=10_000, names=NAMES)
    base = "sg-rsv_0000000000000007"
    assert wire(events) == [
        (f"{base}-input", TOKENS, 1200, {"model": "gpt-6-sol", "token_type": "input"}, f"{base}-tokens"),
        (f"{base}-output", TOKENS, 750, {"model": "gpt-6-sol", "token_type": "output"}, f"{base}-tokens"),
        (f"{base}-cached_input", TOKENS, 300, {"model": "gpt-6-sol", "token_type": "cached_input"}, f"{base}-tokens"),
        (f"{base}-cached_write", TOKENS, 40, {"model": "gpt-6-sol", "token_type": "cached_write"}, f"{base}-tokens"),
    ]
    assert all(e.ts_ms == 4242 and e.seqs == (7,) and not e.claimed for e in events)


def test_only_token_types_with_tokens_go_out() -> None:
    events = fresh_events([entry(1, 5, 100, usage=usage(input=10, output=0, reasoning=0))], 0, now_ms=1, names=NAMES)
    assert [e.identifier for e in events] == ["sg-rsv_0000000000000001-input"]


def test_a_cache_hit_has_no_tokens_and_settles_as_a_zero_units_event() -> None:
    hit = {"model": "gpt-6-sol", "parts": [], "cache_hit": True, "fallback": False}
    (event,) = fresh_events([entry(3, 0, 100, usage=hit)], 0, now_ms=1, names=NAMES)
    assert (event.identifier, event.event_name, event.value) == ("sg-rsv_0000000000000003", "spendgate_usage", 0)


def test_with_the_token_meter_off_token_usage_settles_as_units() -> None:
    (event,) = fresh_events(
        [entry(3, 9, 100, usage=usage(input=10))], 0, now_ms=1, names=EventNames("spendgate_usage", "")
    )
    assert (event.identifier, event.event_name, event.value, event.dimensions) == (
        "sg-rsv_0000000000000003",
        "spendgate_usage",
        9,
        (),
    )


def test_a_claimed_token_entry_is_rebuilt_exactly_as_first_sent() -> None:
    detail = usage(input=10, output=3, reasoning=2, cached_input=4)
    fresh = fresh_events([entry(5, 5, 777, usage=detail)], 0, now_ms=1000, names=NAMES)
    claimed = claimed_events([entry(5, 5, 777, usage=detail, sent_as=fresh[0].claim_id, first_attempt_ms=9)], NAMES)
    assert wire(claimed) == wire(fresh) and [e.ts_ms for e in claimed] == [777] * 3
    assert all(e.claimed and e.first_attempt_ms == 9 for e in claimed)


def test_a_token_entry_claimed_before_token_events_existed_is_resent_as_its_one_units_event() -> None:
    # An older settler claimed it under its bare identifier and may have sent it as units: resend exactly that.
    old = entry(5, 42, 777, usage=usage(input=10), sent_as="sg-rsv_0000000000000005", first_attempt_ms=9)
    (event,) = claimed_events([old], NAMES)
    assert (event.identifier, event.event_name, event.value, event.dimensions) == (
        "sg-rsv_0000000000000005",
        "spendgate_usage",
        42,
        (),
    )


def test_a_claimed_token_entry_with_the_token_meter_turned_off_keeps_its_token_events() -> None:
    claimed = entry(5, 5, 777, usage=usage(input=10), sent_as="sg-rsv_0000000000000005-tokens", first_attempt_ms=9)
    (event,) = claimed_events([claimed], EventNames("spendgate_usage", ""))
    assert (event.identifier, event.event_name) == ("sg-rsv_0000000000000005-input", "")  # the settler refuses it


def test_a_window_sums_tokens_per_customer_model_and_type() -> None:
    entries = [
        entry(1, 5, 1100, usage=usage(input=100, output=10)),
        entry(2, 5, 1200, usage=usage(input=50, reasoning=5, cache_write=7)),
        entry(3, 5, 1300, usage=usage("claude-sonnet-5", input=9)),
        entry(4, 4, 1400),  # plain units: its own meter
        entry(5, 5, 1500, customer="cus_b", usage=usage(input=1)),
    ]
    events = fresh_events(entries, WINDOW, now_ms=2000, names=NAMES)
    by_claim: dict[str, list[Any]] = {}
    for event in events:
        by_claim.setdefault(event.claim_id, []).append(event)
    first = "sg-rsv_0000000000000001"
    aggregate = by_claim[f"{first}-tagg2x150.15.0.7@1200"]
    assert wire(aggregate) == [
        (f"{first}-tagg2-input", TOKENS, 150, {"model": "gpt-6-sol", "token_type": "input"}, aggregate[0].claim_id),
        (f"{first}-tagg2-output", TOKENS, 15, {"model": "gpt-6-sol", "token_type": "output"}, aggregate[0].claim_id),
        (
            f"{first}-tagg2-cached_write",
            TOKENS,
            7,
            {"model": "gpt-6-sol", "token_type": "cached_write"},
            aggregate[0].claim_id,
        ),
    ]
    assert all(e.seqs == (1, 2) and e.ts_ms == 1200 for e in aggregate)
    assert [e.identifier for e in by_claim["sg-rsv_0000000000000003-tokens"]] == ["sg-rsv_0000000000000003-input"]
    assert [e.value for e in by_claim["sg-rsv_0000000000000004"]] == [4]
    assert [e.seqs for e in by_claim["sg-rsv_0000000000000005-tokens"]] == [(5,)]


def test_a_claimed_token_aggregate_is_rebuilt_from_its_claim_even_with_members_missing() -> None:
    entries = [entry(n, 1, 1000 + n, usage=usage(input=10 * n, output=n)) for n in (1, 2, 3)]
    fresh = fresh_events(entries, WINDOW, now_ms=5000, names=NAMES)
    claim = fresh[0].claim_id
    assert parse_token_aggregate_claim(claim) == TokenAggregateId("sg-rsv_0000000000000001", 3, (60, 6, 0, 0), 1003)
    # Only the second member is in this batch: the events are still the ones first sent.
    claimed = claimed_events([{**entries[1], "sent_as": claim, "first_attempt_ms": 5}], NAMES)
    assert wire(claimed) == wire(fresh) and [e.seqs for e in claimed] == [(2,), (2,)]
    assert [e.ts_ms for e in claimed] == [1003, 1003]


def test_a_token_aggregate_never_exceeds_stripes_largest_value_nor_the_engines_id_length() -> None:
    big = MAX_EVENT_VALUE // 2 + 1
    entries = [entry(n, 1, 1000, usage=usage(input=big, output=big, cached_input=big, cache_write=big)) for n in (1, 2)]
    events = fresh_events(entries + [entry(3, 1, 1000, usage=usage(input=1))], WINDOW, now_ms=5000, names=NAMES)
    assert max(e.value for e in events) <= MAX_EVENT_VALUE
    assert {e.seqs for e in events} == {(1,), (2, 3)}
    # The longest claim there can be: a requeued first member, the most members a round reads, 15-digit sums.
    longest = token_aggregate_claim(
        "sg-rsv_ffffffffffffffff-requeue999", 10_000, [MAX_EVENT_VALUE] * 4, 253_402_214_400_000
    )
    assert len(longest.encode()) <= MAX_CLAIM_BYTES == _core.MAX_ID_BYTES
    assert max(len(f"sg-rsv_ffffffffffffffff-requeue999-tagg10000-{t}") for t in TOKEN_WIRE_TYPES) <= 100


def test_event_identifiers_name_each_entrys_events_as_the_claim_builds_them() -> None:
    """The audit trail's identifiers (from an entry's claim alone) are those of the events the settler sends."""
    usage = {"model": "m", "parts": [("input", 50, 5), ("reasoning", 3, 1)], "cache_hit": False, "fallback": False}
    no_output = {"model": "m", "parts": [("input", 7, 1)], "cache_hit": False, "fallback": False}
    entries = [
        entry(1, 5, 1100),
        entry(2, 7, 1200),
        entry(3, 6, 1300, usage=usage),
        entry(4, 1, 1400, usage=no_output),
        entry(5, 2, 1500, customer="cus_b"),
        entry(6, 6, 1600, customer="cus_b", usage=usage),
    ]
    for window in (0, WINDOW):
        events = fresh_events(entries, window, now_ms=5000, names=NAMES)
        for one in entries:
            carrying = [e for e in events if one["seq"] in e.seqs]
            assert carrying, one
            claim = carrying[0].claim_id
            assert sorted(event_identifiers(claim, one["usage"])) == sorted(e.identifier for e in carrying), window
    assert event_identifiers(None, None) == [] and event_identifiers("", usage) == []  # type: ignore[arg-type]

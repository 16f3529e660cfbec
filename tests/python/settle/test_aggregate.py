"""Outbox entries -> meter events, and a claimed event rebuilt exactly as it was first sent."""

from __future__ import annotations

from typing import Any

from spendgate.settle.aggregate import (
    aggregate_identifier,
    claimed_events,
    fresh_events,
    parse_aggregate_identifier,
)
from spendgate.settle.rules import MAX_EVENT_VALUE

WINDOW = 1000


def entry(seq: int, amount: int, ts_ms: int, *, customer: str = "cus_a", sent_as: str | None = None,
          first_attempt_ms: int | None = None) -> Any:
    return {"seq": seq, "identifier": f"sg-rsv_{seq:016x}", "customer_id": customer.removeprefix("cus_"),
            "stripe_customer_id": customer, "amount": amount, "ts_ms": ts_ms, "sent_as": sent_as,
            "first_attempt_ms": first_attempt_ms, "attempts": 1 if sent_as else 0}


def test_without_a_window_each_entry_is_its_own_event_under_its_ledger_identifier() -> None:
    events = fresh_events([entry(1, 5, 100), entry(2, 7, 200, customer="cus_b")], 0, now_ms=10_000)
    assert [(e.identifier, e.value, e.ts_ms, e.seqs, e.claimed) for e in events] == [
        ("sg-rsv_0000000000000001", 5, 100, (1,), False),
        ("sg-rsv_0000000000000002", 7, 200, (2,), False),
    ]


def test_a_window_sums_a_customers_entries_stamped_with_the_latest_time() -> None:
    entries = [entry(1, 5, 1100), entry(2, 7, 1900), entry(3, 1, 1500, customer="cus_b"), entry(4, 2, 2100)]
    events = {e.identifier: e for e in fresh_events(entries, WINDOW, now_ms=3000)}
    aggregate = events[aggregate_identifier("sg-rsv_0000000000000001", 2, 12, 1900)]
    assert (aggregate.value, aggregate.ts_ms, aggregate.seqs, aggregate.stripe_customer_id) == (12, 1900, (1, 2), "cus_a")
    assert events["sg-rsv_0000000000000003"].value == 1  # alone in its window: its own identifier
    assert events["sg-rsv_0000000000000004"].seqs == (4,)


def test_an_open_window_waits() -> None:
    entries = [entry(1, 5, 1100), entry(2, 7, 2100)]
    assert [e.seqs for e in fresh_events(entries, WINDOW, now_ms=2999)] == [(1,)]
    assert fresh_events(entries, WINDOW, now_ms=1999) == []


def test_an_aggregate_never_exceeds_stripes_largest_value() -> None:
    big = MAX_EVENT_VALUE // 2 + 1
    events = fresh_events([entry(1, big, 1000), entry(2, big, 1001), entry(3, 1, 1002)], WINDOW, now_ms=5000)
    assert sorted(e.value for e in events) == [big, big + 1]


def test_the_identifier_records_the_event() -> None:
    identifier = aggregate_identifier("sg-rsv_00000000000000ff-requeue2", 3, 12345, 1_700_000_000_123)
    assert len(identifier) <= 100
    parsed = parse_aggregate_identifier(identifier)
    assert parsed is not None
    assert (parsed.base, parsed.count, parsed.value, parsed.ts_ms) == ("sg-rsv_00000000000000ff-requeue2", 3, 12345,
                                                                       1_700_000_000_123)
    assert parse_aggregate_identifier("sg-rsv_00000000000000ff") is None


def test_a_claimed_aggregate_is_rebuilt_from_its_identifier_even_with_members_missing() -> None:
    identifier = aggregate_identifier("sg-rsv_0000000000000001", 3, 20, 1900)
    # Only two of the three members are in this batch: the event is still the one first sent.
    entries = [entry(1, 5, 1100, sent_as=identifier, first_attempt_ms=50),
               entry(3, 8, 1900, sent_as=identifier, first_attempt_ms=40), entry(9, 1, 5000)]
    (event,) = claimed_events(entries)
    assert (event.identifier, event.value, event.ts_ms, event.seqs) == (identifier, 20, 1900, (1, 3))
    assert event.claimed and event.first_attempt_ms == 40


def test_a_claimed_single_entry_is_resent_under_its_claim() -> None:
    (event,) = claimed_events([entry(4, 6, 1234, sent_as="sg-rsv_0000000000000004", first_attempt_ms=99)])
    assert (event.identifier, event.value, event.ts_ms, event.claimed) == ("sg-rsv_0000000000000004", 6, 1234, True)
    assert fresh_events([entry(4, 6, 1234, sent_as="sg-rsv_0000000000000004")], 0, now_ms=0) == []

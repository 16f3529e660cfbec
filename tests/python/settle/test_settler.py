"""The settler in-process: a real engine (LMDB in tmp_path), the real stripe SDK, the fake Stripe over HTTP."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import stripe

from spendgate import _core
from spendgate.server.durability import DurabilityWaiter
from spendgate.settle import rules
from spendgate.settle.aggregate import MeterEvent, parse_aggregate_identifier
from spendgate.settle.settler import Transport, wall_ms
from spendgate.testing.fake_stripe import FakeStripe

from ._support import (
    HANG_GUARD_S,
    CrashAfterSend,
    CrashBeforeSend,
    budget,
    commit,
    engine_with_budgets,
    make_settler,
    meter_event_posts,
    rounds,
    run_async,
    settle,
)

CUSTOMERS = ("cus_alpha", "cus_beta", "cus_gamma")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[_core.Engine]:
    with engine_with_budgets(tmp_path / "data", CUSTOMERS) as engine:
        yield engine


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(customers=CUSTOMERS, same_host=True, seed=3) as fake:
        yield fake


def commit_some(engine: _core.Engine, n: int, *, customers: Sequence[str] = CUSTOMERS) -> dict[str, int]:
    """n commits spread over the customers; returns the committed units by Stripe customer."""
    totals: dict[str, int] = {}
    for i in range(n):
        customer = customers[i % len(customers)]
        amount = 1 + (i * 7) % 13
        commit(engine, customer.removeprefix("cus_"), amount)
        totals[customer] = totals.get(customer, 0) + amount
    return totals


# -- delivery -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_every_entry_reaches_stripe_once_with_its_ledger_identifier_and_commit_time(
    engine: _core.Engine, fake: FakeStripe, transport: str
) -> None:
    totals = commit_some(engine, 30)
    pending = {e["identifier"]: e for e in engine.outbox_pending(100)}
    settle(engine, fake, transport=transport)
    assert fake.totals_by_customer() == totals
    events = fake.events()
    assert len(events) == 30 and {ev["identifier"] for ev in events} == set(pending)
    for ev in events:
        entry = pending[ev["identifier"]]
        assert ev["timestamp"] == entry["ts_ms"] // 1000  # the commit's time, not the send's
        assert ev["payload"] == {"stripe_customer_id": entry["stripe_customer_id"], "value": str(entry["amount"])}
        assert ev["event_name"] == "spendgate_usage"
    assert engine.outbox_stats()["depth"] == 0 and engine.dead_letters(10) == []


def test_v2_sends_at_most_batch_size_events_per_request(engine: _core.Engine, fake: FakeStripe) -> None:
    totals = commit_some(engine, 25)
    settle(engine, fake, transport="v2", batch_size=10)
    assert fake.totals_by_customer() == totals
    assert fake.count_requests("/v2/billing/meter_event_stream") == 3
    assert fake.count_requests("/v2/billing/meter_event_session") == 1


def test_sdk_calls_run_in_the_settlers_threads_not_on_the_event_loop(engine: _core.Engine, fake: FakeStripe) -> None:
    commit_some(engine, 3)
    threads: list[str] = []

    class Recording(CrashAfterSend):
        def send(self, events: Sequence[MeterEvent]) -> None:
            threads.append(threading.current_thread().name)
            self.inner.send(events)

    settle(engine, fake, wrap=Recording)
    assert threads and all(name.startswith("spendgate-settle-") for name in threads)


def test_zero_amounts_are_acknowledged_without_a_call(engine: _core.Engine, fake: FakeStripe) -> None:
    commit(engine, "alpha", 0)
    settle(engine, fake)
    assert engine.outbox_stats()["depth"] == 0 and meter_event_posts(fake) == 0


# -- crashes and faults ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("transport", "window_ms"), [("v1", 0), ("v2", 0), ("v1", 1)])
def test_a_crash_after_the_send_resends_the_same_event_and_stripe_counts_it_once(
    engine: _core.Engine, fake: FakeStripe, transport: str, window_ms: int
) -> None:
    totals = commit_some(engine, 12)
    later = wall_ms() + 10  # every 1-ms window has closed
    rounds(
        engine, fake, transport=transport, aggregate_window_ms=window_ms, wrap=CrashAfterSend, clock_ms=lambda: later
    )
    first = fake.events()
    assert sum(ev["value"] for ev in first) == sum(totals.values())  # recorded at Stripe ...
    claimed = engine.outbox_pending(100)
    assert len(claimed) == 12 and all(e["sent_as"] for e in claimed)  # ... but not acknowledged here

    settle(engine, fake, transport=transport, aggregate_window_ms=window_ms, clock_ms=lambda: later)
    assert fake.totals_by_customer() == totals
    assert fake.duplicates_rejected == len(first) or transport == "v2"  # v2 drops duplicates silently
    assert [ev["identifier"] for ev in fake.events()] == [ev["identifier"] for ev in first]
    assert engine.outbox_stats()["depth"] == 0


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_faults_before_and_after_recording_lose_nothing_and_count_nothing_twice(
    engine: _core.Engine, fake: FakeStripe, transport: str
) -> None:
    totals = commit_some(engine, 60)
    fake.set_faults(rate_429=0.2, rate_500=0.1, fail_after_record_rate=0.2, seed=11)
    for kind in ("500_after_record", "drop_after_record", "reset", "429_lock_timeout", "503"):
        fake.fail_next(kind, 2)
    settle(engine, fake, transport=transport, batch_size=7, max_attempts=3)
    assert fake.totals_by_customer() == totals
    assert engine.outbox_stats() == {"depth": 0, "oldest_ts_ms": None, "dead_letters": 0, "max_entries": 10_000_000}


def test_should_retry_false_is_not_retried_at_once(engine: _core.Engine, fake: FakeStripe) -> None:
    commit(engine, "alpha", 5)
    fake.fail_next("500_after_record")
    settler = rounds(engine, fake, max_attempts=5)
    assert fake.count_requests("/v1/billing/meter_events") == 1  # recorded, 500, Stripe-Should-Retry: false
    assert "HTTP 500" in settler.status.last_error
    settle(engine, fake)
    assert fake.totals_by_customer() == {"cus_alpha": 5} and fake.duplicates_rejected == 1


def test_a_bad_api_key_stalls_settlement_and_dead_letters_nothing(engine: _core.Engine) -> None:
    commit(engine, "alpha", 5)
    with FakeStripe(customers=CUSTOMERS, api_keys=["sk_test_right"]) as fake:
        settler = rounds(engine, fake, 3, api_key="sk_test_wrong")
    assert engine.outbox_stats()["depth"] == 1 and engine.dead_letters(10) == []
    assert "HTTP 401" in settler.status.last_error and "STRIPE_API_KEY" in settler.status.last_error


# -- dead letters ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_an_unknown_meter_dead_letters_with_the_reason(engine: _core.Engine, fake: FakeStripe, transport: str) -> None:
    commit_some(engine, 4)
    settle(engine, fake, transport=transport, event_name="no_such_meter")
    letters = engine.dead_letters(10)
    assert len(letters) == 4 and fake.events() == []
    reason = letters[0]["reason"]
    if transport == "v1":  # Stripe refuses it synchronously: its message
        assert 'No active meter found for event name "no_such_meter"' in reason
    else:  # the stream would accept it and fail later: the settler asks first
        assert "no active meter for event_name 'no_such_meter'" in reason


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_a_bad_customer_is_dead_lettered_and_the_others_flow_then_a_requeue_delivers_once(
    engine: _core.Engine, fake: FakeStripe, transport: str
) -> None:
    budget(engine, "stranger", "cus_stranger")  # not a customer of this Stripe account
    commit_some(engine, 9)
    commit(engine, "stranger", 40)  # in the middle of the others
    commit_some(engine, 3)
    totals = {
        c: sum(e["amount"] for e in engine.outbox_pending(100) if e["stripe_customer_id"] == c) for c in CUSTOMERS
    }
    settle(engine, fake, transport=transport)
    assert fake.totals_by_customer() == totals  # nobody else waited for the bad one
    (letter,) = engine.dead_letters(10)
    assert letter["stripe_customer_id"] == "cus_stranger" and letter["amount"] == 40
    assert "Stripe has no customer 'cus_stranger'" in letter["reason"] and "requeue" in letter["reason"]

    fake.add_customer("cus_stranger")  # the fix
    engine.wait_durable(engine.dead_letter_requeue(letter["seq"]))
    settle(engine, fake, transport=transport)
    assert fake.totals_by_customer() == totals | {"cus_stranger": 40}
    assert engine.dead_letters(10) == [] and engine.outbox_stats()["depth"] == 0


def test_a_refusal_inside_a_v2_batch_is_bisected_to_the_one_event(engine: _core.Engine, fake: FakeStripe) -> None:
    totals = commit_some(engine, 20)
    bad = engine.outbox_pending(100)[13]

    class RefusesOne(CrashAfterSend):
        def send(self, events: Sequence[MeterEvent]) -> None:
            if any(e.identifier == bad["identifier"] for e in events):
                raise stripe.InvalidRequestError(
                    "events[3].payload is invalid.", "events", code="invalid_fields", http_status=400
                )
            self.inner.send(events)

    settle(engine, fake, transport="v2", batch_size=10, wrap=RefusesOne)
    (letter,) = engine.dead_letters(10)
    assert letter["seq"] == bad["seq"] and "invalid_fields" in letter["reason"]
    totals[bad["stripe_customer_id"]] -= bad["amount"]
    assert fake.totals_by_customer() == totals


# -- time rules ------------------------------------------------------------------------------------------------------


def test_an_entry_first_sent_over_23_hours_ago_is_not_resent_blindly(engine: _core.Engine, fake: FakeStripe) -> None:
    commit(engine, "alpha", 5)
    fake.fail_next("drop_after_record")  # recorded at Stripe, the answer lost
    rounds(engine, fake, max_attempts=1)
    (entry,) = engine.outbox_pending(10)
    assert entry["sent_as"] and entry["first_attempt_ms"] is not None
    fake.advance_time(25 * 3600)  # Stripe forgot the identifier: a blind resend would count twice

    tomorrow = wall_ms() + 23 * rules.HOUR_MS + 60_000
    settle(engine, fake, clock_ms=lambda: tomorrow)
    (letter,) = engine.dead_letters(10)
    assert "first sent over 23 h ago" in letter["reason"]
    assert "check `spendgate reconcile` before requeueing" in letter["reason"]
    assert fake.totals_by_customer() == {"cus_alpha": 5}  # once
    assert fake.count_requests("/v1/billing/meter_events") == 1


def test_an_entry_older_than_35_days_is_flagged_not_sent(engine: _core.Engine, fake: FakeStripe) -> None:
    commit(engine, "alpha", 5)
    later = wall_ms() + 35 * rules.DAY_MS  # the settler's clock: the entry is 35 days old
    settle(engine, fake, clock_ms=lambda: later)
    (letter,) = engine.dead_letters(10)
    assert "35 days" in letter["reason"] and "not sent" in letter["reason"]
    assert meter_event_posts(fake) == 0


def test_stripes_own_35_day_refusal_is_dead_lettered_with_its_message(engine: _core.Engine, fake: FakeStripe) -> None:
    commit(engine, "alpha", 5)
    fake.advance_time(36 * 86_400)  # Stripe's clock runs ahead of ours
    settle(engine, fake)
    (letter,) = engine.dead_letters(10)
    assert "timestamp_too_far_in_past" in letter["reason"] and "35 calendar days" in letter["reason"]


def test_a_timestamp_in_the_future_is_clock_skew(engine: _core.Engine, fake: FakeStripe) -> None:
    commit(engine, "alpha", 5)
    earlier = wall_ms() - 10 * 60_000  # the settler's clock is 10 minutes behind the commit's
    settle(engine, fake, clock_ms=lambda: earlier)
    (letter,) = engine.dead_letters(10)
    assert "in the future" in letter["reason"] and meter_event_posts(fake) == 0


# -- pre-aggregation -------------------------------------------------------------------------------------------------


def test_pre_aggregation_makes_fewer_calls_with_the_same_totals(engine: _core.Engine, fake: FakeStripe) -> None:
    totals = commit_some(engine, 60)
    later = wall_ms() + 120_000
    settle(engine, fake, aggregate_window_ms=60_000, clock_ms=lambda: later)
    assert fake.totals_by_customer() == totals
    posts = fake.count_requests("/v1/billing/meter_events")
    assert posts <= 2 * len(CUSTOMERS)  # one per customer per minute window (the commits may straddle two)
    aggregated = [ev for ev in fake.events() if parse_aggregate_identifier(ev["identifier"])]
    assert aggregated and all(
        parse_aggregate_identifier(ev["identifier"]).value == ev["value"]  # type: ignore[union-attr]
        for ev in aggregated
    )


def test_an_open_window_is_not_sent_until_it_closes(engine: _core.Engine, fake: FakeStripe) -> None:
    commit_some(engine, 3)
    rounds(engine, fake, 2, aggregate_window_ms=3_600_000)
    assert meter_event_posts(fake) == 0 and engine.outbox_stats()["depth"] == 3


def test_an_aggregate_claimed_before_a_crash_is_resent_whole_even_when_only_part_of_it_is_read(
    engine: _core.Engine, fake: FakeStripe
) -> None:
    amounts = [3, 5, 7, 11, 13]
    for amount in amounts:
        commit(engine, "alpha", amount)
    later = wall_ms() + 120_000

    rounds(engine, fake, aggregate_window_ms=60_000, clock_ms=lambda: later, wrap=CrashBeforeSend)
    claims = {e["sent_as"] for e in engine.outbox_pending(100)}
    assert len(claims) == 1 and parse_aggregate_identifier(claims.pop() or "") is not None
    # A settler that reads 2 entries a round sees the aggregate's members a few at a time: it must send the whole
    # aggregate the first time and let Stripe drop the later resends.
    settle(engine, fake, aggregate_window_ms=60_000, clock_ms=lambda: later, batch_size=1, concurrency=2)
    assert fake.totals_by_customer() == {"cus_alpha": sum(amounts)}
    assert len(fake.events()) == 1 and fake.duplicates_rejected == 2


# -- v2 sessions -----------------------------------------------------------------------------------------------------


def test_an_expired_stream_session_is_refreshed_and_the_batch_resent(engine: _core.Engine) -> None:
    with FakeStripe(customers=CUSTOMERS, session_ttl_seconds=900) as fake:
        commit_some(engine, 3)

        async def body(waiter: DurabilityWaiter) -> None:
            settler = make_settler(engine, fake, waiter, transport="v2")
            try:
                await settler.run(until_empty=True)
                fake.advance_time(901)  # the token expires (our monotonic clock did not move: no early refresh)
                commit_some(engine, 3)
                await settler.run(until_empty=True)
            finally:
                settler.close()

        run_async(engine, body)
        assert fake.count_requests("/v2/billing/meter_event_session") == 2
        assert fake.count_requests("/v2/billing/meter_event_stream", status=401) == 1
        assert len(fake.events(status="accepted")) == 6


def test_the_stream_session_is_refreshed_at_80_percent_of_its_life(engine: _core.Engine, fake: FakeStripe) -> None:
    from spendgate.settle.transport_v2 import V2Transport

    now = [0.0]
    transport = V2Transport(fake.client(), "spendgate_usage", monotonic=lambda: now[0])
    commit_some(engine, 2)
    events = [
        MeterEvent(
            e["identifier"],
            "spendgate_usage",
            e["stripe_customer_id"],
            e["amount"],
            e["ts_ms"],
            (e["seq"],),
            ("x",),
            False,
        )
        for e in engine.outbox_pending(10)
    ]
    transport.send(events[:1])
    now[0] = 0.79 * 900
    transport.send(events[:1])
    assert transport.sessions_created == 1
    now[0] = 0.81 * 900
    transport.send(events[1:])
    assert transport.sessions_created == 2
    assert fake.count_requests("/v2/billing/meter_event_stream", status=401) == 0


def test_a_resend_refused_for_good_warns_that_stripe_may_have_the_first_send(
    engine: _core.Engine, fake: FakeStripe
) -> None:
    commit(engine, "alpha", 5)
    rounds(engine, fake, wrap=CrashAfterSend)  # recorded at Stripe, not acknowledged here
    settle(engine, fake, event_name="archived_meanwhile")  # the resend is refused (no such meter now)
    (letter,) = engine.dead_letters(10)
    assert "No active meter found" in letter["reason"]
    assert "Stripe may have it already: check `spendgate reconcile` before requeueing" in letter["reason"]
    assert fake.totals_by_customer() == {"cus_alpha": 5}


class Stalled:
    """A transport whose sends block until released, then go to Stripe for real: a request that neither answers nor
    times out in the HTTP library (a server trickling bytes keeps each read alive)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.name, self.event_name = inner.name, inner.event_name
        self.max_events_per_call, self.validates_meter = inner.max_events_per_call, inner.validates_meter
        self.release = threading.Event()

    def send(self, events: Sequence[MeterEvent]) -> None:
        assert self.release.wait(HANG_GUARD_S)
        self.inner.send(events)

    def close(self) -> None:
        self.inner.close()


def test_a_call_running_past_its_timeout_is_a_failure_even_when_the_http_library_does_not_end_it(
    engine: _core.Engine, fake: FakeStripe
) -> None:
    commit(engine, "alpha", 5)
    stalled: list[Stalled] = []

    async def body(waiter: DurabilityWaiter) -> None:
        settler = make_settler(
            engine, fake, waiter, request_timeout_ms=1_000, wrap=lambda t: stalled.append(Stalled(t)) or stalled[0]
        )
        task = asyncio.get_running_loop().create_task(settler.run())
        try:
            while not settler.status.failing_since_ms:  # the hang guard of run_async bounds this
                await asyncio.sleep(0.01)
            assert "past settle_request_timeout_ms (1000 ms)" in settler.status.last_error
            assert fake.totals_by_customer() == {}
            stalled[0].release.set()  # the request ends after all: delivered, and settlement recovers
            while engine.outbox_stats()["depth"] or settler.status.failing_since_ms:
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            settler.close()

    run_async(engine, body)
    assert fake.totals_by_customer() == {"cus_alpha": 5}

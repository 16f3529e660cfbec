"""Classifying the SDK's errors, raised by the real `stripe` SDK against the fake Stripe."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import stripe

from spendgate.settle.errors import Verdict, classify, is_duplicate, truncate_reason
from spendgate.testing.fake_stripe import FakeStripe

CUSTOMER = "cus_errors"


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(customers=[CUSTOMER]) as fake:
        yield fake


def event(identifier: str, *, event_name: str = "spendgate_usage", timestamp: int | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "event_name": event_name,
        "identifier": identifier,
        "payload": {"stripe_customer_id": CUSTOMER, "value": "3"},
    }
    if timestamp is not None:
        params["timestamp"] = timestamp
    return params


def error_of(call: Callable[[], object]) -> stripe.StripeError:
    with pytest.raises(stripe.StripeError) as info:
        call()
    return info.value


def test_a_repeated_identifier_counts_as_delivered(fake: FakeStripe) -> None:
    client = fake.client()
    client.v1.billing.meter_events.create(event("e-1"))  # type: ignore[arg-type]
    error = error_of(lambda: client.v1.billing.meter_events.create(event("e-1")))  # type: ignore[arg-type]
    assert error.http_status == 400 and error.code is None  # Stripe sends no code: the message is what tells
    assert classify(error).verdict is Verdict.DELIVERED


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, None, "An event already exists with identifier sg-rsv_1."),  # v1, as observed
        (400, "duplicate_meter_event", "A meter event with a duplicate identifier has already been submitted."),  # v2
        (400, None, "A meter event with a duplicate identifier has already been submitted."),  # the same words, no code
        (400, "duplicate_meter_event", "worded some other way"),  # the code alone
        (409, None, "An event with identifier sg-rsv_1 already exists."),  # another wording, another status
    ],
)
def test_stripes_duplicate_answer_is_recognised_by_more_than_one_signal(
    status: int, code: str | None, message: str
) -> None:
    assert is_duplicate(status, code, message)


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, None, "No such customer: 'cus_x'"),
        (400, "resource_missing", 'No active meter found for event name "x".'),
        (500, None, "An event already exists with identifier sg-rsv_1."),  # a 5xx is never a delivery
        (409, None, "There is currently another in-progress request using this Stripe-Idempotent-Key."),
    ],
)
def test_other_refusals_are_not_duplicates(status: int, code: str | None, message: str) -> None:
    assert not is_duplicate(status, code, message)


@pytest.mark.parametrize(
    ("fault", "verdict"),
    [
        ("429", Verdict.RETRY),  # a rate limit: no Stripe-Should-Retry header, retried with backoff
        ("429_lock_timeout", Verdict.RETRY),  # Stripe-Should-Retry: true
        ("500", Verdict.RETRY),  # before the endpoint ran
        ("503", Verdict.RETRY),
        ("reset", Verdict.RETRY),  # the connection dropped: APIConnectionError
        ("500_after_record", Verdict.RETRY_LATER),  # Stripe-Should-Retry: false: not now (a later round resends)
        ("drop_after_record", Verdict.RETRY),
    ],
)
def test_transient_failures_are_retried(fake: FakeStripe, fault: str, verdict: Verdict) -> None:
    fake.fail_next(fault)
    error = error_of(lambda: fake.client().v1.billing.meter_events.create(event("e-2")))  # type: ignore[arg-type]
    classified = classify(error)
    assert classified.verdict is verdict
    assert classified.reason.startswith("Stripe ")


def test_an_unknown_meter_is_permanent_with_stripes_message(fake: FakeStripe) -> None:
    error = error_of(
        lambda: fake.client().v1.billing.meter_events.create(  # type: ignore[arg-type]
            event("e-3", event_name="no_such_meter")
        )
    )
    classified = classify(error)
    assert classified.verdict is Verdict.PERMANENT
    assert 'No active meter found for event name "no_such_meter".' in classified.reason
    assert "HTTP 400" in classified.reason


def test_a_timestamp_older_than_35_days_is_permanent(fake: FakeStripe) -> None:
    old = int(time.time()) - 36 * 86_400
    error = error_of(lambda: fake.client().v1.billing.meter_events.create(event("e-4", timestamp=old)))  # type: ignore[arg-type]
    classified = classify(error)
    assert classified.verdict is Verdict.PERMANENT and "timestamp_too_far_in_past" in classified.reason


def test_a_bad_key_stalls_instead_of_dead_lettering(make_fake: Callable[..., FakeStripe]) -> None:
    fake = make_fake(api_keys=["sk_test_right"])
    error = error_of(lambda: fake.client("sk_test_wrong").v1.billing.meter_events.create(event("e-5")))  # type: ignore[arg-type]
    classified = classify(error)
    assert classified.verdict is Verdict.RETRY_LATER and "STRIPE_API_KEY" in classified.reason
    assert "sk_test_wrong" not in classified.reason  # Stripe's message redacts the key, and so does ours


def test_an_expired_stream_session_asks_for_a_new_one() -> None:
    with FakeStripe(session_ttl_seconds=60) as fake:
        client = fake.client()
        token = client.v2.billing.meter_event_session.create().authentication_token
        fake.advance_time(61)
        error = error_of(
            lambda: client.v2.billing.meter_event_stream.create(  # type: ignore[arg-type]
                {"events": [event("e-6")]}, options={"api_key": token}
            )
        )
        assert classify(error).verdict is Verdict.SESSION_EXPIRED


def test_an_unexpected_error_is_never_a_dead_letter() -> None:
    assert classify(RuntimeError("bug")).verdict is Verdict.RETRY_LATER


def test_reasons_fit_the_engine() -> None:
    assert len(truncate_reason("é" * 2000).encode()) <= 1024
    assert truncate_reason("") == "refused by Stripe"


@pytest.fixture
def make_fake() -> Iterator[Callable[..., FakeStripe]]:
    made: list[FakeStripe] = []

    def make(**kwargs: Any) -> FakeStripe:
        fake = FakeStripe(**kwargs)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.stop()

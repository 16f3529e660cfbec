"""The fake Stripe server, driven only through the real `stripe` SDK (StripeClient) over HTTP.

Every FakeStripe is stopped at teardown (the `make_fake` factory and `with` blocks). No assertion depends on timing:
windows and expiry are crossed with fake.advance_time().
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import stripe

from spendgate.testing import FakeStripe
from spendgate.testing.fake_stripe import DEFAULT_API_KEY, build_event, parse_form

METER = "spendgate_usage"
TOKENS = "token-billing-tokens"  # Stripe's token-billing meter, with dimensions model and token_type
CUSTOMER = "cus_test_alice"
OTHER = "cus_test_bob"

MakeFake = Callable[..., FakeStripe]


@pytest.fixture
def make_fake() -> Iterator[MakeFake]:
    made: list[FakeStripe] = []

    def make(**kwargs: Any) -> FakeStripe:
        kwargs.setdefault("customers", [CUSTOMER, OTHER])
        fake = FakeStripe(**kwargs)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.stop()


@pytest.fixture
def fake(make_fake: MakeFake) -> FakeStripe:
    return make_fake(seed=1)


@pytest.fixture
def client(fake: FakeStripe) -> stripe.StripeClient:
    return fake.client()


def send(
    client: stripe.StripeClient,
    identifier: str,
    value: int = 1,
    customer: str = CUSTOMER,
    event_name: str = METER,
    timestamp: int | None = None,
    dimensions: dict[str, str] | None = None,
    **options: Any,
) -> Any:
    params: dict[str, Any] = {
        "event_name": event_name,
        "identifier": identifier,
        "payload": {"stripe_customer_id": customer, "value": str(value), **(dimensions or {})},
    }
    if timestamp is not None:
        params["timestamp"] = timestamp
    return client.v1.billing.meter_events.create(params, options or None)  # type: ignore[arg-type]


def stream_event(
    identifier: str, value: int = 1, customer: str = CUSTOMER, event_name: str = METER, timestamp: str | None = None
) -> Any:
    ev: dict[str, Any] = {
        "event_name": event_name,
        "identifier": identifier,
        "payload": {"stripe_customer_id": customer, "value": str(value)},
    }
    if timestamp is not None:
        ev["timestamp"] = timestamp
    return ev


def session_client(fake: FakeStripe, client: stripe.StripeClient) -> stripe.StripeClient:
    session = client.v2.billing.meter_event_session.create()
    return fake.client(session.authentication_token)


# ---------------------------------------------------------------------------------------------------------------------
# v1 meter events
# ---------------------------------------------------------------------------------------------------------------------


def test_v1_meter_event_returns_the_documented_object_and_uses_the_form_wire_format(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    ts = int(fake.now()) - 60
    event = send(client, "led-1", 7, timestamp=ts)

    assert event.object == "billing.meter_event"
    assert (event.event_name, event.identifier, event.timestamp, event.livemode) == (METER, "led-1", ts, False)
    assert event.payload is not None
    assert event.payload.to_dict() == {"stripe_customer_id": CUSTOMER, "value": "7"}
    assert isinstance(event.created, int)
    assert fake.totals_by_customer() == {CUSTOMER: 7}

    (entry,) = fake.request_log()
    assert (entry["host"], entry["method"], entry["path"], entry["status"]) == (
        "api",
        "POST",
        "/v1/billing/meter_events",
        200,
    )
    assert entry["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert entry["headers"]["authorization"].startswith("Bearer sk_test_")
    assert entry["idempotency_key"]
    assert "payload[stripe_customer_id]=cus_test_alice" in entry["body"]
    assert "payload[value]=7" in entry["body"]
    assert entry["params"]["payload"] == {"stripe_customer_id": CUSTOMER, "value": "7"}


def test_duplicate_identifier_is_a_400_with_stripes_message_and_is_not_counted_twice(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    send(client, "led-dup", 5)
    with pytest.raises(stripe.InvalidRequestError) as info:
        send(client, "led-dup", 5)

    err = info.value
    assert err.http_status == 400
    assert err.user_message == "An event already exists with identifier led-dup."
    assert err.code is None
    assert err.headers is not None and err.headers["stripe-should-retry"] == "false"
    assert fake.totals_by_customer() == {CUSTOMER: 5}
    assert fake.duplicates_rejected == 1
    assert len(fake.events()) == 1


def test_a_new_value_under_an_old_identifier_is_still_a_duplicate(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    send(client, "led-x", 5)
    with pytest.raises(stripe.InvalidRequestError):
        send(client, "led-x", 500)
    assert fake.totals_by_customer() == {CUSTOMER: 5}


def test_the_dedup_window_is_24_hours_by_default_and_configurable(make_fake: MakeFake) -> None:
    fake = make_fake()
    client = fake.client()
    send(client, "old", 1)
    fake.advance_time(24 * 3600 - 10)
    with pytest.raises(stripe.InvalidRequestError):
        send(client, "old", 1)
    fake.advance_time(20)
    send(client, "old", 1)  # forgotten after the window: accepted again (Stripe promises "at least 24 hours")
    assert fake.totals_by_customer() == {CUSTOMER: 2}

    longer = make_fake(dedup_window_seconds=7 * 86_400)
    lc = longer.client()
    send(lc, "old", 1)
    longer.advance_time(3 * 86_400)
    with pytest.raises(stripe.InvalidRequestError):
        send(lc, "old", 1)


def test_an_idempotency_key_replays_the_saved_response(fake: FakeStripe, client: stripe.StripeClient) -> None:
    first = send(client, "led-ik", 3, idempotency_key="ik-1")
    again = send(client, "led-ik", 3, idempotency_key="ik-1")  # not a duplicate 400: the saved 200 is replayed

    assert again.identifier == first.identifier and again.created == first.created
    assert again.last_response.headers["idempotent-replayed"] == "true"
    assert fake.totals_by_customer() == {CUSTOMER: 3}
    assert fake.duplicates_rejected == 0

    with pytest.raises(stripe.IdempotencyError) as info:
        send(client, "led-other", 3, idempotency_key="ik-1")
    assert "ik-1" in info.value.user_message


def test_a_key_in_use_by_a_concurrent_request_is_a_409(
    fake: FakeStripe, client: stripe.StripeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    original = fake._v1_meter_event

    def slow(*args: Any) -> Any:
        entered.set()
        release.wait(10)
        return original(*args)

    monkeypatch.setattr(fake, "_v1_meter_event", slow)
    first = ThreadPoolExecutor(max_workers=1)
    pending = first.submit(send, client, "busy", 2, idempotency_key="busy-key")
    try:
        assert entered.wait(10)
        with pytest.raises(stripe.APIError) as info:
            send(client, "busy", 2, idempotency_key="busy-key")
        assert info.value.http_status == 409
    finally:
        release.set()
        pending.result(timeout=10)
        first.shutdown()
    assert fake.totals_by_customer() == {CUSTOMER: 2}


def test_an_unknown_event_name_is_a_400_and_nothing_is_recorded(fake: FakeStripe, client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        send(client, "led-1", event_name="no_such_meter")
    assert info.value.http_status == 400
    assert info.value.user_message == 'No active meter found for event name "no_such_meter".'
    assert info.value.param == "event_name"
    assert fake.events() == []


@pytest.mark.parametrize(
    ("offset", "code"), [(-(35 * 86_400) - 60, "timestamp_too_far_in_past"), (6 * 60, "timestamp_in_future")]
)
def test_a_timestamp_outside_35_days_back_or_5_minutes_ahead_is_a_400(
    fake: FakeStripe, client: stripe.StripeClient, offset: int, code: str
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        send(client, "led-ts", timestamp=int(fake.now()) + offset)
    assert (info.value.http_status, info.value.code, info.value.param) == (400, code, "timestamp")
    assert fake.events() == []


def test_timestamps_inside_the_window_are_accepted(fake: FakeStripe, client: stripe.StripeClient) -> None:
    send(client, "old", 2, timestamp=int(fake.now()) - 34 * 86_400)
    send(client, "soon", 3, timestamp=int(fake.now()) + 4 * 60)
    assert fake.totals_by_customer() == {CUSTOMER: 5}


def test_missing_params_and_unknown_params_are_400s(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.billing.meter_events.create({"event_name": METER})  # type: ignore[typeddict-item]
    assert (info.value.code, info.value.param) == ("parameter_missing", "payload")
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.billing.meter_events.create(
            {
                "event_name": METER,
                "payload": {"value": "1"},  # type: ignore
                "bogus": "1",
            }
        )
    assert (info.value.code, info.value.param) == ("parameter_unknown", "bogus")


def test_an_unknown_customer_is_accepted_and_recorded_as_an_async_error(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    send(client, "ghost-1", 9, customer="cus_nobody")  # Stripe validates the customer asynchronously
    client.v1.billing.meter_events.create({"event_name": METER, "identifier": "no-cust", "payload": {"value": "4"}})

    assert fake.totals_by_customer() == {}
    assert [e["status"] for e in fake.events()] == ["invalid", "invalid"]
    (not_found,) = fake.errors("meter_event_customer_not_found")
    assert (not_found["identifier"], not_found["customer"]) == ("ghost-1", "cus_nobody")
    (no_customer,) = fake.errors("meter_event_no_customer_defined")
    assert no_customer["message"] == "Customer mapping key stripe_customer_id not found in payload."


def test_dead_letter_flow_customer_lookup_and_error(fake: FakeStripe, client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.customers.retrieve("cus_missing")
    assert (info.value.http_status, info.value.code) == (404, "resource_missing")
    assert info.value.user_message == "No such customer: 'cus_missing'"

    send(client, "dl-1", 4, customer="cus_missing")
    assert fake.errors()[0]["code"] == "meter_event_customer_not_found"
    # The identifier is taken even though the event failed validation: a resend after fixing the customer is a
    # duplicate, so a dead-letter path must use a fresh identifier (or cancel) to bill it.
    fake.add_customer("cus_missing")
    with pytest.raises(stripe.InvalidRequestError):
        send(client, "dl-1", 4, customer="cus_missing")
    send(client, "dl-1-retry", 4, customer="cus_missing")
    assert fake.totals_by_customer() == {"cus_missing": 4}


def test_authentication(make_fake: MakeFake) -> None:
    fake = make_fake()
    for bad in ("sk_live_123456789abc", "pk_test_123456789abc", "not-a-key"):
        with pytest.raises(stripe.AuthenticationError) as info:
            send(fake.client(bad), "auth-1")
        assert info.value.http_status == 401
    send(fake.client("rk_test_restricted_key"), "auth-2")
    assert fake.totals_by_customer() == {CUSTOMER: 1}

    only = make_fake(api_keys=["sk_test_only_this_one"])
    with pytest.raises(stripe.AuthenticationError):
        send(only.client(DEFAULT_API_KEY), "auth-3")
    send(only.client("sk_test_only_this_one"), "auth-3")


# ---------------------------------------------------------------------------------------------------------------------
# v2: session + stream, and the synchronous v2 endpoint
# ---------------------------------------------------------------------------------------------------------------------


def test_v2_session_then_stream(fake: FakeStripe, client: stripe.StripeClient) -> None:
    session = client.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session"
    assert session.id and session.authentication_token and session.livemode is False
    created = time.mktime(time.strptime(session.created[:19], "%Y-%m-%dT%H:%M:%S"))
    expires = time.mktime(time.strptime(session.expires_at[:19], "%Y-%m-%dT%H:%M:%S"))
    assert expires - created == 15 * 60

    stream = fake.client(session.authentication_token)
    result = stream.v2.billing.meter_event_stream.create(
        {"events": [stream_event("s-1", 3), stream_event("s-2", 4, customer=OTHER)]}
    )
    assert result is None  # the endpoint answers {}
    assert fake.totals_by_customer() == {CUSTOMER: 3, OTHER: 4}

    log = fake.request_log()
    assert [(r["host"], r["path"]) for r in log] == [
        ("api", "/v2/billing/meter_event_session"),
        ("meter_events", "/v2/billing/meter_event_stream"),
    ]
    assert log[1]["headers"]["content-type"] == "application/json"
    assert log[1]["headers"]["stripe-version"]
    assert log[1]["headers"]["authorization"].startswith("Bearer token_")
    assert json.loads(log[1]["body"])["events"][0]["payload"] == {"stripe_customer_id": CUSTOMER, "value": "3"}


def test_stream_rfc3339_timestamps(fake: FakeStripe, client: stripe.StripeClient) -> None:
    stream = session_client(fake, client)
    ts = int(fake.now()) - 3600
    iso = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))
    stream.v2.billing.meter_event_stream.create({"events": [stream_event("s-ts", 2, timestamp=iso)]})
    assert fake.events()[0]["timestamp"] == ts


def test_the_stream_lives_only_on_the_meter_events_base_address(fake: FakeStripe, client: stripe.StripeClient) -> None:
    token = client.v2.billing.meter_event_session.create().authentication_token
    wrong = stripe.StripeClient(token, base_addresses={"api": fake.url, "meter_events": fake.url})
    with pytest.raises(stripe.InvalidRequestError) as info:
        wrong.v2.billing.meter_event_stream.create({"events": [stream_event("s-1")]})
    assert info.value.http_status == 404
    assert fake.totals_by_customer() == {}


def test_same_host_mode_serves_the_stream_on_the_api_port(make_fake: MakeFake) -> None:
    fake = make_fake(same_host=True)
    assert fake.url == fake.meter_events_url
    client = stripe.StripeClient(DEFAULT_API_KEY, base_addresses={"api": fake.url, "meter_events": fake.url})
    token = client.v2.billing.meter_event_session.create().authentication_token
    stripe.StripeClient(
        token, base_addresses={"api": fake.url, "meter_events": fake.url}
    ).v2.billing.meter_event_stream.create({"events": [stream_event("s-1", 2)]})
    assert fake.totals_by_customer() == {CUSTOMER: 2}


def test_an_expired_session_token_is_a_401_billing_meter_event_session_expired(make_fake: MakeFake) -> None:
    fake = make_fake(session_ttl_seconds=60)
    client = fake.client()
    stream = session_client(fake, client)
    stream.v2.billing.meter_event_stream.create({"events": [stream_event("e-1")]})

    fake.advance_time(61)
    with pytest.raises(stripe.TemporarySessionExpiredError) as info:
        stream.v2.billing.meter_event_stream.create({"events": [stream_event("e-2")]})
    assert info.value.http_status == 401
    assert info.value.code == "billing_meter_event_session_expired"
    assert info.value.user_message == "The temporary session token has expired."

    session_client(fake, client).v2.billing.meter_event_stream.create({"events": [stream_event("e-2")]})
    assert fake.totals_by_customer() == {CUSTOMER: 2}


def test_the_stream_refuses_api_keys_and_the_api_refuses_session_tokens(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    with pytest.raises(stripe.AuthenticationError):
        client.v2.billing.meter_event_stream.create({"events": [stream_event("k-1")]})
    token = client.v2.billing.meter_event_session.create().authentication_token
    with pytest.raises(stripe.AuthenticationError):
        send(fake.client(token), "k-2")
    assert fake.totals_by_customer() == {}


def test_more_than_100_events_per_stream_request_is_a_400(fake: FakeStripe, client: stripe.StripeClient) -> None:
    stream = session_client(fake, client)
    with pytest.raises(stripe.InvalidRequestError) as info:
        stream.v2.billing.meter_event_stream.create({"events": [stream_event(f"b-{i}") for i in range(101)]})
    assert info.value.http_status == 400
    assert fake.events() == []

    stream.v2.billing.meter_event_stream.create({"events": [stream_event(f"b-{i}") for i in range(100)]})
    assert fake.totals_by_customer() == {CUSTOMER: 100}


def test_the_stream_drops_repeated_identifiers_silently(fake: FakeStripe, client: stripe.StripeClient) -> None:
    stream = session_client(fake, client)
    batch = {"events": [stream_event("d-1", 5), stream_event("d-2", 6), stream_event("d-1", 5)]}
    stream.v2.billing.meter_event_stream.create(batch)  # type: ignore[arg-type]
    stream.v2.billing.meter_event_stream.create(batch)  # type: ignore[arg-type]
    with pytest.raises(stripe.InvalidRequestError):  # v1 and v2 share one identifier space
        send(client, "d-2", 6)
    assert fake.totals_by_customer() == {CUSTOMER: 11}
    assert fake.duplicates_rejected == 5


def test_the_stream_validates_asynchronously(fake: FakeStripe, client: stripe.StripeClient) -> None:
    stream = session_client(fake, client)
    stream.v2.billing.meter_event_stream.create(
        {
            "events": [
                stream_event("a-1", event_name="no_such_meter"),
                stream_event("a-2", customer="cus_nobody"),
                stream_event("a-3", timestamp="2020-01-01T00:00:00.000Z"),
                stream_event("a-4", 8),
            ]
        }
    )
    assert fake.totals_by_customer() == {CUSTOMER: 8}
    assert sorted(e["code"] for e in fake.errors()) == [
        "meter_event_customer_not_found",
        "no_meter",
        "timestamp_too_far_in_past",
    ]


def test_v2_synchronous_meter_event_and_its_documented_duplicate_code(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    ev = client.v2.billing.meter_events.create(
        {"event_name": METER, "identifier": "v2-1", "payload": {"stripe_customer_id": CUSTOMER, "value": "12"}}
    )
    assert (ev.object, ev.identifier) == ("v2.billing.meter_event", "v2-1")
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v2.billing.meter_events.create(
            {"event_name": METER, "identifier": "v2-1", "payload": {"stripe_customer_id": CUSTOMER, "value": "12"}}
        )
    assert (info.value.http_status, info.value.code) == (400, "duplicate_meter_event")
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v2.billing.meter_events.create(
            {"event_name": "nope", "payload": {"stripe_customer_id": CUSTOMER, "value": "1"}}
        )
    assert info.value.code == "no_meter"
    assert fake.totals_by_customer() == {CUSTOMER: 12}


# ---------------------------------------------------------------------------------------------------------------------
# Meters, summaries, adjustments, customers
# ---------------------------------------------------------------------------------------------------------------------


def test_meters_are_precreated_and_can_be_created_listed_and_retrieved(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    names = {m.event_name for m in client.v1.billing.meters.list().data}
    assert names == {"spendgate_usage", "token-billing-tokens"}

    meter = client.v1.billing.meters.create(
        {
            "display_name": "LLM tokens",
            "event_name": "llm_tokens",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    assert meter.object == "billing.meter" and meter.id.startswith("mtr_")
    assert (meter.status, meter.default_aggregation.formula, meter.event_time_window) == ("active", "sum", None)
    assert client.v1.billing.meters.retrieve(meter.id).event_name == "llm_tokens"
    assert "default_aggregation[formula]=sum" in fake.request_log()[-2]["body"]

    with pytest.raises(stripe.InvalidRequestError):  # one active meter per event name
        client.v1.billing.meters.create(
            {"display_name": "again", "event_name": "llm_tokens", "default_aggregation": {"formula": "sum"}}
        )
    send(client, "m-1", 3, event_name="llm_tokens")
    assert fake.totals_by_customer("llm_tokens") == {CUSTOMER: 3}


def test_event_summaries_sum_a_customers_events_in_the_range(fake: FakeStripe, client: stripe.StripeClient) -> None:
    meter_id = fake.meter(METER)["id"]
    now = int(fake.now())
    day = now - now % 86_400
    send(client, "e-1", 10, timestamp=day - 86_400 + 100)  # yesterday
    send(client, "e-2", 5, timestamp=day + 30)  # today, first hour
    send(client, "e-3", 7, timestamp=day + 30)
    send(client, "e-4", 100, customer=OTHER, timestamp=day + 30)

    whole = client.v1.billing.meters.event_summaries.list(
        meter_id, {"customer": CUSTOMER, "start_time": day - 86_400, "end_time": day + 86_400}
    )
    assert whole["object"] == "list"
    (summary,) = whole.data
    assert summary.object == "billing.meter_event_summary"
    assert (summary.aggregated_value, summary.meter) == (22, meter_id)
    assert (summary.start_time, summary.end_time) == (day - 86_400, day + 86_400)

    by_day = client.v1.billing.meters.event_summaries.list(
        meter_id,
        {"customer": CUSTOMER, "start_time": day - 86_400, "end_time": day + 86_400, "value_grouping_window": "day"},
    )
    assert [(s.start_time, s.aggregated_value) for s in by_day.data] == [(day, 12), (day - 86_400, 10)]

    by_hour = client.v1.billing.meters.event_summaries.list(
        meter_id, {"customer": CUSTOMER, "start_time": day, "end_time": day + 2 * 3600, "value_grouping_window": "hour"}
    )
    assert [s.aggregated_value for s in by_hour.data] == [0, 12]

    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meters.event_summaries.list(
            meter_id, {"customer": CUSTOMER, "start_time": day + 1, "end_time": day + 3600}
        )
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meters.event_summaries.list(
            meter_id,
            {"customer": CUSTOMER, "start_time": day + 60, "end_time": day + 3600, "value_grouping_window": "hour"},
        )
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.billing.meters.event_summaries.list(
            "mtr_nope", {"customer": CUSTOMER, "start_time": day, "end_time": day + 60}
        )
    assert info.value.http_status == 404


def test_the_token_billing_meter_groups_its_summaries_by_dimension(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    meter = client.v1.billing.meters.retrieve(fake.meter(TOKENS)["id"]).to_dict()
    assert meter["dimension_payload_keys"] == ["model", "token_type"]
    now = int(fake.now())
    start, end = now - now % 60 - 3600, now - now % 60 + 60
    for n, (model, token_type, value) in enumerate(
        [
            ("gpt-6-sol", "input", 100),
            ("gpt-6-sol", "output", 7),
            ("gpt-6-sol", "input", 20),
            ("claude-sonnet-5", "input", 3),
        ]
    ):
        send(client, f"t-{n}", value, event_name=TOKENS, dimensions={"model": model, "token_type": token_type})
    send(client, "t-no-dims", 1000, event_name=TOKENS)  # accepted, then refused asynchronously
    (error,) = fake.errors()
    assert (error["code"], error["identifier"]) == ("missing_dimension_payload_keys", "t-no-dims")
    assert "model, token_type" in error["message"]

    window: Any = {"customer": CUSTOMER, "start_time": start, "end_time": end}  # Any: the SDK types lack previews
    (whole,) = client.v1.billing.meters.event_summaries.list(meter["id"], window).data
    assert whole.aggregated_value == 130 and "dimensions" not in whole.to_dict()
    grouped = client.v1.billing.meters.event_summaries.list(
        meter["id"], {**window, "dimension_group_by_keys": ["model", "token_type"]}
    ).data
    assert [(s.to_dict()["dimensions"], s.aggregated_value) for s in grouped] == [
        ({"model": "claude-sonnet-5", "token_type": "input"}, 3),
        ({"model": "gpt-6-sol", "token_type": "input"}, 120),
        ({"model": "gpt-6-sol", "token_type": "output"}, 7),
    ]
    assert len({s.id for s in grouped}) == 3
    filtered = client.v1.billing.meters.event_summaries.list(
        meter["id"], {**window, "dimension_filters": {"token_type": "input"}}
    ).data
    assert [s.aggregated_value for s in filtered] == [123]
    assert fake.totals_by_dimensions(TOKENS) == {
        (CUSTOMER, "gpt-6-sol", "input"): 120,
        (CUSTOMER, "gpt-6-sol", "output"): 7,
        (CUSTOMER, "claude-sonnet-5", "input"): 3,
    }
    with pytest.raises(stripe.InvalidRequestError, match="not one of the meter's dimension_payload_keys"):
        client.v1.billing.meters.event_summaries.list(
            fake.meter(METER)["id"], {**window, "dimension_group_by_keys": ["model"]}
        )


def test_a_meter_is_created_with_dimension_payload_keys(fake: FakeStripe, client: stripe.StripeClient) -> None:
    params: Any = {
        "display_name": "tokens by tier",
        "event_name": "tiered",
        "default_aggregation": {"formula": "sum"},
        "dimension_payload_keys": ["tier"],
    }  # Any: the SDK's types lack the preview parameter
    meter = client.v1.billing.meters.create(params)
    assert meter.to_dict()["dimension_payload_keys"] == ["tier"]
    assert "dimension_payload_keys[0]=tier" in urllib.parse.unquote(fake.request_log()[-1]["body"])
    assert client.v1.billing.meters.retrieve(fake.meter(METER)["id"]).to_dict()["dimension_payload_keys"] is None


def test_event_summary_pagination_follows_the_list_cursor(fake: FakeStripe, client: stripe.StripeClient) -> None:
    meter_id = fake.meter(METER)["id"]
    now = int(fake.now())
    day = now - now % 86_400
    for h in range(12):
        send(client, f"p-{h}", h + 1, timestamp=day - 86_400 + h * 3600)
    page = client.v1.billing.meters.event_summaries.list(
        meter_id, {"customer": CUSTOMER, "start_time": day - 86_400, "end_time": day, "value_grouping_window": "hour"}
    )
    assert len(page.data) == 10 and page.has_more
    total = sum(s.aggregated_value for s in page.auto_paging_iter())
    assert total == sum(range(1, 13))


def test_a_count_meter_counts_events(fake: FakeStripe, client: stripe.StripeClient) -> None:
    meter = fake.add_meter("requests", default_aggregation={"formula": "count"})
    for i in range(3):
        send(client, f"c-{i}", 50, event_name="requests")
    now = int(fake.now())
    summary = client.v1.billing.meters.event_summaries.list(
        meter["id"], {"customer": CUSTOMER, "start_time": now - now % 60 - 3600, "end_time": now - now % 60 + 60}
    ).data[0]
    assert summary.aggregated_value == 3


def test_a_cancel_adjustment_removes_the_event_from_totals_and_summaries(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    send(client, "keep", 4)
    send(client, "oops", 6)
    adj = client.v1.billing.meter_event_adjustments.create(
        {"event_name": METER, "type": "cancel", "cancel": {"identifier": "oops"}}
    )
    assert adj.object == "billing.meter_event_adjustment"
    assert adj.cancel is not None
    assert (adj.type, adj.status, adj.cancel.identifier) == ("cancel", "pending", "oops")
    assert "cancel[identifier]=oops" in fake.request_log()[-1]["body"]

    assert fake.totals_by_customer() == {CUSTOMER: 4}
    now = int(fake.now())
    summary = client.v1.billing.meters.event_summaries.list(
        fake.meter(METER)["id"],
        {"customer": CUSTOMER, "start_time": now - now % 60 - 3600, "end_time": now - now % 60 + 60},
    ).data[0]
    assert summary.aggregated_value == 4
    assert [e["status"] for e in fake.events()] == ["accepted", "cancelled"]
    with pytest.raises(stripe.InvalidRequestError):  # cancelling does not free the identifier
        send(client, "oops", 6)


def test_a_cancel_is_only_applied_within_24_hours(fake: FakeStripe, client: stripe.StripeClient) -> None:
    send(client, "late", 6)
    fake.advance_time(24 * 3600 + 1)
    client.v1.billing.meter_event_adjustments.create(
        {"event_name": METER, "type": "cancel", "cancel": {"identifier": "late"}}
    )
    client.v1.billing.meter_event_adjustments.create(
        {"event_name": METER, "type": "cancel", "cancel": {"identifier": "never-sent"}}
    )
    assert [a["outcome"] for a in fake.adjustments()] == ["too_late", "not_found"]
    assert fake.totals_by_customer() == {CUSTOMER: 6}


def test_v2_cancel_adjustment(fake: FakeStripe, client: stripe.StripeClient) -> None:
    session_client(fake, client).v2.billing.meter_event_stream.create({"events": [stream_event("v2c", 9)]})
    adj = client.v2.billing.meter_event_adjustments.create(
        {"event_name": METER, "type": "cancel", "cancel": {"identifier": "v2c"}}
    )
    assert (adj.object, adj.status, adj.cancel.identifier) == ("v2.billing.meter_event_adjustment", "pending", "v2c")
    assert fake.totals_by_customer() == {}


def test_customers_create_and_retrieve(fake: FakeStripe, client: stripe.StripeClient) -> None:
    created = client.v1.customers.create({"email": "a@example.com", "metadata": {"tenant": "t1"}})
    assert created.object == "customer" and created.id.startswith("cus_")
    got = client.v1.customers.retrieve(created.id)
    assert got.metadata is not None
    assert (got.email, got.metadata.to_dict()) == ("a@example.com", {"tenant": "t1"})
    assert client.v1.customers.retrieve(CUSTOMER).id == CUSTOMER
    send(client, "new-cust", 2, customer=created.id)
    assert fake.totals_by_customer() == {created.id: 2}


# ---------------------------------------------------------------------------------------------------------------------
# Fault injection
# ---------------------------------------------------------------------------------------------------------------------


def test_rate_limited_requests_raise_ratelimiterror_and_record_nothing(make_fake: MakeFake) -> None:
    fake = make_fake(seed=7, rate_429=1.0)
    client = fake.client(max_network_retries=2)
    with pytest.raises(stripe.RateLimitError) as info:
        send(client, "rl-1", 5)
    assert info.value.http_status == 429
    # stripe-python 16 builds a v1 RateLimitError without `code`; the code is in the body.
    body: Any = info.value.json_body
    assert body["error"]["code"] == "rate_limit"
    assert "stripe-should-retry" not in (info.value.headers or {})
    assert fake.count_requests("/v1/billing/meter_events") == 1  # the SDK does not retry a rate-limit 429
    assert fake.totals_by_customer() == {}

    fake.set_faults(rate_429=0.0)
    send(client, "rl-1", 5)  # the identifier was never taken
    assert fake.totals_by_customer() == {CUSTOMER: 5}


def test_a_lock_timeout_429_says_retry_and_the_sdk_retries_with_the_same_key(make_fake: MakeFake) -> None:
    fake = make_fake()
    fake.fail_next("429_lock_timeout")
    send(fake.client(max_network_retries=1), "lt-1", 5)
    log = fake.request_log()
    assert [r["status"] for r in log] == [429, 200]
    assert log[0]["idempotency_key"] == log[1]["idempotency_key"]
    assert fake.totals_by_customer() == {CUSTOMER: 5}


def test_server_errors_before_recording_leave_no_trace(make_fake: MakeFake) -> None:
    fake = make_fake(seed=3, rate_500=1.0)
    with pytest.raises(stripe.APIError) as info:
        send(fake.client(), "se-1", 5)
    assert info.value.http_status == 500
    assert fake.events() == [] and fake.totals_by_customer() == {}


def test_the_sdk_retries_a_pre_record_500_and_the_event_counts_once(make_fake: MakeFake) -> None:
    fake = make_fake()
    fake.fail_next("500")
    send(fake.client(max_network_retries=1), "se-2", 5)
    assert [r["status"] for r in fake.request_log()] == [500, 200]
    assert fake.totals_by_customer() == {CUSTOMER: 5}


def run_seeded(fake: FakeStripe) -> tuple[list[str], dict[str, int]]:
    client = fake.client()
    outcomes, sent = [], 0
    for i in range(40):
        try:
            send(client, f"mix-{i}", i + 1)
            outcomes.append("ok")
            sent += i + 1
        except stripe.RateLimitError:
            outcomes.append("429")
        except stripe.APIError:
            outcomes.append("500")
    assert fake.totals_by_customer().get(CUSTOMER, 0) == sent  # only the successes were recorded
    return outcomes, fake.totals_by_customer()


def test_fault_rates_are_seeded_and_only_successes_are_recorded(make_fake: MakeFake) -> None:
    first = run_seeded(make_fake(seed=42, rate_429=0.2, rate_500=0.2))
    second = run_seeded(make_fake(seed=42, rate_429=0.2, rate_500=0.2))
    assert first == second
    assert {"ok", "429", "500"} <= set(first[0])

    fake = make_fake(seed=42, rate_429=0.2, rate_500=0.2)
    run_seeded(fake)
    fake.reset()  # restores the seed
    assert run_seeded(fake) == first


def test_fail_after_recording_with_a_500_then_a_resend_counts_once(make_fake: MakeFake) -> None:
    fake = make_fake()
    client = fake.client(max_network_retries=2)
    fake.fail_next("500_after_record")
    with pytest.raises(stripe.APIError) as info:
        send(client, "far-1", 8, idempotency_key="far-key")
    assert info.value.http_status == 500
    assert info.value.headers is not None and info.value.headers["stripe-should-retry"] == "false"
    assert fake.count_requests("/v1/billing/meter_events") == 1  # Stripe-Should-Retry: false stops the SDK
    assert fake.totals_by_customer() == {CUSTOMER: 8}  # ...but Stripe kept the event

    with pytest.raises(stripe.APIError):  # the same idempotency key replays the saved 500
        send(client, "far-1", 8, idempotency_key="far-key")
    with pytest.raises(stripe.InvalidRequestError) as dup:  # a fresh request is deduplicated by identifier
        send(client, "far-1", 8)
    assert dup.value.user_message == "An event already exists with identifier far-1."
    assert fake.totals_by_customer() == {CUSTOMER: 8}


def test_a_response_lost_after_recording_is_replayed_to_the_sdks_retry(make_fake: MakeFake) -> None:
    fake = make_fake()
    fake.fail_next("drop_after_record")
    event = send(fake.client(max_network_retries=1), "lost-1", 6)
    assert event.identifier == "lost-1"
    assert event.last_response.headers["idempotent-replayed"] == "true"
    assert [r["status"] for r in fake.request_log()] == [None, 200]
    assert fake.totals_by_customer() == {CUSTOMER: 6}


def test_a_lost_response_without_sdk_retries_then_a_resend_counts_once(make_fake: MakeFake) -> None:
    fake = make_fake(seed=5, fail_after_record_rate=1.0, fail_after_record_mode="drop")
    client = fake.client()
    with pytest.raises(stripe.APIConnectionError):
        send(client, "lost-2", 6)
    fake.set_faults(fail_after_record_rate=0.0)
    with pytest.raises(stripe.InvalidRequestError):
        send(client, "lost-2", 6)
    assert fake.totals_by_customer() == {CUSTOMER: 6}


def test_fail_after_recording_on_the_stream_then_a_resend_counts_once(make_fake: MakeFake) -> None:
    fake = make_fake()
    client = fake.client()
    stream = session_client(fake, client)
    batch = {"events": [stream_event("st-1", 2), stream_event("st-2", 3)]}
    fake.fail_next("drop_after_record", path="/v2/billing/meter_event_stream")
    with pytest.raises(stripe.APIConnectionError):
        stream.v2.billing.meter_event_stream.create(batch)  # type: ignore[arg-type]
    stream.v2.billing.meter_event_stream.create(batch)  # type: ignore[arg-type]
    assert fake.totals_by_customer() == {CUSTOMER: 5}
    assert fake.duplicates_rejected == 2


def test_fault_paths_limit_random_faults(make_fake: MakeFake) -> None:
    fake = make_fake(seed=1, rate_500=1.0, fault_paths=["/v2/"])
    client = fake.client()
    send(client, "fp-1", 1)  # v1 untouched
    with pytest.raises(stripe.APIError):
        client.v2.billing.meter_event_session.create()
    assert fake.faults()["fault_paths"] == ("/v2/",)


def test_outage_with_503s(fake: FakeStripe, client: stripe.StripeClient) -> None:
    with fake.outage():
        for i in range(3):
            with pytest.raises(stripe.APIError) as info:
                send(client, f"out-{i}", 1)
            assert info.value.http_status == 503
        with pytest.raises(stripe.APIError):
            client.v2.billing.meter_event_session.create()
    assert fake.events() == []
    send(client, "out-0", 1)
    assert fake.totals_by_customer() == {CUSTOMER: 1}


@pytest.mark.parametrize("mode", ["refuse", "reset"])
def test_outage_that_breaks_connections(fake: FakeStripe, client: stripe.StripeClient, mode: str) -> None:
    url = fake.url
    fake.start_outage(mode)
    with pytest.raises(stripe.APIConnectionError):
        send(client, "conn-1", 1)
    fake.end_outage()
    assert fake.url == url  # the same port listens again
    send(client, "conn-1", 1)
    assert fake.totals_by_customer() == {CUSTOMER: 1}


def test_latency_is_configurable_and_requests_still_succeed(fake: FakeStripe, client: stripe.StripeClient) -> None:
    fake.set_faults(latency_seconds=0.01)
    assert fake.faults()["latency_seconds"] == 0.01
    send(client, "lat-1", 1)
    assert fake.totals_by_customer() == {CUSTOMER: 1}


def test_invalid_fault_settings_are_refused(fake: FakeStripe) -> None:
    with pytest.raises(ValueError):
        fake.set_faults(rate_429=0.7, rate_500=0.7)
    with pytest.raises(ValueError):
        fake.fail_next("teapot")
    with pytest.raises(ValueError):
        fake.start_outage("flood")


# ---------------------------------------------------------------------------------------------------------------------
# Webhooks
# ---------------------------------------------------------------------------------------------------------------------


class Receiver:
    def __init__(self) -> None:
        received: list[tuple[bytes, dict[str, str]]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((body, {k.lower(): v for k, v in self.headers.items()}))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


SECRET = "whsec_test_secret"


@pytest.mark.parametrize(
    "event_type",
    [
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.paid",
        "invoice.payment_failed",
    ],
)
def test_webhooks_are_signed_like_stripe(fake: FakeStripe, receiver: Receiver, event_type: str) -> None:
    delivery = fake.send_webhook(receiver.url, event_type, None, SECRET, customer=CUSTOMER)
    assert delivery.status == 200
    ((body, headers),) = receiver.received
    assert headers["content-type"].startswith("application/json")

    event = stripe.Webhook.construct_event(body, headers["stripe-signature"], SECRET)
    assert event.type == event_type
    assert event.data.object.customer == CUSTOMER
    assert event.object == "event" and event.id.startswith("evt_")

    tampered = body.replace(CUSTOMER.encode(), b"cus_test_mallory")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(tampered, headers["stripe-signature"], SECRET)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, headers["stripe-signature"], "whsec_wrong")


def test_webhook_with_a_custom_object_and_an_old_timestamp(fake: FakeStripe, receiver: Receiver) -> None:
    sub = {"id": "sub_123", "object": "subscription", "customer": CUSTOMER, "status": "past_due"}
    delivery = fake.send_webhook(
        receiver.url,
        "customer.subscription.updated",
        sub,
        SECRET,
        previous_attributes={"status": "active"},
        timestamp=int(time.time()) - 3600,
    )
    event = stripe.Webhook.construct_event(delivery.payload, delivery.signature, SECRET, tolerance=None)  # type: ignore
    assert event.data.object.status == "past_due"
    assert event.data.previous_attributes.status == "active"
    with pytest.raises(stripe.SignatureVerificationError):  # outside the default 300 s tolerance
        stripe.Webhook.construct_event(delivery.payload, delivery.signature, SECRET)
    assert build_event("invoice.paid", customer=OTHER)["data"]["object"]["status"] == "paid"


def test_the_meter_error_report_thin_event_round_trips(
    fake: FakeStripe, client: stripe.StripeClient, receiver: Receiver
) -> None:
    send(client, "bad-1", 3, customer="cus_nobody")
    client.v1.billing.meter_events.create({"event_name": METER, "identifier": "bad-2", "payload": {"value": "1"}})
    thin = fake.error_report_event()
    assert "data" not in thin
    fake.send_event(receiver.url, thin, SECRET)
    ((body, headers),) = receiver.received

    notification = client.parse_event_notification(body, headers["stripe-signature"], SECRET)
    assert type(notification).__name__ == "V1BillingMeterErrorReportTriggeredEventNotification"
    assert notification.type == "v1.billing.meter.error_report_triggered"

    event = notification.fetch_event()  # GET /v2/core/events/{id}
    assert event.data.reason.error_count == 2
    assert sorted(t.code for t in event.data.reason.error_types) == [
        "meter_event_customer_not_found",
        "meter_event_no_customer_defined",
    ]
    assert notification.fetch_related_object().id == fake.meter(METER)["id"]  # GET /v1/billing/meters/{id}

    with pytest.raises(stripe.SignatureVerificationError):
        client.parse_event_notification(body + b" ", headers["stripe-signature"], SECRET)
    with pytest.raises(LookupError):  # everything was reported
        fake.error_report_event()


# ---------------------------------------------------------------------------------------------------------------------
# Inspection, concurrency, CLI
# ---------------------------------------------------------------------------------------------------------------------


def test_inspection_and_reset(fake: FakeStripe, client: stripe.StripeClient) -> None:
    send(client, "i-1", 1)
    send(client, "i-2", 2, event_name=TOKENS, dimensions={"model": "gpt-6-sol", "token_type": "input"})
    assert fake.totals_by_customer() == {CUSTOMER: 3}
    assert fake.totals_by_customer(METER) == {CUSTOMER: 1}
    assert [e["identifier"] for e in fake.events()] == ["i-1", "i-2"]
    assert fake.count_requests("/v1/billing/meter_events") == 2
    assert fake.count_requests("/v1/billing/meter_events", method="GET") == 0
    assert fake.count_requests("/v1/billing/meter_events", status=200) == 2

    fake.set_faults(rate_500=1.0)
    fake.advance_time(100)
    fake.reset()
    assert fake.events() == [] and fake.request_log() == [] and fake.duplicates_rejected == 0
    assert fake.faults()["rate_500"] == 0.0
    send(client, "i-1", 1)  # identifiers forgotten, meters and customers kept
    assert fake.totals_by_customer() == {CUSTOMER: 1}


def test_concurrent_senders_are_all_counted_exactly_once(fake: FakeStripe) -> None:
    client = fake.client()

    def work(i: int) -> str:
        try:
            send(client, f"cc-{i % 200}", 1)  # every identifier is sent twice, by racing threads
            return "ok"
        except stripe.InvalidRequestError:
            return "duplicate"

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(work, range(400)))
    assert outcomes.count("ok") == 200
    assert fake.totals_by_customer() == {CUSTOMER: 200}
    assert fake.duplicates_rejected == 200


def test_form_parser_handles_bracket_notation() -> None:
    assert parse_form("a=1&payload[x]=2&payload[y]=3&expand[0]=p&expand[1]=q&c[d][e]=f") == {
        "a": "1",
        "payload": {"x": "2", "y": "3"},
        "expand": ["p", "q"],
        "c": {"d": {"e": "f"}},
    }


def test_cli_serves_until_interrupted(tmp_path: Path) -> None:
    python_dir = Path(__file__).resolve().parents[3] / "python"
    stderr = (tmp_path / "fake_stripe.stderr").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendgate.testing.fake_stripe", "--customer", CUSTOMER],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={"PYTHONPATH": str(python_dir), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert proc.stdout is not None
        api = proc.stdout.readline().split()[-1]
        meter_events = proc.stdout.readline().split()[-1]
        client = stripe.StripeClient(DEFAULT_API_KEY, base_addresses={"api": api, "meter_events": meter_events})
        event = send(client, "cli-1", 4)
        assert event.identifier == "cli-1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        stderr.close()
    assert (tmp_path / "fake_stripe.stderr").read_text() == ""


# ---------------------------------------------------------------------------------------------------------------------
# What Stripe does that tests must be able to meet: deleted customers, inactive meters, eventual consistency, refusals
# ---------------------------------------------------------------------------------------------------------------------


def test_a_deleted_customer_is_retrieved_as_stripes_deleted_customer_object(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    deleted = client.v1.customers.delete(CUSTOMER)
    assert (deleted.id, deleted.object, deleted.deleted) == (CUSTOMER, "customer", True)
    again = client.v1.customers.retrieve(CUSTOMER)
    assert again.deleted is True and getattr(again, "email", None) is None
    fake.delete_customer(OTHER)
    assert client.v1.customers.retrieve(OTHER).deleted is True
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.customers.delete("cus_never")
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"


def test_a_deactivated_meter_refuses_events_until_reactivated(fake: FakeStripe, client: stripe.StripeClient) -> None:
    meter_id = fake.meter(METER)["id"]
    inactive = client.v1.billing.meters.deactivate(meter_id)
    assert inactive.status == "inactive" and inactive.status_transitions.deactivated_at
    with pytest.raises(stripe.InvalidRequestError) as v1:
        send(client, "off-1")
    assert v1.value.http_status == 400 and "No active meter found" in str(v1.value.user_message)
    with pytest.raises(stripe.StripeError) as v2:
        client.v2.billing.meter_events.create(
            {
                "event_name": METER,
                "identifier": "off-2",  # type: ignore[arg-type]
                "payload": {"stripe_customer_id": CUSTOMER, "value": "1"},
            }
        )
    assert v2.value.code == "archived_meter"
    assert client.v1.billing.meters.reactivate(meter_id).status == "active"
    send(client, "on-1", 3)
    assert fake.totals_by_customer() == {CUSTOMER: 3}


def test_summaries_and_cancellations_land_after_the_visibility_delay(make_fake: MakeFake) -> None:
    fake = make_fake(visibility_delay_seconds=120)
    client = fake.client()
    meter_id = fake.meter(METER)["id"]
    now = int(fake.now())
    day = now - now % 86_400
    send(client, "late-1", 10, timestamp=now - 60)

    def summed() -> float:
        listed = client.v1.billing.meters.event_summaries.list(
            meter_id, {"customer": CUSTOMER, "start_time": day - 86_400, "end_time": day + 86_400}
        )
        return sum(s.aggregated_value for s in listed.data)

    assert summed() == 0, "accepted, not yet in the summaries"
    fake.advance_time(121)
    assert summed() == 10
    client.v1.billing.meter_event_adjustments.create(
        {
            "event_name": METER,
            "type": "cancel",  # type: ignore[arg-type]
            "cancel": {"identifier": "late-1"},
        }
    )
    assert summed() == 10, "the cancellation is not visible yet"
    fake.advance_time(121)
    assert summed() == 0


def test_a_payload_value_over_100_characters_is_refused(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.billing.meter_events.create(
            {
                "event_name": METER,
                "identifier": "long-1",  # type: ignore[arg-type]
                "payload": {"stripe_customer_id": CUSTOMER, "value": "1", "model": "m" * 101},
            }
        )
    assert refused.value.code == "parameter_invalid_string" and refused.value.param == "payload[model]"


# ---------------------------------------------------------------------------------------------------------------------
# Invoices
# ---------------------------------------------------------------------------------------------------------------------


def test_the_invoice_list_is_newest_first_filtered_and_paged_like_stripe(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    now = int(time.time())
    old = fake.add_invoice(CUSTOMER, 1_000, created=now - 60 * 86_400)["id"]
    void = fake.add_invoice(CUSTOMER, 5, status="void", created=now - 45 * 86_400)["id"]
    last = fake.add_invoice(CUSTOMER, 2_000, created=now - 30 * 86_400)["id"]
    other = fake.add_invoice(OTHER, 7, created=now - 10)["id"]
    draft = fake.create_draft_invoice(CUSTOMER, 3_000)["id"]

    first = client.v1.invoices.list({"customer": CUSTOMER, "limit": 2})
    assert [i.id for i in first.data] == [draft, last] and first.has_more
    assert first.url == "/v1/invoices" and first.data[0].status == "draft" and first.data[0].auto_advance is True
    rest = client.v1.invoices.list({"customer": CUSTOMER, "limit": 2, "starting_after": last})
    assert [i.id for i in rest.data] == [void, old] and not rest.has_more
    back = client.v1.invoices.list({"customer": CUSTOMER, "limit": 1, "ending_before": void})
    assert [i.id for i in back.data] == [last]
    assert [i.id for i in client.v1.invoices.list({"customer": CUSTOMER, "status": "paid"}).auto_paging_iter()] == [
        last,
        old,
    ]
    assert [i.id for i in client.v1.invoices.list().data] == [draft, other, last, void, old]
    assert [i.id for i in client.v1.invoices.list({"created": {"gte": now - 31 * 86_400}}).data] == [draft, other, last]
    paid = client.v1.invoices.retrieve(last)
    assert (paid.total, paid.amount_due, paid.currency, paid.customer, paid.object) == (
        2_000,
        2_000,
        "usd",
        CUSTOMER,
        "invoice",
    )
    for bad in ({"limit": 101}, {"status": "late"}, {"colour": "red"}):
        with pytest.raises(stripe.InvalidRequestError):
            client.v1.invoices.list(bad)  # type: ignore[arg-type]


def test_auto_advance_false_keeps_a_draft_from_being_finalized(fake: FakeStripe, client: stripe.StripeClient) -> None:
    held = fake.create_draft_invoice(CUSTOMER, 3_000)["id"]
    due = fake.create_draft_invoice(OTHER, 10)["id"]
    assert client.v1.invoices.update(held, {"auto_advance": False}).auto_advance is False
    assert fake.finalize_due_drafts() == [due]
    assert fake.invoice(held)["status"] == "draft" and fake.invoice(due)["status"] == "open"
    assert client.v1.invoices.update(held, {"auto_advance": True}).auto_advance is True
    assert fake.finalize_due_drafts() == [held]
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.invoices.retrieve("in_nope")
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"
    assert "No such invoice: 'in_nope'" in str(missing.value)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.update("in_nope", {"auto_advance": True})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.update(held, {"total": 5})  # type: ignore[typeddict-unknown-key]


def test_invoice_created_is_delivered_signed_with_the_stored_draft(fake: FakeStripe, receiver: Receiver) -> None:
    draft = fake.create_draft_invoice(CUSTOMER, 4_200)["id"]
    delivery = fake.send_invoice_created(receiver.url, draft, SECRET)
    assert delivery.status == 200
    ((body, headers),) = receiver.received
    event = stripe.Webhook.construct_event(body, headers["stripe-signature"], SECRET)
    assert event.type == "invoice.created" and event.data.object.id == draft
    assert (event.data.object.status, event.data.object.total, event.data.object.auto_advance) == ("draft", 4_200, True)


def test_injected_usage_counts_in_the_summaries_despite_the_visibility_delay(make_fake: MakeFake) -> None:
    fake = make_fake(visibility_delay_seconds=3_600)
    client = fake.client()
    meter = fake.meter(METER)["id"]
    start = int(time.time()) // 60 * 60 - 3_600
    send(client, "sent-1", 7)
    fake.inject_meter_event(METER, CUSTOMER, 500)

    def total() -> int:
        params: Any = {"customer": CUSTOMER, "start_time": start, "end_time": start + 7_200}
        return int(sum(s.aggregated_value for s in client.v1.billing.meters.event_summaries.list(meter, params)))

    assert total() == 500  # the sent event is not visible for an hour; the injected one is
    assert fake.totals_by_customer() == {CUSTOMER: 507}
    fake.advance_time(3_600)
    assert total() == 507

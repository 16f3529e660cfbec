"""spendgate.alerts: the alert webhook's body and its Stripe-style signature, as a receiver verifies it."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from spendgate.alerts import SignatureVerificationError, signature_header, verify_signature, webhook_body

SECRET = "a-receiver-secret-0123456789abcdef"
NOW_S = 1_800_000_000
ALERT = {
    "seq": 42,
    "kind": "limit_reached",
    "customer_id": "cus_é",
    "ts_ms": 1_799_999_999_000,
    "message": 'budget "cus_é" reached its limit',
    "values": {"limit": 100, "spent": 100},
}


def test_the_body_carries_every_field_with_a_stable_id() -> None:
    body = webhook_body(ALERT)
    assert json.loads(body) == {"id": "alert_42", **ALERT}
    assert webhook_body(dict(ALERT)) == body  # the same bytes on every redelivery


def test_alert_ids_are_unique_across_instances_and_restores() -> None:
    """A restore rewinds the seq; the instance id that raised an alert does not repeat."""
    before = {**ALERT, "instance_id": "00000000000000a1"}
    after = {**ALERT, "instance_id": "00000000000000b2"}
    ids = {json.loads(webhook_body(alert))["id"] for alert in (ALERT, before, after)}
    assert ids == {"alert_42", "alert_00000000000000a1_42", "alert_00000000000000b2_42"}


def test_the_signature_is_hmac_sha256_of_t_dot_body_as_documented() -> None:
    body = webhook_body(ALERT)
    header = signature_header(body, SECRET, timestamp_s=NOW_S)
    expected = hmac.new(SECRET.encode(), f"{NOW_S}.".encode() + body, hashlib.sha256).hexdigest()
    assert header == f"t={NOW_S},v1={expected}"
    verify_signature(body, header, SECRET, now_s=NOW_S)
    verify_signature(body.decode(), header, SECRET, now_s=NOW_S + 300)  # text payloads, at the tolerance's edge


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"secret": "another-secret-of-the-same-length!"}, "no signature matches"),
        ({"payload": b'{"id":"alert_43"}'}, "no signature matches"),
        ({"now_s": NOW_S + 301}, "more than the 300 s"),
        ({"now_s": NOW_S - 301}, "more than the 300 s"),
        ({"header": ""}, "no Spendgate-Signature header"),
        ({"header": None}, "no Spendgate-Signature header"),
        ({"header": "v1=abc"}, "no t="),
        ({"header": f"t={NOW_S}"}, "no v1="),
        ({"header": "t=soon,v1=abc"}, "not an integer"),
        ({"header": "t=1," + "v1=0," * 1000}, "longer than"),
        ({"secret": ""}, "no secret"),
    ],
)
def test_a_wrong_secret_an_altered_body_a_stale_or_malformed_header_fails(change: dict[str, object], why: str) -> None:
    body = webhook_body(ALERT)
    arguments: dict[str, object] = {
        "payload": body,
        "header": signature_header(body, SECRET, timestamp_s=NOW_S),
        "secret": SECRET,
        "now_s": NOW_S,
    }
    arguments.update(change)
    with pytest.raises(SignatureVerificationError, match=why):
        verify_signature(**arguments)  # type: ignore[arg-type]


def test_one_matching_signature_among_several_is_enough_and_other_schemes_are_ignored() -> None:
    body = webhook_body(ALERT)
    good = signature_header(body, SECRET, timestamp_s=NOW_S).split(",")[1]
    verify_signature(body, f"t={NOW_S},v0=zzz,v1={'0' * 64},{good}", SECRET, now_s=NOW_S)


def test_a_zero_tolerance_skips_the_age_check() -> None:
    body = webhook_body(ALERT)
    verify_signature(body, signature_header(body, SECRET, timestamp_s=NOW_S), SECRET, 0, now_s=NOW_S + 86_400)

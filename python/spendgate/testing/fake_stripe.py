"""A fake Stripe HTTP API for tests and demos: the Billing Meters surface spendgate's settler uses, driven by the
real `stripe` SDK over real HTTP.

    with FakeStripe(meters=["spendgate_usage"], customers=["cus_a"]) as fake:
        client = fake.client()                    # a stripe.StripeClient whose base addresses point at the fake
        client.v1.billing.meter_events.create({"event_name": "spendgate_usage", "identifier": "led-1",
                                               "payload": {"stripe_customer_id": "cus_a", "value": "7"}})
        assert fake.totals_by_customer() == {"cus_a": 7}

Two HTTP servers run on 127.0.0.1, one per Stripe base address: `fake.url` plays https://api.stripe.com and
`fake.meter_events_url` plays https://meter-events.stripe.com (only the v2 meter event stream lives there, as in
Stripe). `FakeStripe(same_host=True)` serves everything from one port instead (then `url == meter_events_url`).

What it implements (each wire fact is annotated with its source where the code relies on it):
- v1 meter events (form encoded), with identifier dedup, Stripe's validation, async errors you can query;
- v2 meter event session + stream (JSON, session-token auth, 15-minute tokens), v2 synchronous meter events;
- meters (create, list, retrieve, event summaries), meter event adjustments (v1 and v2), minimal customers;
- meter dimensions (a preview feature: `dimension_payload_keys` on a meter, `dimension_group_by_keys` and
  `dimension_filters` on its event summaries), as Stripe's LLM token-billing meter `token-billing-tokens` uses them;
- v1 idempotency-key replay (saved response, including 500s; `Idempotent-Replayed: true`);
- signed webhook delivery (snapshot events and thin v2 events), with helpers that build the event bodies;
- fault injection decided before the request executes (429, 500, 503 outage, refused/reset connections, latency),
  plus "fail after recording" (500 or a dropped response after the event was stored), seedable;
- a thread-safe inspection API: totals_by_customer(), events(), errors(), request_log(), count_requests(), ...

Time: every rule that depends on "now" (dedup window, 35-day/5-minute timestamp window, 24 h cancel window, session
expiry, idempotency-key lifetime) reads the fake's clock, `fake.now()`. Tests move it with `fake.advance_time(s)`
instead of sleeping. Webhook signatures use the wall clock, because the SDK checks them against time.time().

CLI for demos: `python -m spendgate.testing.fake_stripe --port 12111 --meter spendgate_usage --customer cus_demo`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import hmac
import http.server
import json
import random
import re
import secrets
import socket
import string
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import EllipsisType, TracebackType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import stripe

__all__ = [
    "DEFAULT_API_KEY",
    "FakeStripe",
    "WebhookDelivery",
    "build_event",
    "invoice_object",
    "sign_payload",
    "subscription_object",
]

# ---------------------------------------------------------------------------------------------------------------------
# Facts about Stripe's wire format this fake relies on, with where each one was looked up.
# ---------------------------------------------------------------------------------------------------------------------

DEFAULT_API_KEY: Final[str] = "sk_test_spendgate_fake"

# Secret and restricted test-mode keys: sk_test_..., rk_test_... (https://docs.stripe.com/keys). Live keys are refused:
# this is a test double.
_API_KEY_RE: Final = re.compile(r"^(sk|rk)_test_[A-Za-z0-9_]+$")

# "Must be within the past 35 calendar days or up to 5 minutes in the future" (the `timestamp` parameter of
# https://docs.stripe.com/api/billing/meter-event/create; same text in
# stripe/params/billing/_meter_event_create_params.py and stripe/v2/billing/_meter_event.py of the installed SDK).
# "Calendar days" is modelled as 35 * 86400 seconds.
MAX_EVENT_AGE_S: Final[int] = 35 * 86_400
MAX_EVENT_SKEW_S: Final[int] = 5 * 60

# "We will enforce uniqueness within a rolling period of at least 24 hours" (identifier, v1 meter event create docs;
# v2: "within a rolling 24 hour period", stripe/v2/billing/_meter_event.py). The fake forgets after exactly 24 h by
# default; set dedup_window_seconds to model a longer memory.
DEFAULT_DEDUP_WINDOW_S: Final[int] = 24 * 3600

# "You can only cancel events within 24 hours of Stripe receiving them" (cancel.identifier,
# https://docs.stripe.com/api/billing/meter-event-adjustment/create and the v2 adjustment docs).
CANCEL_WINDOW_S: Final[int] = 24 * 3600

# "Authentication tokens are only valid for 15 minutes" (docstring of MeterEventSessionService.create in
# stripe/v2/billing/_meter_event_session_service.py; https://docs.stripe.com/api/v2/billing-meter-stream).
DEFAULT_SESSION_TTL_S: Final[int] = 15 * 60

# "List of meter events to include in the request. Supports up to 100 events per request."
# (stripe/params/v2/billing/_meter_event_stream_create_params.py; https://docs.stripe.com/api/v2/billing/meter-event-stream/create)
MAX_STREAM_EVENTS: Final[int] = 100

# Idempotency keys: "up to 255 characters long"; "You can remove keys from the system automatically after they're at
# least 24 hours old" (https://docs.stripe.com/api/idempotent_requests).
MAX_IDEMPOTENCY_KEY_LEN: Final[int] = 255
IDEMPOTENCY_KEY_TTL_S: Final[int] = 24 * 3600

# event_name and identifier: "The maximum length is 100 characters." (v1 meter event create docs)
MAX_NAME_LEN: Final[int] = 100

# 2026-04-22.dahlia changelog: values with more than 15 significant digits are rejected, 400 on the synchronous API,
# async code meter_event_value_too_many_digits
# (https://docs.stripe.com/changelog/dahlia/2026-04-22/billing-meter-event-values-validation).
MAX_VALUE_DIGITS: Final[int] = 15

# Codes of the async meter event error report (the Literal of ErrorType.code in
# stripe/events/_v1_billing_meter_error_report_triggered_event.py).
ASYNC_ERROR_CODES: Final[frozenset[str]] = frozenset(
    {
        "archived_meter",
        "meter_event_customer_not_found",
        "meter_event_dimension_count_too_high",
        "meter_event_invalid_value",
        "meter_event_no_customer_defined",
        "meter_event_value_too_many_digits",
        "missing_dimension_payload_keys",
        "no_meter",
        "timestamp_in_future",
        "timestamp_too_far_in_past",
    }
)

# The message Stripe sends for a repeated identifier on POST /v1/billing/meter_events: 400 invalid_request_error,
# "An event already exists with identifier <id>." and `stripe-should-retry: false`, with no `code` (observed in
# https://github.com/langfuse/langfuse/pull/16292; several public integrations match on this text because the error
# "arrives with code: undefined").
_V1_DUPLICATE_MESSAGE: Final[str] = "An event already exists with identifier {identifier}."

# POST /v2/billing/meter_events documents `400 duplicate_meter_event` "A meter event with a duplicate identifier has
# already been submitted." (error table of https://docs.stripe.com/api/v2/billing/meter-event/create; the schema
# v2.error.duplicate_meter_event in stripe/openapi spec3).
_V2_DUPLICATE_MESSAGE: Final[str] = "A meter event with a duplicate identifier has already been submitted."

# Unknown event_name on v1: several integrations quote Stripe's text `No active meter found for event name "<name>".`
# (no `code` seen). The v2 synchronous endpoint documents `400 no_meter` "A meter must exist to submit events.".
_V1_NO_METER_MESSAGE: Final[str] = 'No active meter found for event name "{event_name}".'

# Expired session token on the stream: 401, code billing_meter_event_session_expired, type temporary_session_expired
# (error table of https://docs.stripe.com/api/v2/billing/meter-event-stream/create; schema
# v2.error.billing_meter_event_session_expired requires code, doc_url, message, type). The SDK maps type
# "temporary_session_expired" to stripe.TemporarySessionExpiredError (stripe/_api_requestor.py specific_v2_api_error).
_SESSION_EXPIRED_MESSAGE: Final[str] = "The temporary session token has expired."

# 429s. A rate-limited request has code `rate_limit`; stripe/_api_requestor.py maps 429 (and legacy 400 + rate_limit)
# to stripe.RateLimitError. Stripe's rate-limit docs (https://docs.stripe.com/rate-limits) say the SDKs retry 429s
# caused by lock timeouts but not rate-limit 429s; the installed SDK retries a 4xx only when the response carries
# `Stripe-Should-Retry: true` (stripe/_http_client.py HTTPClient._should_retry), so a lock-timeout 429 carries
# `Stripe-Should-Retry: true` and a rate-limit 429 carries no such header. Message texts as seen in public reports
# (lock_timeout: https://github.com/stripe/stripe-node/issues/2056).
_RATE_LIMIT_MESSAGE: Final[str] = (
    "Request rate limit exceeded. You can learn more about rate limits here https://stripe.com/docs/rate-limits."
)
_LOCK_TIMEOUT_MESSAGE: Final[str] = (
    "This object cannot be accessed right now because another API request or Stripe process is currently accessing "
    "it. If you see this error intermittently, retry the request. If you see this error frequently and are making "
    "multiple concurrent requests to a single object, make your requests serially or at a lower rate."
)

# API v1 idempotency: "Stripe saves the status code and body of the first request made with a given idempotency key
# after endpoint execution begins. Retries with the same key return the saved response, including 500 errors."
# "We save results only after the execution of an endpoint begins. If incoming parameters fail validation, or the
# request conflicts with another that's executing concurrently, we don't save any idempotent result"; a key reused
# with different parameters is an error (https://docs.stripe.com/api/idempotent_requests). The SDK raises
# stripe.IdempotencyError for `type: idempotency_error` and sends one Idempotency-Key per call, reused across its own
# retries (stripe/_api_requestor.py request_headers; stripe/_http_client.py _request_with_retries_internal). The
# SDK's own comment: "we expect the stripe-should-retry header to be false in most cases when a 500 is returned,
# since our idempotency framework would typically replay it anyway" (stripe/_http_client.py).
_IDEMPOTENCY_MISMATCH_MESSAGE: Final[str] = (
    "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a "
    "key other than '{key}' if you meant to execute a different request."
)

# Stripe-Signature: "t=<unix>,v1=<hex HMAC-SHA256(secret, f'{t}.{payload}')>" (stripe/_webhook.py
# WebhookSignature.generate_signature_header / verify_header; https://docs.stripe.com/webhooks#verify-manually).
_WEBHOOK_USER_AGENT: Final[str] = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"

# The API version the installed SDK pins (stripe/_api_version.py _ApiVersion.CURRENT); echoed on snapshot events.
try:  # the server itself needs only the standard library
    from stripe._api_version import _ApiVersion  # noqa: PLC2701

    _API_VERSION: str = _ApiVersion.CURRENT
except (ImportError, AttributeError):  # pragma: no cover - stripe is a project dependency
    _API_VERSION = "2026-10-28.endive"

_HOSTS: Final[tuple[str, str]] = ("api", "meter_events")

# Meter dimensions are a preview feature; its reference text (Stripe's API reference, preview version): a meter's
# `dimension_payload_keys` "Set of keys that will be used to group meter events by. Each key must be present in the
# event payload."; the summaries' `dimension_group_by_keys` "List of dimension payload keys to group by. If specified,
# event summaries will be grouped by the given dimension payload key values." and `dimension_filters` "Key-value pairs
# used to filter meter events by dimension values. If specified, event summaries will be generated with only matching
# meter events."; a summary's `dimensions` "Key-value pairs of dimension values for event summaries with grouping on
# dimensions." An event missing a key fails the asynchronous validation with `missing_dimension_payload_keys` (a code of
# the error report, stripe/events/_v1_billing_meter_error_report_triggered_event.py); its message text is not
# documented. Stripe's token-billing meter: event name `token-billing-tokens`, dimension payload keys `model` and
# `token_type` (vercel.com/docs/ai-gateway/ecosystem/stripe-billing, "Prerequisites").
TOKEN_BILLING_METER: Final[Mapping[str, Any]] = {
    "event_name": "token-billing-tokens",
    "dimension_payload_keys": ("model", "token_type"),
}
DEFAULT_METERS: Final[tuple[str | Mapping[str, Any], ...]] = ("spendgate_usage", TOKEN_BILLING_METER)

# Fault kinds accepted by fail_next(); "*_after_record" ones only fire on requests that store meter events.
PRE_FAULTS: Final[frozenset[str]] = frozenset({"429", "429_lock_timeout", "500", "503", "reset"})
AFTER_RECORD_FAULTS: Final[frozenset[str]] = frozenset({"500_after_record", "drop_after_record"})
OUTAGE_MODES: Final[frozenset[str]] = frozenset({"503", "reset", "refuse"})


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------------


def _rand(n: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _rfc3339(ts: float) -> str:
    """v2 timestamps look like "2024-06-01T12:00:00.000Z" (examples on https://docs.stripe.com/api/v2/billing-meter)."""
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _parse_rfc3339(value: str) -> float:
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return dt.timestamp()


def _redact_key(key: str) -> str:
    return key[:8] + "*" * 4 + key[-4:] if len(key) > 12 else "****"


def _set_path(target: dict[str, Any], parts: list[str], value: str) -> None:
    node: Any = target
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = int(part) if part.isdigit() else len(node)
            while len(node) <= idx:
                node.append(None)
            if last:
                node[idx] = value
            else:
                if node[idx] is None:
                    node[idx] = [] if parts[i + 1].isdigit() or parts[i + 1] == "" else {}
                node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                if part not in node:
                    node[part] = [] if parts[i + 1].isdigit() or parts[i + 1] == "" else {}
                node = node[part]


def parse_form(body: str) -> dict[str, Any]:
    """Decode v1 form encoding with bracket notation (`payload[value]=5`, `expand[0]=x`) into nested dicts/lists.

    The SDK encodes nested params as `key[sub]` and lists as `key[0]`, un-escaping the brackets
    (stripe/_encode.py _api_encode; stripe/_api_requestor.py: "changing the square bracket control characters back to
    their literals")."""
    out: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(body, keep_blank_values=True):
        head, _, rest = key.partition("[")
        parts = [head] + ([p for p in rest.rstrip("]").split("][")] if rest else [])
        _set_path(out, parts, value)
    return out


def _int_param(params: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        if required:
            raise _ApiError.missing(name)
        return None
    try:
        return int(str(raw))
    except ValueError:
        raise _ApiError(
            400, "invalid_request_error", f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name
        ) from None


def _check_unknown(params: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed_set = set(allowed)
    for name in params:
        if name not in allowed_set:
            raise _ApiError(
                400,
                "invalid_request_error",
                f"Received unknown parameter: {name}",
                code="parameter_unknown",
                param=name,
            )


class _ApiError(Exception):
    """A Stripe-shaped error response: {"error": {"type", "code", "message", "param", "doc_url"}}
    (https://docs.stripe.com/api/errors)."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        cacheable: bool = True,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.cacheable = cacheable  # False when the endpoint never began executing (no idempotent result saved)

    @classmethod
    def missing(cls, name: str) -> _ApiError:
        return cls(
            400,
            "invalid_request_error",
            f"Missing required param: {name}.",
            code="parameter_missing",
            param=name,
            cacheable=False,
        )

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code:
            err["code"] = self.code
            err["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            err["param"] = self.param
        return {"error": err}


_Handled = tuple[int, Any, dict[str, str]]  # what a route handler returns: status, JSON body, extra headers


@dataclasses.dataclass
class _Request:
    host: str  # "api" or "meter_events"
    method: str
    path: str
    query: dict[str, Any]
    headers: dict[str, str]  # lower-cased names
    body: str


@dataclasses.dataclass
class _Response:
    status: int
    body: Any  # a JSON-able object
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    drop: bool = False  # close the connection without answering


@dataclasses.dataclass
class WebhookDelivery:
    """What send_webhook() did: the POSTed body and signature, and the receiver's answer."""

    status: int
    body: bytes
    payload: str
    signature: str
    event: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------------
# Event bodies for webhooks
# ---------------------------------------------------------------------------------------------------------------------


def sign_payload(payload: str, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header for `payload`: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<payload>")>
    (stripe/_webhook.py WebhookSignature; https://docs.stripe.com/webhooks#verify-manually)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode("utf-8"), f"{t}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def subscription_object(
    customer: str,
    *,
    status: str = "active",
    subscription_id: str | None = None,
    price_id: str = "price_fake_metered",
    meter_id: str | None = None,
    period_start: int | None = None,
    period_end: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A minimal `subscription` object (https://docs.stripe.com/api/subscriptions/object). Since API 2025-03-31 the
    billing period lives on each item (`items.data[].current_period_start/end`)."""
    now = int(time.time())
    start = now if period_start is None else period_start
    end = start + 30 * 86_400 if period_end is None else period_end
    sub_id = subscription_id or f"sub_{_rand(24)}"
    obj: dict[str, Any] = {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "livemode": False,
        "created": start,
        "start_date": start,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "ended_at": None,
        "metadata": {},
        "collection_method": "charge_automatically",
        "currency": "usd",
        "items": {
            "object": "list",
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={sub_id}",
            "data": [
                {
                    "id": f"si_{_rand(14)}",
                    "object": "subscription_item",
                    "subscription": sub_id,
                    "current_period_start": start,
                    "current_period_end": end,
                    "price": {
                        "id": price_id,
                        "object": "price",
                        "type": "recurring",
                        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
                    },
                }
            ],
        },
    }
    if status == "canceled":
        obj["canceled_at"] = obj["ended_at"] = now
    obj.update(fields)
    return obj


def invoice_object(
    customer: str,
    *,
    status: str = "paid",
    amount_due: int = 0,
    amount_paid: int | None = None,
    subscription_id: str | None = None,
    invoice_id: str | None = None,
    period_start: int | None = None,
    period_end: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A minimal `invoice` object (https://docs.stripe.com/api/invoices/object). With a subscription_id, a renewal
    (billing_reason subscription_cycle) with one subscription line item (https://docs.stripe.com/api/invoice-line-item/
    object: `parent.type` subscription_item_details since 2025-03-31.basil) for a licensed price, billed in advance:
    its `period` is the new period, [period_start, period_end) (default: now .. now + 30 days), while the invoice's
    own period_start/period_end are the previous period's ("the earliest/latest timestamp at which invoice items can
    be associated with this invoice", stripe/_invoice.py)."""
    now = int(time.time())
    paid = amount_due if amount_paid is None else amount_paid
    invoice_id = invoice_id or f"in_{_rand(24)}"
    lines: list[dict[str, Any]] = []
    if subscription_id:
        start = now if period_start is None else period_start
        end = start + 30 * 86_400 if period_end is None else period_end
        lines.append({
            "id": f"il_{_rand(24)}", "object": "line_item", "amount": amount_due, "currency": "usd",
            "description": "1 x plan", "invoice": invoice_id, "livemode": False, "metadata": {},
            "parent": {"type": "subscription_item_details", "invoice_item_details": None,
                       "subscription_item_details": {"subscription": subscription_id,
                                                     "subscription_item": f"si_{_rand(14)}", "proration": False,
                                                     "invoice_item": None, "proration_details": None}},
            "period": {"start": start, "end": end}, "quantity": 1,
        })  # fmt: skip
    obj: dict[str, Any] = {
        "id": invoice_id,
        "object": "invoice",
        "customer": customer,
        "status": status,
        "livemode": False,
        "created": now,
        "currency": "usd",
        "amount_due": amount_due,
        "amount_paid": paid if status == "paid" else 0,
        "amount_remaining": 0 if status == "paid" else amount_due,
        "attempt_count": 1,
        "attempted": True,
        "billing_reason": "subscription_cycle",
        "metadata": {},
        "period_start": now - 30 * 86_400,
        "period_end": now,
        "parent": (
            {"type": "subscription_details", "subscription_details": {"subscription": subscription_id}}
            if subscription_id
            else None
        ),
        "lines": {"object": "list", "data": lines, "has_more": False, "url": f"/v1/invoices/{invoice_id}/lines"},
    }
    obj.update(fields)
    return obj


_DEFAULT_OBJECTS: Final[dict[str, Callable[..., dict[str, Any]]]] = {
    "customer.subscription.created": lambda c: subscription_object(c, status="active"),
    "customer.subscription.updated": lambda c: subscription_object(c, status="active"),
    "customer.subscription.deleted": lambda c: subscription_object(c, status="canceled"),
    "invoice.paid": lambda c: invoice_object(c, status="paid", amount_due=1000),
    "invoice.payment_failed": lambda c: invoice_object(c, status="open", amount_due=1000, amount_paid=0),
}


def build_event(
    event_type: str,
    data_object: Mapping[str, Any] | None = None,
    *,
    customer: str = "cus_fake",
    previous_attributes: Mapping[str, Any] | None = None,
    event_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A snapshot `event` (https://docs.stripe.com/api/events/object) as webhooks deliver it. Without `data_object`,
    the known types (customer.subscription.created/updated/deleted, invoice.paid, invoice.payment_failed) get a
    default object for `customer`."""
    if data_object is None:
        if event_type not in _DEFAULT_OBJECTS:
            raise ValueError(f"no default object for {event_type!r}; pass data_object")
        data_object = _DEFAULT_OBJECTS[event_type](customer)
    data: dict[str, Any] = {"object": dict(data_object)}
    if previous_attributes is not None:
        data["previous_attributes"] = dict(previous_attributes)
    return {
        "id": event_id or f"evt_{_rand(24)}",
        "object": "event",
        "api_version": _API_VERSION,
        "created": int(time.time()) if created is None else created,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The HTTP plumbing: one listening server per base address
# ---------------------------------------------------------------------------------------------------------------------

# A payload value of a meter event: `additionalProperties {maxLength: 100, type: string}` (billing.meter_event.payload).
MAX_PAYLOAD_VALUE_CHARS: Final[int] = 100


def _check_payload_values(payload: Mapping[str, Any]) -> None:
    for key, value in payload.items():
        if isinstance(value, str) and len(value) > MAX_PAYLOAD_VALUE_CHARS:
            raise _ApiError(
                400,
                "invalid_request_error",
                f"Invalid payload[{key}]: must be at most {MAX_PAYLOAD_VALUE_CHARS} characters",
                code="parameter_invalid_string",
                param=f"payload[{key}]",
            )


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "FakeStripe/1.0"
    sys_version = ""
    # Keep-alive, as Stripe's API does (HTTP/1.0 would make every SDK request open a new TCP connection, and a settler
    # measured against the fake would pay for connects Stripe never asks of it). With keep-alive, the status line and
    # headers and then the body go out in two writes: without TCP_NODELAY, Nagle's algorithm holds the second until
    # the client's delayed ACK (~40 ms), capping a keep-alive client at ~25 requests/s per connection.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    fake: FakeStripe
    hosts: tuple[str, ...]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        split = urllib.parse.urlsplit(self.path)
        req = _Request(
            host=self.hosts[0],
            method=self.command,
            path=split.path,
            query=parse_form(split.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        if len(self.hosts) > 1 and split.path == "/v2/billing/meter_event_stream":
            req.host = "meter_events"
        resp = self.fake._dispatch(req)
        if resp.drop:
            # Close without a status line: the client sees the connection drop (RemoteDisconnected), as when a
            # response is lost on the wire. SO_LINGER 0 makes it a reset rather than a polite FIN.
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            return
        payload = json.dumps(resp.body).encode("utf-8")
        self.send_response(resp.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _serve  # noqa: N815


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default listen backlog of 5 resets connections under a burst of clients

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (killed, or it timed out) from a kept-alive connection is no error of the fake."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Listener:
    """A ThreadingHTTPServer on a fixed port that can stop listening (connections refused) and listen again."""

    def __init__(self, fake: FakeStripe, hosts: tuple[str, ...], port: int) -> None:
        self._handler = type("Handler", (_Handler,), {"fake": fake, "hosts": hosts})
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self._bind()

    def _bind(self) -> None:
        server = _Server(("127.0.0.1", self.port), self._handler)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"fake-stripe-{self.port}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def reopen(self) -> None:
        if self._server is None:
            self._bind()


class _Outage:
    """Returned by FakeStripe.outage(): ends on end(), on leaving a `with` block, or after `seconds` (a timer)."""

    def __init__(self, fake: FakeStripe, timer: threading.Timer | None) -> None:
        self._fake = fake
        self._timer = timer

    def end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._fake.end_outage()

    def __enter__(self) -> _Outage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


# ---------------------------------------------------------------------------------------------------------------------
# The fake
# ---------------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------------
# Invoices: drafts, the invoice list, retrieve and update (auto_advance), and the `invoice.created` webhook. Kept in
# this section (a mixin of FakeStripe) so that it stays apart from the meter code.
#
# Facts (stripe-python 16.1.0, generated from Stripe's OpenAPI spec: stripe/_invoice_service.py,
# stripe/params/_invoice_list_params.py, _invoice_update_params.py, stripe/_invoice.py):
# - GET /v1/invoices "returned sorted by creation date, with the most recently created invoices appearing first";
#   filters customer, status (draft|open|paid|uncollectible|void), subscription, collection_method, created; cursors
#   starting_after / ending_before; limit 1..100, default 10. The list object is the usual {object, data, has_more,
#   url}.
# - GET /v1/invoices/{invoice}: the invoice; an unknown id is 404 resource_missing "No such invoice: 'in_...'".
# - POST /v1/invoices/{invoice} (form encoded): "If you would like to stop the Stripe Billing engine from automatically
#   finalizing ... invoices, pass auto_advance=false" (auto_advance: "Controls whether Stripe performs automatic
#   collection of the invoice. If false, the invoice's state doesn't automatically advance without an explicit action").
# - Invoice fields used: id, object, customer, status, created, currency, total ("Total after discounts and taxes"),
#   subtotal, amount_due, auto_advance.
# - `invoice.created` is sent when a draft is made; Stripe finalizes a subscription's draft about an hour later, unless
#   auto_advance is false. The fake finalizes only when a test asks (finalize_due_drafts()).
# ---------------------------------------------------------------------------------------------------------------------

INVOICE_STATUSES: Final[frozenset[str]] = frozenset({"draft", "open", "paid", "uncollectible", "void"})
_INVOICE_LIST_PARAMS: Final[tuple[str, ...]] = (
    "customer",
    "status",
    "subscription",
    "collection_method",
    "created",
    "limit",
    "starting_after",
    "ending_before",
    "expand",
)
_INVOICE_UPDATE_PARAMS: Final[tuple[str, ...]] = ("auto_advance", "description", "metadata", "expand")
# Form-encoded booleans, as the SDK sends them (stripe/_encode.py: True -> "true").
_FORM_BOOLEANS: Final[Mapping[str, bool]] = {"true": True, "false": False}


class _FakeInvoices:
    """Invoices of FakeStripe (see the section comment). Needs the host's lock, clock, _page and send_event."""

    _lock: threading.RLock
    _invoices: dict[str, dict[str, Any]]
    _invoice_order: int

    if TYPE_CHECKING:  # FakeStripe's own

        def now(self) -> float: ...

        @staticmethod
        def _page(items: list[dict[str, Any]], params: Mapping[str, Any], url: str) -> dict[str, Any]: ...

        def send_event(
            self,
            url: str,
            event: Mapping[str, Any],
            secret: str,
            *,
            timestamp: int | None = None,
            timeout: float = 10.0,
        ) -> WebhookDelivery: ...

    def _init_invoices(self) -> None:
        self._invoices = {}
        self._invoice_order = 0

    # -- setup and inspection (thread-safe) -------------------------------------------------------------------------

    def add_invoice(
        self,
        customer: str,
        total: int,
        *,
        status: str = "paid",
        created: int | None = None,
        currency: str = "usd",
        invoice_id: str | None = None,
        subscription_id: str | None = None,
        auto_advance: bool | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Store an invoice of `customer` for `total` (smallest currency unit), as Stripe would have it: by default a
        paid one created now (`created`: Unix seconds, for a customer's history). Returns a copy."""
        if status not in INVOICE_STATUSES:
            raise ValueError(f"status is one of {sorted(INVOICE_STATUSES)}")
        if total < 0:
            raise ValueError("an invoice total is >= 0")
        with self._lock:
            invoice_id = invoice_id or f"in_{_rand(24)}"
            if invoice_id in self._invoices:
                raise ValueError(f"invoice {invoice_id} exists")
            when = int(self.now()) if created is None else int(created)
            draft = status == "draft"
            invoice = invoice_object(
                customer,
                status=status,
                amount_due=total,
                subscription_id=subscription_id,
                invoice_id=invoice_id,
                created=when,
                currency=currency,
                total=total,
                subtotal=total,
                auto_advance=(status == "draft") if auto_advance is None else auto_advance,
                attempted=not draft,
                attempt_count=0 if draft else 1,
                **fields,
            )
            invoice["period_start"], invoice["period_end"] = when - 30 * 86_400, when
            self._invoice_order += 1
            invoice["_order"] = self._invoice_order
            self._invoices[invoice_id] = invoice
            return self._invoice_view(invoice)

    def create_draft_invoice(self, customer: str, total: int, **kwargs: Any) -> dict[str, Any]:
        """A new draft (auto_advance true, as a subscription renewal's draft), as Stripe makes it before finalizing."""
        return self.add_invoice(customer, total, status="draft", **kwargs)

    def invoice(self, invoice_id: str) -> dict[str, Any]:
        """The stored invoice (KeyError when unknown)."""
        with self._lock:
            return self._invoice_view(self._invoices[invoice_id])

    def invoices(self, customer: str | None = None) -> list[dict[str, Any]]:
        """Every invoice (of one customer), newest first, as GET /v1/invoices orders them."""
        with self._lock:
            return [
                self._invoice_view(x) for x in self._sorted_invoices() if customer is None or x["customer"] == customer
            ]

    def finalize_due_drafts(self) -> list[str]:
        """What Stripe does about an hour after `invoice.created`: finalize every draft whose auto_advance is true
        (status open). Returns the ids finalized; drafts on hold (auto_advance false) stay drafts."""
        with self._lock:
            done = []
            for invoice in self._sorted_invoices():
                if invoice["status"] == "draft" and invoice["auto_advance"]:
                    invoice["status"] = "open"
                    invoice["attempted"] = False
                    done.append(invoice["id"])
            return done

    def invoice_created_event(self, invoice_id: str) -> dict[str, Any]:
        """The snapshot `invoice.created` event of a stored invoice (the invoice as it is now in data.object)."""
        return build_event("invoice.created", self.invoice(invoice_id))

    def send_invoice_created(self, url: str, invoice_id: str, secret: str, *, timeout: float = 10.0) -> WebhookDelivery:
        """POST a signed `invoice.created` for a stored invoice to `url`, as Stripe delivers it (see send_event)."""
        return self.send_event(url, self.invoice_created_event(invoice_id), secret, timeout=timeout)

    # -- internals (called with the lock held) ------------------------------------------------------------------------

    def _sorted_invoices(self) -> list[dict[str, Any]]:
        # Newest first; invoices created in the same second: the one stored later first.
        return sorted(self._invoices.values(), key=lambda x: (x["created"], x["_order"]), reverse=True)

    @staticmethod
    def _invoice_view(invoice: Mapping[str, Any]) -> dict[str, Any]:
        view = copy.deepcopy(dict(invoice))
        view.pop("_order", None)
        return view

    def _invoice_or_404(self, invoice_id: str) -> dict[str, Any]:
        invoice = self._invoices.get(invoice_id)
        if invoice is None:
            raise _ApiError(
                404, "invalid_request_error", f"No such invoice: '{invoice_id}'", code="resource_missing", param="id"
            )
        return invoice

    # -- routes -------------------------------------------------------------------------------------------------------

    def _v1_list_invoices(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        _check_unknown(params, _INVOICE_LIST_PARAMS)
        status = params.get("status")
        if status is not None and status not in INVOICE_STATUSES:
            raise _ApiError(
                400,
                "invalid_request_error",
                f"Invalid status: must be one of {', '.join(sorted(INVOICE_STATUSES))}",
                code="parameter_invalid_string",
                param="status",
            )
        created = params.get("created")
        if created is not None and not isinstance(created, (str, dict)):
            raise _ApiError(400, "invalid_request_error", "Invalid created", param="created")
        with self._lock:
            items = [self._invoice_view(x) for x in self._sorted_invoices() if _invoice_matches(x, params)]
        return 200, self._page(items, params, "/v1/invoices"), {}

    def _v1_get_invoice(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        _check_unknown(params, ("expand",))
        with self._lock:
            return 200, self._invoice_view(self._invoice_or_404(m["id"])), {}

    def _v1_update_invoice(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        _check_unknown(params, _INVOICE_UPDATE_PARAMS)
        changes: dict[str, Any] = {}
        if "auto_advance" in params:
            raw = params["auto_advance"]
            if raw not in _FORM_BOOLEANS:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    f"Invalid boolean: {raw}",
                    code="parameter_invalid_boolean",
                    param="auto_advance",
                )
            changes["auto_advance"] = _FORM_BOOLEANS[raw]
        if "description" in params:
            changes["description"] = params["description"] or None
        with self._lock:
            invoice = self._invoice_or_404(m["id"])
            invoice.update(changes)
            if isinstance(params.get("metadata"), dict):
                invoice.setdefault("metadata", {}).update(params["metadata"])
            return 200, self._invoice_view(invoice), {}


def _invoice_matches(invoice: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    """The list filters: customer, status, subscription, collection_method, created (an int or gt/gte/lt/lte)."""
    for name in ("customer", "status", "collection_method"):
        if params.get(name) is not None and invoice.get(name) != params[name]:
            return False
    subscription = params.get("subscription")
    parent = invoice.get("parent") or {}
    if subscription is not None and (parent.get("subscription_details") or {}).get("subscription") != subscription:
        return False
    created = params.get("created")
    if isinstance(created, str):
        return bool(created.isdigit() and invoice["created"] == int(created))
    if isinstance(created, dict):
        bounds = {
            "gt": lambda a, b: a > b,
            "gte": lambda a, b: a >= b,
            "lt": lambda a, b: a < b,
            "lte": lambda a, b: a <= b,
        }
        for op, value in created.items():
            if op not in bounds or not str(value).isdigit():
                raise _ApiError(400, "invalid_request_error", f"Invalid created[{op}]", param=f"created[{op}]")
            if not bounds[op](invoice["created"], int(value)):
                return False
    return True


_INVOICE_ROUTES: Final[list[tuple[str, str, re.Pattern[str], str]]] = [
    ("api", "GET", re.compile(r"^/v1/invoices$"), "_v1_list_invoices"),
    ("api", "GET", re.compile(r"^/v1/invoices/(?P<id>[^/]+)$"), "_v1_get_invoice"),
    ("api", "POST", re.compile(r"^/v1/invoices/(?P<id>[^/]+)$"), "_v1_update_invoice"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Divergence injection, for reconciliation tests (a mixin of FakeStripe, kept apart from the meter code)
# ---------------------------------------------------------------------------------------------------------------------


class _FakeMeterInjection:
    """Meter data Stripe has that spendgate never sent: what a second sender, or a bug, leaves on an invoice."""

    _lock: threading.RLock
    _visibility_delay: float

    if TYPE_CHECKING:  # FakeStripe's own

        def now(self) -> float: ...

        def _active_meter(self, event_name: str) -> dict[str, Any] | None: ...

        def _store_event(
            self,
            *,
            event_name: str,
            identifier: str,
            payload: Mapping[str, Any],
            timestamp: int,
            source: str,
            meter: Mapping[str, Any] | None,
        ) -> dict[str, Any]: ...

    def inject_meter_event(
        self,
        event_name: str,
        customer: str,
        value: int,
        *,
        timestamp: int | None = None,
        identifier: str | None = None,
        visible_now: bool = True,
        dimensions: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Add an accepted meter event straight to the meter's data (no HTTP request, no request log entry), as if
        another system had sent it. visible_now: counted by the summaries at once, despite visibility_delay_seconds
        (else it becomes visible like any event). dimensions: more payload keys (model and token_type on the
        token-billing meter). Returns a copy of the stored event."""
        with self._lock:
            meter = self._active_meter(event_name)
            if meter is None:
                raise KeyError(event_name)
            ev = self._store_event(
                event_name=event_name,
                identifier=identifier or f"injected-{_rand(16)}",
                payload={
                    **(dimensions or {}),
                    meter["customer_mapping"]["event_payload_key"]: customer,
                    meter["value_settings"]["event_payload_key"]: str(value),
                },
                timestamp=int(self.now()) if timestamp is None else timestamp,
                source="injected",
                meter=meter,
            )
            if visible_now:
                ev["received_at"] -= self._visibility_delay
            return copy.deepcopy(ev)


class FakeStripe(_FakeInvoices, _FakeMeterInjection):
    """See the module docstring. All public methods are thread-safe."""

    _outage: str | None

    def __init__(
        self,
        *,
        meters: Iterable[str | Mapping[str, Any]] = DEFAULT_METERS,
        customers: Iterable[str] = (),
        api_keys: Iterable[str] | None = None,
        port: int = 0,
        meter_events_port: int = 0,
        same_host: bool = False,
        session_ttl_seconds: float = DEFAULT_SESSION_TTL_S,
        dedup_window_seconds: float = DEFAULT_DEDUP_WINDOW_S,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        rate_429: float = 0.0,
        rate_500: float = 0.0,
        latency_seconds: float = 0.0,
        fail_after_record_rate: float = 0.0,
        fail_after_record_mode: str = "500",
        rate_limit_code: str = "rate_limit",
        fault_paths: Iterable[str] | None = None,
        visibility_delay_seconds: float = 0.0,
        start: bool = True,
    ) -> None:
        """
        meters: event names (a sum meter keyed on stripe_customer_id/value is made for each) or full create params
            ({"event_name", "display_name", "default_aggregation": {"formula"}, "customer_mapping",
            "value_settings", "event_time_window", "dimension_payload_keys"}). By default `spendgate_usage` and the
            token-billing meter (TOKEN_BILLING_METER, with its dimensions).
        customers: customer ids that exist from the start (e.g. the ids spendgate stores).
        api_keys: the only keys accepted; default: any sk_test_/rk_test_ key.
        same_host: serve the meter-events base address from the API port too.
        clock: the wall clock the fake's time is based on; advance_time() adds an offset to it.
        seed, rate_*, latency_seconds, fail_after_record_*, rate_limit_code, fault_paths: see set_faults().
        visibility_delay_seconds: Stripe's event summaries and cancellations are eventually consistent: an accepted
            event counts in the summaries, and a cancellation takes effect there, only this long after it was received
            (0: at once, as most tests want). totals_by_customer() and events() always show everything received.
        start: start listening now (else call start()).
        """
        self._lock = threading.RLock()
        self._base_clock = clock
        self._offset = 0.0
        self._session_ttl = float(session_ttl_seconds)
        self._dedup_window = float(dedup_window_seconds)
        self._visibility_delay = float(visibility_delay_seconds)
        self._api_keys = frozenset(api_keys) if api_keys is not None else None
        self._same_host = same_host
        self._ports = (port, meter_events_port)
        self._listeners: dict[str, _Listener] = {}

        self._meters: dict[str, dict[str, Any]] = {}
        self._customers: dict[str, dict[str, Any]] = {}
        self._init_invoices()
        self._initial_faults: dict[str, Any] = {}
        self._reset_state()
        for meter in meters:
            self.add_meter(meter) if isinstance(meter, str) else self.add_meter(**dict(meter))
        for customer in customers:
            self.add_customer(customer)
        self._rng = random.Random(seed)
        self._seed = seed
        self._faults: dict[str, Any] = {
            "rate_429": 0.0,
            "rate_500": 0.0,
            "latency_seconds": 0.0,
            "fail_after_record_rate": 0.0,
            "fail_after_record_mode": "500",
            "rate_limit_code": "rate_limit",
            "fault_paths": None,
        }
        self.set_faults(
            rate_429=rate_429,
            rate_500=rate_500,
            latency_seconds=latency_seconds,
            fail_after_record_rate=fail_after_record_rate,
            fail_after_record_mode=fail_after_record_mode,
            rate_limit_code=rate_limit_code,
            fault_paths=fault_paths,
        )
        self._initial_faults = dict(self._faults)
        if start:
            self.start()

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def start(self) -> FakeStripe:
        with self._lock:
            if self._listeners:
                return self
            if self._same_host:
                self._listeners["api"] = self._listeners["meter_events"] = _Listener(self, _HOSTS, self._ports[0])
            else:
                self._listeners["api"] = _Listener(self, ("api",), self._ports[0])
                self._listeners["meter_events"] = _Listener(self, ("meter_events",), self._ports[1])
        return self

    def stop(self) -> None:
        with self._lock:
            listeners = {id(x): x for x in self._listeners.values()}.values()
            self._listeners = {}
            self._outage = None
        for listener in listeners:
            listener.close()

    close = stop

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FakeStripe(url={self.url!r}, meter_events_url={self.meter_events_url!r})"

    @property
    def url(self) -> str:
        """The API base address (plays https://api.stripe.com)."""
        return f"http://127.0.0.1:{self._listener('api').port}"

    @property
    def meter_events_url(self) -> str:
        """The meter-events base address (plays https://meter-events.stripe.com)."""
        return f"http://127.0.0.1:{self._listener('meter_events').port}"

    @property
    def base_addresses(self) -> dict[str, str]:
        """For StripeClient(base_addresses=...): the SDK knows "api", "files", "connect" and "meter_events"
        (stripe/_base_address.py; defaults in stripe/__init__.py: https://api.stripe.com and
        https://meter-events.stripe.com). v1 and /v2/billing/meter_event_session go to "api",
        /v2/billing/meter_event_stream to "meter_events" (stripe/v2/billing/_meter_event_*_service.py)."""
        return {"api": self.url, "meter_events": self.meter_events_url}

    def client(
        self, api_key: str = DEFAULT_API_KEY, *, max_network_retries: int = 0, **kwargs: Any
    ) -> stripe.StripeClient:
        """A real stripe.StripeClient aimed at this fake (pass a session token as api_key for the stream)."""
        import stripe  # noqa: PLC0415 - the server itself does not need the SDK

        return stripe.StripeClient(
            api_key,
            base_addresses=self.base_addresses,  # type: ignore[arg-type]
            max_network_retries=max_network_retries,
            **kwargs,
        )

    def _listener(self, host: str) -> _Listener:
        listener = self._listeners.get(host)
        if listener is None:
            raise RuntimeError("FakeStripe is not started")
        return listener

    # -- clock ------------------------------------------------------------------------------------------------------

    def now(self) -> float:
        """The fake's current time (seconds since the epoch)."""
        with self._lock:
            return self._base_clock() + self._offset

    def advance_time(self, seconds: float) -> None:
        """Move the fake's clock forward (session expiry, dedup and cancel windows, the timestamp window)."""
        with self._lock:
            self._offset += seconds

    # -- setup ------------------------------------------------------------------------------------------------------

    def add_meter(
        self,
        event_name: str,
        *,
        display_name: str | None = None,
        default_aggregation: Mapping[str, str] | None = None,
        customer_mapping: Mapping[str, str] | None = None,
        value_settings: Mapping[str, str] | None = None,
        event_time_window: str | None = None,
        dimension_payload_keys: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """Create a meter directly (as POST /v1/billing/meters would) and return the `billing.meter` object."""
        with self._lock:
            return copy.deepcopy(
                self._create_meter(
                    {
                        "event_name": event_name,
                        "display_name": display_name or event_name,
                        "default_aggregation": dict(default_aggregation or {"formula": "sum"}),
                        **({"customer_mapping": dict(customer_mapping)} if customer_mapping else {}),
                        **({"value_settings": dict(value_settings)} if value_settings else {}),
                        **({"event_time_window": event_time_window} if event_time_window else {}),
                        **({"dimension_payload_keys": list(dimension_payload_keys)} if dimension_payload_keys else {}),
                    }
                )
            )

    def add_customer(self, customer_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """Create a customer with a chosen id (Stripe picks ids itself; tests need spendgate's ids to exist)."""
        with self._lock:
            return copy.deepcopy(self._create_customer({**fields}, customer_id))

    def delete_customer(self, customer_id: str) -> None:
        """Delete a customer as the Dashboard would (DELETE /v1/customers/{id}); retrieving it then answers the
        deleted_customer object {"id", "object": "customer", "deleted": true}."""
        with self._lock:
            self._delete_customer(customer_id)

    def deactivate_meter(self, event_name: str) -> None:
        """Deactivate the active meter of an event name (POST /v1/billing/meters/{id}/deactivate)."""
        with self._lock:
            meter = self._active_meter(event_name)
            if meter is None:
                raise KeyError(event_name)
            self._set_meter_status(meter, "inactive")

    def meter(self, event_name: str) -> dict[str, Any]:
        """The `billing.meter` object for an event name."""
        with self._lock:
            meter = self._active_meter(event_name)
            if meter is None:
                raise KeyError(event_name)
            return copy.deepcopy(meter)

    # -- faults -----------------------------------------------------------------------------------------------------

    def set_faults(
        self,
        *,
        rate_429: float | None = None,
        rate_500: float | None = None,
        latency_seconds: float | None = None,
        fail_after_record_rate: float | None = None,
        fail_after_record_mode: str | None = None,
        rate_limit_code: str | None = None,
        fault_paths: Iterable[str] | None | EllipsisType = ...,
        seed: int | None = None,
    ) -> None:
        """Change fault injection at runtime (None leaves a setting as it is).

        rate_429, rate_500: the chance that a request gets a 429 or a 500 before it executes (nothing recorded, no
            idempotent result saved).
        latency_seconds: added before every request is handled.
        fail_after_record_rate: the chance that a request that stored meter events fails afterwards, the event being
            kept: mode "500" answers 500 (saved under the idempotency key, `Stripe-Should-Retry: false`), mode "drop"
            closes the connection without an answer (the 200 is saved under the idempotency key).
        rate_limit_code: "rate_limit" (no Stripe-Should-Retry header, the SDK does not retry) or "lock_timeout"
            (`Stripe-Should-Retry: true`, the SDK retries when max_network_retries > 0).
        fault_paths: path prefixes the random faults apply to (None: every path).
        seed: reseed the random generator.
        """
        with self._lock:
            for name, value in (
                ("rate_429", rate_429),
                ("rate_500", rate_500),
                ("fail_after_record_rate", fail_after_record_rate),
            ):
                if value is not None:
                    if not 0.0 <= value <= 1.0:
                        raise ValueError(f"{name} must be within [0, 1]")
                    self._faults[name] = float(value)
            if self._faults["rate_429"] + self._faults["rate_500"] > 1.0:
                raise ValueError("rate_429 + rate_500 must not exceed 1")
            if latency_seconds is not None:
                self._faults["latency_seconds"] = max(0.0, float(latency_seconds))
            if fail_after_record_mode is not None:
                if fail_after_record_mode not in ("500", "drop"):
                    raise ValueError('fail_after_record_mode is "500" or "drop"')
                self._faults["fail_after_record_mode"] = fail_after_record_mode
            if rate_limit_code is not None:
                if rate_limit_code not in ("rate_limit", "lock_timeout"):
                    raise ValueError('rate_limit_code is "rate_limit" or "lock_timeout"')
                self._faults["rate_limit_code"] = rate_limit_code
            if fault_paths is not ...:
                self._faults["fault_paths"] = tuple(fault_paths) if fault_paths is not None else None
            if seed is not None:
                self._rng.seed(seed)
                self._seed = seed

    def faults(self) -> dict[str, Any]:
        """The current fault settings."""
        with self._lock:
            return dict(self._faults, outage=self._outage, queued=[k for k, _ in self._forced])

    def fail_next(self, kind: str, times: int = 1, *, path: str | None = None) -> None:
        """Queue deterministic faults for the next matching requests (path prefix; None: any).

        Before the request executes: "429", "429_lock_timeout", "500", "503", "reset" (connection closed unanswered).
        After a request stored meter events: "500_after_record", "drop_after_record"."""
        if kind not in PRE_FAULTS | AFTER_RECORD_FAULTS:
            raise ValueError(f"unknown fault {kind!r}")
        with self._lock:
            self._forced.extend([(kind, path)] * times)

    def start_outage(self, mode: str = "503") -> None:
        """Until end_outage(): every request gets a 503 ("503"), has its connection closed unanswered ("reset"), or
        is refused because nothing listens on the ports ("refuse")."""
        if mode not in OUTAGE_MODES:
            raise ValueError(f"outage mode is one of {sorted(OUTAGE_MODES)}")
        with self._lock:
            self._outage = mode
            listeners = list({id(x): x for x in self._listeners.values()}.values()) if mode == "refuse" else []
        for listener in listeners:
            listener.close()

    def end_outage(self) -> None:
        with self._lock:
            was, self._outage = self._outage, None
            listeners = list({id(x): x for x in self._listeners.values()}.values()) if was == "refuse" else []
        for listener in listeners:
            listener.reopen()

    def outage(self, seconds: float | None = None, *, mode: str = "503") -> _Outage:
        """Start an outage; it ends after `seconds` of wall time (if given), on .end(), or at the end of a `with`."""
        self.start_outage(mode)
        timer = None
        if seconds is not None:
            timer = threading.Timer(seconds, self.end_outage)
            timer.daemon = True
            timer.start()
        return _Outage(self, timer)

    # -- inspection -------------------------------------------------------------------------------------------------

    def totals_by_customer(self, event_name: str | None = None) -> dict[str, int]:
        """Sum of the values of accepted, not cancelled meter events, by customer (all meters unless event_name)."""
        with self._lock:
            totals: dict[str, int] = {}
            for ev in self._events:
                if ev["status"] != "accepted" or (event_name is not None and ev["event_name"] != event_name):
                    continue
                totals[ev["customer"]] = totals.get(ev["customer"], 0) + ev["value"]
            return totals

    def totals_by_dimensions(
        self, event_name: str, keys: Sequence[str] = ("model", "token_type")
    ) -> dict[tuple[str, ...], int]:
        """Sum of the values of one meter's accepted events by (customer, *dimension values of `keys`): what its
        summaries grouped by those keys add up to over all time (test inspection; the same events they read)."""
        with self._lock:
            totals: dict[tuple[str, ...], int] = {}
            for ev in self._events:
                if ev["status"] == "accepted" and ev["event_name"] == event_name:
                    key = (ev["customer"], *(ev["dimensions"].get(k, "") for k in keys))
                    totals[key] = totals.get(key, 0) + ev["value"]
            return totals

    def events(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """Every meter event Stripe received (one per identifier), oldest first. `status` is "accepted",
        "cancelled" or "invalid" (failed Stripe's asynchronous validation; see errors())."""
        with self._lock:
            return [copy.deepcopy(ev) for ev in self._events if status is None or ev["status"] == status]

    def errors(self, code: str | None = None) -> list[dict[str, Any]]:
        """Asynchronous validation failures (what Stripe reports through v1.billing.meter.error_report_triggered):
        {code, message, identifier, event_name, meter, customer, source, time}."""
        with self._lock:
            return [dict(e) for e in self._errors if code is None or e["code"] == code]

    def adjustments(self) -> list[dict[str, Any]]:
        """Every meter event adjustment received, with its outcome ("cancelled", "not_found", "too_late",
        "already_cancelled")."""
        with self._lock:
            return [copy.deepcopy(a) for a in self._adjustments]

    def request_log(self) -> list[dict[str, Any]]:
        """Every HTTP request: host, method, path, query, headers (Authorization redacted), body, params, status,
        fault, idempotency_key, replayed, request_id."""
        with self._lock:
            return [copy.deepcopy(r) for r in self._log]

    def count_requests(self, path: str, *, method: str | None = None, status: int | None = None) -> int:
        """How many requests hit exactly `path` (no query string), optionally with this method and answer status."""
        with self._lock:
            return sum(
                1
                for r in self._log
                if r["path"] == path
                and (method is None or r["method"] == method.upper())
                and (status is None or r["status"] == status)
            )

    @property
    def duplicates_rejected(self) -> int:
        """Meter events dropped because their identifier was already received (v1/v2 400s and silent stream drops)."""
        with self._lock:
            return self._duplicates

    def sessions(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(s) for s in self._sessions.values()]

    def reset(self) -> None:
        """Forget events, errors, adjustments, sessions, idempotency keys, the request log and queued faults; restore
        the constructor's fault settings and seed, end any outage and rewind advance_time(). Meters and customers
        stay."""
        self.end_outage()
        with self._lock:
            self._reset_state()
            self._faults = dict(self._initial_faults)
            self._rng.seed(self._seed)

    def _reset_state(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._by_identifier: dict[str, dict[str, Any]] = {}
        self._errors: list[dict[str, Any]] = []
        self._adjustments: list[dict[str, Any]] = []
        self._sessions: dict[str, dict[str, Any]] = {}
        self._idempotency: dict[tuple[str, str], dict[str, Any]] = {}
        self._inflight: set[tuple[str, str]] = set()
        self._v2_events: dict[str, dict[str, Any]] = {}
        self._reported_errors = 0
        self._log: list[dict[str, Any]] = []
        self._duplicates = 0
        self._forced: list[tuple[str, str | None]] = []
        self._outage = None
        self._offset = 0.0

    # -- webhooks ---------------------------------------------------------------------------------------------------

    def send_webhook(
        self,
        url: str,
        event_type: str,
        data_object: Mapping[str, Any] | None,
        secret: str,
        *,
        customer: str = "cus_fake",
        timestamp: int | None = None,
        timeout: float = 10.0,
        previous_attributes: Mapping[str, Any] | None = None,
    ) -> WebhookDelivery:
        """POST a signed snapshot `event` of `event_type` around `data_object` to `url`, as Stripe delivers webhooks
        (JSON body, Stripe-Signature header). See build_event() for the default objects."""
        event = build_event(event_type, data_object, customer=customer, previous_attributes=previous_attributes)
        return self.send_event(url, event, secret, timestamp=timestamp, timeout=timeout)

    def send_event(
        self, url: str, event: Mapping[str, Any], secret: str, *, timestamp: int | None = None, timeout: float = 10.0
    ) -> WebhookDelivery:
        """POST an already built event (snapshot or thin) with a valid signature."""
        payload = json.dumps(event, indent=2)  # Stripe sends pretty-printed JSON; the signature covers the exact bytes
        signature = sign_payload(payload, secret, timestamp)
        request = urllib.request.Request(
            url,
            data=payload.encode("utf-8"),
            method="POST",
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": _WEBHOOK_USER_AGENT,
                "Stripe-Signature": signature,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - a test helper
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        return WebhookDelivery(status=status, body=body, payload=payload, signature=signature, event=dict(event))

    def error_report_event(self, event_name: str | None = None) -> dict[str, Any]:
        """Build the thin `v1.billing.meter.error_report_triggered` notification for the async errors recorded since
        the last report (for one meter, by event name, or the first meter with errors), and keep the full event so
        that GET /v2/core/events/{id} (EventNotification.fetch_event()) returns it with its `data`.

        Shapes: https://docs.stripe.com/api/v2/core/events/object (example for this type) and
        stripe/events/_v1_billing_meter_error_report_triggered_event.py."""
        with self._lock:
            pending = [e for e in self._errors[self._reported_errors :] if e["meter"] is not None]
            if event_name is not None:
                pending = [e for e in pending if e["event_name"] == event_name]
            if not pending:
                raise LookupError("no unreported meter errors")
            meter_id = pending[0]["meter"]
            pending = [e for e in pending if e["meter"] == meter_id]
            self._reported_errors = len(self._errors)
            by_code: dict[str, list[dict[str, Any]]] = {}
            for err in pending:
                by_code.setdefault(err["code"], []).append(err)
            start = min(e["time"] for e in pending)
            end = self.now()
            n = len(pending)
            event: dict[str, Any] = {
                "id": f"evt_test_{_rand(40)}",
                "object": "v2.core.event",
                "context": None,
                "created": _rfc3339(end),
                "livemode": False,
                "reason": None,
                "type": "v1.billing.meter.error_report_triggered",
                "related_object": {"id": meter_id, "type": "billing.meter", "url": f"/v1/billing/meters/{meter_id}"},
                "data": {
                    "developer_message_summary": f"There {'is' if n == 1 else 'are'} {n} invalid "
                    f"event{'' if n == 1 else 's'}",
                    "reason": {
                        "error_count": n,
                        "error_types": [
                            {
                                "code": code,
                                "error_count": len(errs),
                                "sample_errors": [
                                    {"error_message": e["message"], "request": {"identifier": e["identifier"]}}
                                    for e in errs[:5]
                                ],
                            }
                            for code, errs in by_code.items()
                        ],
                    },
                    "validation_start": _rfc3339(start),
                    "validation_end": _rfc3339(end),
                },
            }
            self._v2_events[event["id"]] = event
            return {k: v for k, v in event.items() if k != "data"}  # the thin payload carries no data

    # -- request dispatch -------------------------------------------------------------------------------------------

    def _dispatch(self, req: _Request) -> _Response:
        entry: dict[str, Any] = {
            "host": req.host,
            "method": req.method,
            "path": req.path,
            "query": req.query,
            "body": req.body,
            "headers": {
                k: (v.split(" ")[0] + " " + _redact_key(v.split(" ", 1)[-1]) if k == "authorization" else v)
                for k, v in req.headers.items()
            },
            "idempotency_key": req.headers.get("idempotency-key"),
            "params": None,
            "status": None,
            "fault": None,
            "replayed": False,
            "request_id": f"req_{_rand(14)}",
            "time": None,
        }
        with self._lock:
            entry["time"] = self.now()
            self._log.append(entry)
            outage = self._outage
            latency = self._faults["latency_seconds"]
        if outage is not None:
            entry["fault"] = f"outage_{outage}"
            if outage == "503":
                return self._finish(
                    entry, _ApiError(503, "api_error", "Stripe is temporarily unavailable.", cacheable=False)
                )
            return self._finish(entry, _Response(0, None, drop=True))
        if latency > 0:
            time.sleep(latency)
        fault = self._pre_fault(req)
        if fault is not None:
            entry["fault"] = fault
            if fault == "reset":
                return self._finish(entry, _Response(0, None, drop=True))
            if fault == "503":
                return self._finish(
                    entry, _ApiError(503, "api_error", "Stripe is temporarily unavailable.", cacheable=False)
                )
            if fault == "500":
                # Before the endpoint began executing: nothing stored, nothing saved under the idempotency key, no
                # Stripe-Should-Retry header (the SDK retries >= 500 when max_network_retries allows).
                return self._finish(entry, _ApiError(500, "api_error", "An unknown error occurred.", cacheable=False))
            if fault == "429_lock_timeout":
                return self._finish(
                    entry,
                    _ApiError(
                        429,
                        "invalid_request_error",
                        _LOCK_TIMEOUT_MESSAGE,
                        code="lock_timeout",
                        cacheable=False,
                        headers={"Stripe-Should-Retry": "true"},
                    ),
                )
            return self._finish(
                entry, _ApiError(429, "invalid_request_error", _RATE_LIMIT_MESSAGE, code="rate_limit", cacheable=False)
            )
        try:
            return self._finish(entry, self._route(req, entry))
        except _ApiError as err:
            return self._finish(entry, err)
        except Exception as exc:  # noqa: BLE001 - a bug in the fake: answer like Stripe would, keep the trace in the log
            entry["exception"] = repr(exc)
            return self._finish(entry, _ApiError(500, "api_error", f"fake_stripe internal error: {exc!r}"))

    def _finish(self, entry: dict[str, Any], result: _Response | _ApiError) -> _Response:
        if isinstance(result, _ApiError):
            result = _Response(result.status, result.body(), dict(result.headers))
        result.headers.setdefault("Request-Id", entry["request_id"])
        with self._lock:
            entry["status"] = None if result.drop else result.status
        return result

    def _pre_fault(self, req: _Request) -> str | None:
        with self._lock:
            for i, (kind, prefix) in enumerate(self._forced):
                if kind in PRE_FAULTS and (prefix is None or req.path.startswith(prefix)):
                    del self._forced[i]
                    return kind
            paths = self._faults["fault_paths"]
            if paths is not None and not any(req.path.startswith(p) for p in paths):
                return None
            r429, r500 = self._faults["rate_429"], self._faults["rate_500"]
            if r429 == 0.0 and r500 == 0.0:
                return None
            draw = self._rng.random()
            if draw < r429:
                return "429_lock_timeout" if self._faults["rate_limit_code"] == "lock_timeout" else "429"
            if draw < r429 + r500:
                return "500"
            return None

    def _after_record_fault(self, req: _Request) -> str | None:
        with self._lock:
            for i, (kind, prefix) in enumerate(self._forced):
                if kind in AFTER_RECORD_FAULTS and (prefix is None or req.path.startswith(prefix)):
                    del self._forced[i]
                    return kind
            paths = self._faults["fault_paths"]
            if paths is not None and not any(req.path.startswith(p) for p in paths):
                return None
            rate = self._faults["fail_after_record_rate"]
            if rate > 0.0 and self._rng.random() < rate:
                return f"{self._faults['fail_after_record_mode']}_after_record"
            return None

    # Routes: (host, method, pattern) -> handler(req, match, params) -> (status, body) or raises _ApiError
    _ROUTES: Final = [
        ("api", "POST", re.compile(r"^/v1/billing/meter_events$"), "_v1_meter_event"),
        ("api", "POST", re.compile(r"^/v1/billing/meter_event_adjustments$"), "_v1_adjustment"),
        ("api", "POST", re.compile(r"^/v1/billing/meters$"), "_v1_create_meter"),
        ("api", "GET", re.compile(r"^/v1/billing/meters$"), "_v1_list_meters"),
        ("api", "GET", re.compile(r"^/v1/billing/meters/(?P<id>[^/]+)$"), "_v1_get_meter"),
        ("api", "GET", re.compile(r"^/v1/billing/meters/(?P<id>[^/]+)/event_summaries$"), "_v1_event_summaries"),
        ("api", "POST", re.compile(r"^/v1/customers$"), "_v1_create_customer"),
        ("api", "GET", re.compile(r"^/v1/customers/(?P<id>[^/]+)$"), "_v1_get_customer"),
        ("api", "DELETE", re.compile(r"^/v1/customers/(?P<id>[^/]+)$"), "_v1_delete_customer"),
        ("api", "POST", re.compile(r"^/v1/billing/meters/(?P<id>[^/]+)/deactivate$"), "_v1_deactivate_meter"),
        ("api", "POST", re.compile(r"^/v1/billing/meters/(?P<id>[^/]+)/reactivate$"), "_v1_reactivate_meter"),
        ("api", "POST", re.compile(r"^/v2/billing/meter_event_session$"), "_v2_session"),
        ("api", "POST", re.compile(r"^/v2/billing/meter_events$"), "_v2_meter_event"),
        ("api", "POST", re.compile(r"^/v2/billing/meter_event_adjustments$"), "_v2_adjustment"),
        ("api", "GET", re.compile(r"^/v2/core/events/(?P<id>[^/]+)$"), "_v2_get_event"),
        ("meter_events", "POST", re.compile(r"^/v2/billing/meter_event_stream$"), "_v2_stream"),
        *_INVOICE_ROUTES,
    ]
    _RECORDING: Final = frozenset({"_v1_meter_event", "_v2_meter_event", "_v2_stream"})

    def _route(self, req: _Request, entry: dict[str, Any]) -> _Response:
        handler_name, match = None, None
        for host, method, pattern, name in self._ROUTES:
            m = pattern.match(req.path)
            if m and host == req.host and method == req.method:
                handler_name, match = name, m
                break
        if handler_name is None or match is None:
            hint = ""
            if req.path == "/v2/billing/meter_event_stream" and req.host == "api":
                hint = (
                    " The meter event stream is served on the meter-events base address "
                    "(https://meter-events.stripe.com; here FakeStripe.meter_events_url)."
                )
            raise _ApiError(
                404,
                "invalid_request_error",
                f"Unrecognized request URL ({req.method}: {req.path}). Please see https://stripe.com/docs "
                f"or we can help at https://support.stripe.com/.{hint}",
                cacheable=False,
            )

        v2 = req.path.startswith("/v2/")
        if req.host == "meter_events":
            session = self._authenticate_session(req)
            api_key = session["authentication_token"]
        else:
            api_key = self._authenticate_key(req)

        if req.method == "GET":
            params = req.query
        elif v2:
            try:
                params = json.loads(req.body) if req.body.strip() else {}
            except json.JSONDecodeError as exc:
                raise _ApiError(
                    400, "invalid_request_error", f"Invalid JSON body: {exc}", code="invalid_json", cacheable=False
                ) from None
            if not isinstance(params, dict):
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    "The request body must be a JSON object.",
                    code="invalid_json",
                    cacheable=False,
                )
        else:
            params = parse_form(req.body)
        with self._lock:
            entry["params"] = copy.deepcopy(params)

        # API v1 idempotency (see _IDEMPOTENCY_MISMATCH_MESSAGE). API v2 replays differently ("retries don't repeat
        # successful operations", https://docs.stripe.com/api-v2-overview#idempotency); identifier dedup covers the
        # meter event endpoints there, so the fake keeps no v2 response cache.
        key = req.headers.get("idempotency-key") if (req.method == "POST" and not v2) else None
        cache_key = (api_key, key) if key else None
        if key is not None and len(key) > MAX_IDEMPOTENCY_KEY_LEN:
            raise _ApiError(
                400, "invalid_request_error", "Idempotency-Key must be at most 255 characters.", cacheable=False
            )
        if cache_key is not None:
            fingerprint = json.dumps([req.method, req.path, params], sort_keys=True)
            with self._lock:
                saved = self._idempotency.get(cache_key)
                if saved is not None and self.now() - saved["time"] > IDEMPOTENCY_KEY_TTL_S:
                    del self._idempotency[cache_key]
                    saved = None
            if saved is not None:
                if saved["fingerprint"] != fingerprint:
                    raise _ApiError(
                        400, "idempotency_error", _IDEMPOTENCY_MISMATCH_MESSAGE.format(key=key), cacheable=False
                    )
                with self._lock:
                    entry["replayed"] = True
                headers = dict(
                    saved["headers"],
                    **{"Idempotent-Replayed": "true", "Original-Request": saved["request_id"], "Idempotency-Key": key},
                )
                return _Response(saved["status"], copy.deepcopy(saved["body"]), headers)
            with self._lock:
                if cache_key in self._inflight:
                    # "If ... the request conflicts with another that's executing concurrently, we don't save any
                    # idempotent result" (idempotent_requests docs); 409 is Stripe's "conflicts with another request
                    # (perhaps due to using the same idempotent key)" (https://docs.stripe.com/error-low-level), code
                    # idempotency_key_in_use (https://docs.stripe.com/error-codes). The SDK retries a 409.
                    raise _ApiError(
                        409,
                        "invalid_request_error",
                        "The idempotency key provided is currently being used in another request.",
                        code="idempotency_key_in_use",
                        cacheable=False,
                    )
                self._inflight.add(cache_key)
        try:
            return self._execute(req, entry, handler_name, match, params, key, cache_key)
        finally:
            if cache_key is not None:
                with self._lock:
                    self._inflight.discard(cache_key)

    def _execute(
        self,
        req: _Request,
        entry: dict[str, Any],
        handler_name: str,
        match: re.Match[str],
        params: dict[str, Any],
        key: str | None,
        cache_key: tuple[str, str] | None,
    ) -> _Response:
        handler = getattr(self, handler_name)
        try:
            status, body, headers = handler(req, match, params)
            response = _Response(status, body, headers)
            cacheable = True
        except _ApiError as err:
            response = _Response(err.status, err.body(), dict(err.headers))
            cacheable = err.cacheable
        if key is not None:
            response.headers["Idempotency-Key"] = key

        after = None
        if handler_name in self._RECORDING and response.status == 200 and response.body.get("_recorded", True):
            after = self._after_record_fault(req)
        if isinstance(response.body, dict):
            response.body.pop("_recorded", None)
        if after is not None:
            with self._lock:
                entry["fault"] = after
        if after == "500_after_record":
            lost = _ApiError(500, "api_error", "An unknown error occurred.", headers={"Stripe-Should-Retry": "false"})
            response = _Response(500, lost.body(), dict(lost.headers))
            if key is not None:
                response.headers["Idempotency-Key"] = key

        if cache_key is not None and cacheable:
            with self._lock:
                self._idempotency[cache_key] = {
                    "fingerprint": json.dumps([req.method, req.path, params], sort_keys=True),
                    "status": response.status,
                    "body": copy.deepcopy(response.body),
                    "headers": {k: v for k, v in response.headers.items() if k not in ("Request-Id",)},
                    "request_id": entry["request_id"],
                    "time": self.now(),
                }
        if after == "drop_after_record":
            return _Response(0, None, drop=True)
        return response

    def _authenticate_key(self, req: _Request) -> str:
        # "Authorization: Bearer <key>" is what the SDK sends (stripe/_api_requestor.py request_headers). Messages:
        # Stripe's 401 texts for a missing and an invalid key (https://docs.stripe.com/api/authentication).
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _ApiError(
                401,
                "invalid_request_error",
                "You did not provide an API key. You need to provide your API key in the Authorization "
                "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
                "https://stripe.com/docs/api#authentication for details, or we can help at "
                "https://support.stripe.com/.",
                cacheable=False,
            )
        valid = token in self._api_keys if self._api_keys is not None else bool(_API_KEY_RE.match(token))
        if not valid:
            raise _ApiError(
                401, "invalid_request_error", f"Invalid API Key provided: {_redact_key(token)}", cacheable=False
            )
        return token

    def _authenticate_session(self, req: _Request) -> dict[str, Any]:
        # The stream takes the session's authentication_token as the bearer (the docs' examples build a client with
        # "{{SESSION AUTH TOKEN}}": https://docs.stripe.com/api/v2/billing/meter-event-stream/create).
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        with self._lock:
            session = self._sessions.get(token) if scheme.lower() == "bearer" else None
            if session is None:
                raise _ApiError(
                    401,
                    "invalid_request_error",
                    "The meter event stream requires a meter event session's authentication_token "
                    f"as the bearer token; got {_redact_key(token) if token else 'none'}.",
                    cacheable=False,
                )
            if self.now() >= session["_expires"]:
                err = _ApiError(
                    401,
                    "temporary_session_expired",
                    _SESSION_EXPIRED_MESSAGE,
                    code="billing_meter_event_session_expired",
                    cacheable=False,
                )
                raise err
            return session

    # -- meters -----------------------------------------------------------------------------------------------------

    def _active_meter(self, event_name: str) -> dict[str, Any] | None:
        for meter in self._meters.values():
            if meter["event_name"] == event_name and meter["status"] == "active":
                return meter
        return None

    def _create_meter(self, params: Mapping[str, Any]) -> dict[str, Any]:
        # Params and object: https://docs.stripe.com/api/billing/meter/create (stripe/billing/_meter.py).
        _check_unknown(
            params,
            (
                "display_name",
                "event_name",
                "default_aggregation",
                "customer_mapping",
                "event_time_window",
                "value_settings",
                "dimension_payload_keys",
                "expand",
            ),
        )
        for name in ("display_name", "event_name"):
            if not params.get(name):
                raise _ApiError.missing(name)
        agg = params.get("default_aggregation")
        if not isinstance(agg, Mapping) or not agg.get("formula"):
            raise _ApiError.missing("default_aggregation[formula]")
        if agg["formula"] not in ("sum", "count", "last"):
            raise _ApiError(
                400,
                "invalid_request_error",
                "Invalid default_aggregation[formula]: must be one of sum, count, or last",
                code="parameter_invalid_string",
                param="default_aggregation[formula]",
            )
        if len(params["event_name"]) > MAX_NAME_LEN:
            raise _ApiError(
                400,
                "invalid_request_error",
                "event_name must be at most 100 characters.",
                code="parameter_invalid_string",
                param="event_name",
            )
        window = params.get("event_time_window")
        if window not in (None, "", "day", "hour"):
            raise _ApiError(
                400,
                "invalid_request_error",
                "Invalid event_time_window: must be one of day or hour",
                code="parameter_invalid_string",
                param="event_time_window",
            )
        if self._active_meter(params["event_name"]) is not None:
            # "You can only use an event name with a single meter." (recording usage guide)
            raise _ApiError(
                400,
                "invalid_request_error",
                f"An active meter with event_name {params['event_name']} already exists.",
                param="event_name",
            )
        dimension_keys = params.get("dimension_payload_keys")
        if dimension_keys is not None and (
            not isinstance(dimension_keys, list) or not all(isinstance(k, str) and k for k in dimension_keys)
        ):
            raise _ApiError(
                400,
                "invalid_request_error",
                "Invalid dimension_payload_keys: must be a list of keys.",
                code="parameter_invalid_string",
                param="dimension_payload_keys",
            )
        cmap = params.get("customer_mapping") or {"event_payload_key": "stripe_customer_id", "type": "by_id"}
        vset = params.get("value_settings") or {"event_payload_key": "value"}
        now = int(self.now())
        meter = {
            "id": f"mtr_test_{_rand(32)}",
            "object": "billing.meter",
            "created": now,
            "customer_mapping": {
                "event_payload_key": cmap.get("event_payload_key", "stripe_customer_id"),
                "type": cmap.get("type", "by_id"),
            },
            "default_aggregation": {"formula": agg["formula"]},
            "dimension_payload_keys": list(dimension_keys) if dimension_keys else None,
            "display_name": params["display_name"],
            "event_name": params["event_name"],
            "event_time_window": window or None,
            "livemode": False,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": now,
            "value_settings": {"event_payload_key": vset.get("event_payload_key", "value")},
        }
        self._meters[meter["id"]] = meter
        return meter

    def _v1_create_meter(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        with self._lock:
            return 200, copy.deepcopy(self._create_meter(params)), {}

    def _v1_list_meters(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        with self._lock:
            meters = [
                copy.deepcopy(x)
                for x in self._meters.values()
                if not params.get("status") or x["status"] == params["status"]
            ]
        meters.sort(key=lambda x: x["created"], reverse=True)
        return 200, self._page(meters, params, "/v1/billing/meters"), {}

    def _get_meter_or_404(self, meter_id: str) -> dict[str, Any]:
        meter = self._meters.get(meter_id)
        if meter is None:
            raise _ApiError(
                404,
                "invalid_request_error",
                f"No such billing meter: '{meter_id}'",
                code="resource_missing",
                param="id",
            )
        return meter

    def _v1_get_meter(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        with self._lock:
            return 200, copy.deepcopy(self._get_meter_or_404(m["id"])), {}

    def _set_meter_status(self, meter: dict[str, Any], status: str) -> None:
        # billing.meter status enum [active, inactive]; status_transitions.deactivated_at
        # (https://docs.stripe.com/api/billing/meter/deactivate: "no more meter events will be accepted").
        meter["status"] = status
        meter["status_transitions"] = {"deactivated_at": int(self.now()) if status == "inactive" else None}
        meter["updated"] = int(self.now())

    def _v1_deactivate_meter(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        with self._lock:
            meter = self._get_meter_or_404(m["id"])
            self._set_meter_status(meter, "inactive")
            return 200, copy.deepcopy(meter), {}

    def _v1_reactivate_meter(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        with self._lock:
            meter = self._get_meter_or_404(m["id"])
            self._set_meter_status(meter, "active")
            return 200, copy.deepcopy(meter), {}

    def _inactive_meter(self, event_name: str) -> dict[str, Any] | None:
        return next(
            (x for x in self._meters.values() if x["event_name"] == event_name and x["status"] != "active"), None
        )

    @staticmethod
    def _page(items: list[dict[str, Any]], params: Mapping[str, Any], url: str) -> dict[str, Any]:
        # The list object and cursor params: https://docs.stripe.com/api/pagination (limit 1..100, default 10).
        limit = _int_param(params, "limit", required=False) or 10
        if not 1 <= limit <= 100:
            raise _ApiError(
                400,
                "invalid_request_error",
                "Invalid limit: must be between 1 and 100",
                code="parameter_invalid_integer",
                param="limit",
            )
        ids = [x["id"] for x in items]
        after, before = params.get("starting_after"), params.get("ending_before")
        if after:
            start = ids.index(after) + 1 if after in ids else len(ids)
            window = items[start : start + limit]
            has_more = start + limit < len(items)
        elif before:
            end = ids.index(before) if before in ids else 0
            window = items[max(0, end - limit) : end]
            has_more = end - limit > 0
        else:
            window, has_more = items[:limit], len(items) > limit
        return {"object": "list", "data": window, "has_more": has_more, "url": url}

    def _v1_event_summaries(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        # GET /v1/billing/meters/{id}/event_summaries: customer, start_time (inclusive), end_time (exclusive), both
        # "Must be aligned with minute boundaries"; value_grouping_window hour|day needs hour / UTC-day alignment; no
        # window gives "a single event summary" for the range; the list object holds billing.meter_event_summary
        # {id, object, aggregated_value, end_time, livemode, meter, start_time}
        # (https://docs.stripe.com/api/billing/meter-event-summary/list; stripe/params/billing/
        # _meter_list_event_summaries_params.py). The documented example lists the newest window first.
        _check_unknown(
            params,
            (
                "customer",
                "start_time",
                "end_time",
                "value_grouping_window",
                "limit",
                "starting_after",
                "ending_before",
                "dimension_group_by_keys",
                "dimension_filters",
                "expand",
            ),
        )
        with self._lock:
            meter = copy.deepcopy(self._get_meter_or_404(m["id"]))
        customer = params.get("customer")
        if not customer:
            raise _ApiError.missing("customer")
        start = _int_param(params, "start_time", required=True)
        end = _int_param(params, "end_time", required=True)
        assert start is not None and end is not None
        for name, value in (("start_time", start), ("end_time", end)):
            if value % 60:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    f"{name} must be aligned with minute boundaries.",
                    code="parameter_invalid_integer",
                    param=name,
                )
        if start >= end:
            raise _ApiError(
                400,
                "invalid_request_error",
                "start_time must be before end_time.",
                code="parameter_invalid_integer",
                param="start_time",
            )
        grouping = params.get("value_grouping_window")
        if grouping not in (None, "", "hour", "day"):
            raise _ApiError(
                400,
                "invalid_request_error",
                "Invalid value_grouping_window: must be one of day or hour",
                code="parameter_invalid_string",
                param="value_grouping_window",
            )
        step = {"hour": 3600, "day": 86_400}.get(grouping or "", 0)
        if step:
            for name, value in (("start_time", start), ("end_time", end)):
                if value % step:
                    raise _ApiError(
                        400,
                        "invalid_request_error",
                        f"{name} must be aligned with {grouping} boundaries for value_grouping_window={grouping}.",
                        code="parameter_invalid_integer",
                        param=name,
                    )
        group_by, filters = self._dimension_params(meter, params)
        windows = [(s, min(s + step, end)) for s in range(start, end, step)] if step else [(start, end)]
        with self._lock:
            events = [
                ev
                for ev in self._effective_events(meter)
                if ev["customer"] == customer and all(ev["dimensions"].get(k) == v for k, v in filters.items())
            ]
        summaries = []
        for w_start, w_end in reversed(windows):
            inside = [ev for ev in events if w_start <= ev["timestamp"] < w_end]
            groups: dict[tuple[str | None, ...], list[dict[str, Any]]] = {}
            for ev in inside:
                groups.setdefault(tuple(ev["dimensions"].get(k) for k in group_by), []).append(ev)
            if not group_by:
                groups = {(): inside}
            for values in sorted(groups, key=lambda v: tuple(x or "" for x in v)):
                extra = {"dimensions": dict(zip(group_by, values, strict=True))} if group_by else {}
                key = f"{meter['id']}|{customer}|{w_start}|{w_end}|{sorted(extra.get('dimensions', {}).items())}"
                summaries.append(
                    {
                        "id": "mtrusg_test_" + hashlib.sha256(key.encode()).hexdigest()[:40],
                        "object": "billing.meter_event_summary",
                        "aggregated_value": self._aggregate(meter, groups[values]),
                        **extra,
                        "end_time": w_end,
                        "livemode": False,
                        "meter": meter["id"],
                        "start_time": w_start,
                    }
                )
        return 200, self._page(summaries, params, f"/v1/billing/meters/{meter['id']}/event_summaries"), {}

    @staticmethod
    def _dimension_params(meter: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
        """The summaries' dimension_group_by_keys and dimension_filters (preview), each key one of the meter's
        dimension_payload_keys. Stripe's text for a key the meter lacks is not documented: this one says what is
        wrong. A summary without grouping carries no `dimensions` (the field exists only in preview versions)."""
        keys = set(meter.get("dimension_payload_keys") or ())
        group_by = params.get("dimension_group_by_keys") or []
        filters = params.get("dimension_filters") or {}
        if not isinstance(group_by, list) or not isinstance(filters, dict):
            raise _ApiError(
                400,
                "invalid_request_error",
                "dimension_group_by_keys is a list and dimension_filters a hash.",
                code="parameter_invalid_string",
                param="dimension_group_by_keys",
            )
        for name, given in (("dimension_group_by_keys", group_by), ("dimension_filters", list(filters))):
            for key in given:
                if key not in keys:
                    raise _ApiError(
                        400,
                        "invalid_request_error",
                        f"{name}: {key!r} is not one of the meter's dimension_payload_keys "
                        f"({', '.join(sorted(keys)) or 'none'}).",
                        code="parameter_invalid_string",
                        param=name,
                    )
        return [str(k) for k in group_by], {str(k): str(v) for k, v in filters.items()}

    def _effective_events(self, meter: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Accepted events of a meter; for a pre-aggregated meter (event_time_window) only the last one received in
        each hour/day window counts ("A newer event sent within the same hourly or daily window overwrites the
        previous one", https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage)."""
        # Eventually consistent, as Stripe's summaries are: an event counts once it is visible, and a cancellation
        # takes effect once it is visible too (visibility_delay_seconds after each was received).
        visible_before = self.now() - self._visibility_delay
        events = [
            ev
            for ev in self._events
            if ev["meter"] == meter["id"]
            and ev["received_at"] <= visible_before
            and (ev["status"] == "accepted" or (ev["status"] == "cancelled" and ev["cancelled_at"] > visible_before))
        ]
        window = {"hour": 3600, "day": 86_400}.get(meter.get("event_time_window") or "", 0)
        if not window:
            return events
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        for ev in events:
            latest[(ev["customer"], ev["timestamp"] // window)] = ev
        return list(latest.values())

    @staticmethod
    def _aggregate(meter: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> int:
        formula = meter["default_aggregation"]["formula"]
        if formula == "count":
            return len(events)
        if formula == "last":
            return max(events, key=lambda ev: (ev["timestamp"], ev["received_at"]))["value"] if events else 0
        return sum(ev["value"] for ev in events)

    # -- customers --------------------------------------------------------------------------------------------------

    def _create_customer(self, params: Mapping[str, Any], customer_id: str | None = None) -> dict[str, Any]:
        cid = customer_id or f"cus_{_rand(14)}"
        if cid in self._customers:
            raise _ApiError(
                400,
                "invalid_request_error",
                f"Customer already exists: '{cid}'",
                code="resource_already_exists",
                param="id",
            )
        # The customer object: https://docs.stripe.com/api/customers/object (a subset).
        customer: dict[str, Any] = {
            "id": cid,
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": int(self.now()),
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": params.get("description"),
            "email": params.get("email"),
            "invoice_prefix": _rand(8).upper(),
            "livemode": False,
            "metadata": dict(params.get("metadata") or {}),
            "name": params.get("name"),
            "phone": params.get("phone"),
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        self._customers[cid] = customer
        return customer

    def _v1_create_customer(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        with self._lock:
            return 200, copy.deepcopy(self._create_customer(params)), {}

    def _delete_customer(self, customer_id: str) -> dict[str, Any]:
        if customer_id not in self._customers:
            raise _ApiError(
                404, "invalid_request_error", f"No such customer: '{customer_id}'", code="resource_missing", param="id"
            )
        # deleted_customer: required [deleted, id, object]; deleted enum [true] (stripe/openapi spec3).
        deleted = {"id": customer_id, "object": "customer", "deleted": True}
        self._customers[customer_id] = deleted
        return deleted

    def _v1_delete_customer(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        with self._lock:
            return 200, copy.deepcopy(self._delete_customer(m["id"])), {}

    def _v1_get_customer(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        with self._lock:
            customer = self._customers.get(m["id"])
            if customer is None:
                # Stripe's resource_missing wording: "No such customer: 'cus_...'" (https://docs.stripe.com/error-codes/resource-missing)
                raise _ApiError(
                    404, "invalid_request_error", f"No such customer: '{m['id']}'", code="resource_missing", param="id"
                )
            return 200, copy.deepcopy(customer), {}

    # -- meter events -----------------------------------------------------------------------------------------------

    def _expire_identifiers(self) -> None:
        cutoff = self.now() - self._dedup_window
        stale = [i for i, ev in self._by_identifier.items() if ev["received_at"] < cutoff]
        for identifier in stale:
            del self._by_identifier[identifier]

    def _async_error(self, ev: dict[str, Any], code: str, message: str) -> None:
        assert code in ASYNC_ERROR_CODES, code
        ev["status"], ev["error_code"], ev["error_message"] = "invalid", code, message
        self._errors.append(
            {
                "code": code,
                "message": message,
                "identifier": ev["identifier"],
                "event_name": ev["event_name"],
                "meter": ev["meter"],
                "customer": ev["customer"],
                "source": ev["source"],
                "time": ev["received_at"],
            }
        )

    def _store_event(
        self,
        *,
        event_name: str,
        identifier: str,
        payload: Mapping[str, Any],
        timestamp: int,
        source: str,
        meter: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Store a received event, then run Stripe's asynchronous validation on it (the fake runs it at once)."""
        now = self.now()
        ev: dict[str, Any] = {
            "identifier": identifier,
            "event_name": event_name,
            "meter": meter["id"] if meter else None,
            "customer": None,
            "value": None,
            "payload": dict(payload),
            "dimensions": {},
            "timestamp": timestamp,
            "received_at": now,
            "source": source,
            "status": "accepted",
            "error_code": None,
            "error_message": None,
            "cancelled_at": None,
        }
        self._events.append(ev)
        self._by_identifier[identifier] = ev
        if meter is None:
            self._async_error(ev, "no_meter", _V1_NO_METER_MESSAGE.format(event_name=event_name))
            return ev
        ckey = meter["customer_mapping"]["event_payload_key"]
        vkey = meter["value_settings"]["event_payload_key"]
        customer = payload.get(ckey)
        ev["customer"] = customer
        dimension_keys = meter.get("dimension_payload_keys") or ()
        ev["dimensions"] = {k: str(payload[k]) for k in dimension_keys if payload.get(k) not in (None, "")}
        missing = [k for k in dimension_keys if k not in ev["dimensions"]]
        if timestamp < now - MAX_EVENT_AGE_S:
            self._async_error(
                ev, "timestamp_too_far_in_past", "The timestamp must be within the past 35 calendar days."
            )
        elif timestamp > now + MAX_EVENT_SKEW_S:
            self._async_error(ev, "timestamp_in_future", "The timestamp must not be more than 5 minutes in the future.")
        elif not customer:
            # Message from the documented error report example (https://docs.stripe.com/api/v2/core/events/object).
            self._async_error(
                ev, "meter_event_no_customer_defined", f"Customer mapping key {ckey} not found in payload."
            )
        elif customer not in self._customers:
            self._async_error(ev, "meter_event_customer_not_found", f"No customer found with id {customer}.")
        elif missing:
            self._async_error(
                ev,
                "missing_dimension_payload_keys",
                f"The event payload is missing the meter's dimension payload keys: {', '.join(missing)}.",
            )
        else:
            raw = payload.get(vkey)
            value = self._parse_value(raw)
            if value is None:
                self._async_error(
                    ev,
                    "meter_event_invalid_value",
                    f"Value key {vkey} not found in payload."
                    if raw in (None, "")
                    else f"The value {raw!r} in the event payload is not a whole number.",
                )
            elif len(str(abs(value)).lstrip("0")) > MAX_VALUE_DIGITS:
                self._async_error(
                    ev,
                    "meter_event_value_too_many_digits",
                    f"The value in the event payload can have at most {MAX_VALUE_DIGITS} digits. Received {raw}.",
                )
            else:
                ev["value"] = value
        return ev

    @staticmethod
    def _parse_value(raw: Any) -> int | None:
        # "The numerical usage value in the payload only accepts whole number values." and negative cycle totals bill
        # as 0 (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api), so negatives pass.
        if raw is None:
            return None
        text = str(raw).strip()
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else None

    def _v1_meter_event(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        # POST /v1/billing/meter_events: event_name, payload (strings), identifier, timestamp (unix seconds); returns
        # {object: billing.meter_event, created, event_name, identifier, livemode, payload, timestamp}
        # (https://docs.stripe.com/api/billing/meter-event/create; stripe/billing/_meter_event.py).
        _check_unknown(params, ("event_name", "payload", "identifier", "timestamp", "expand"))
        event_name = params.get("event_name")
        if not event_name:
            raise _ApiError.missing("event_name")
        payload = params.get("payload")
        if not isinstance(payload, dict) or not payload:
            raise _ApiError.missing("payload")
        identifier = params.get("identifier") or str(uuid.uuid4())
        for name, value in (("event_name", event_name), ("identifier", identifier)):
            if len(value) > MAX_NAME_LEN:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    f"{name} must be at most 100 characters.",
                    code="parameter_invalid_string",
                    param=name,
                )
        ts_param = _int_param(params, "timestamp", required=False)
        with self._lock:
            now = self.now()
            timestamp = int(now) if ts_param is None else ts_param
            meter = self._active_meter(event_name)
            if meter is None:
                raise _ApiError(
                    400, "invalid_request_error", _V1_NO_METER_MESSAGE.format(event_name=event_name), param="event_name"
                )
            _check_payload_values(payload)
            if timestamp < now - MAX_EVENT_AGE_S:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    "Timestamp must be within the past 35 calendar days or up to 5 minutes in the future.",
                    code="timestamp_too_far_in_past",
                    param="timestamp",
                )
            if timestamp > now + MAX_EVENT_SKEW_S:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    "Timestamp must be within the past 35 calendar days or up to 5 minutes in the future.",
                    code="timestamp_in_future",
                    param="timestamp",
                )
            value = self._parse_value(payload.get(meter["value_settings"]["event_payload_key"]))
            if value is not None and len(str(abs(value)).lstrip("0")) > MAX_VALUE_DIGITS:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    f"The value in the event payload can have at most {MAX_VALUE_DIGITS} digits. Received "
                    f"{payload.get(meter['value_settings']['event_payload_key'])}.",
                    code="meter_event_value_too_many_digits",
                    param="payload",
                )
            self._expire_identifiers()
            if identifier in self._by_identifier:
                self._duplicates += 1
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    _V1_DUPLICATE_MESSAGE.format(identifier=identifier),
                    headers={"Stripe-Should-Retry": "false"},
                )
            ev = self._store_event(
                event_name=event_name,
                identifier=identifier,
                payload=payload,
                timestamp=timestamp,
                source="v1",
                meter=meter,
            )
            return (
                200,
                {
                    "object": "billing.meter_event",
                    "created": int(ev["received_at"]),
                    "event_name": event_name,
                    "identifier": identifier,
                    "livemode": False,
                    "payload": dict(payload),
                    "timestamp": timestamp,
                },
                {},
            )

    def _v2_meter_event(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        # POST /v2/billing/meter_events (synchronous validation), JSON; errors archived_meter, duplicate_meter_event,
        # no_meter, payload_invalid_value ("The value must be a positive integer."), payload_no_customer_defined,
        # payload_no_value_defined (https://docs.stripe.com/api/v2/billing/meter-event/create).
        _check_unknown(params, ("event_name", "payload", "identifier", "timestamp"))
        event_name = params.get("event_name")
        if not isinstance(event_name, str) or not event_name:
            raise _ApiError.missing("event_name")
        payload = params.get("payload")
        if not isinstance(payload, dict):
            raise _ApiError.missing("payload")
        identifier = params.get("identifier") or str(uuid.uuid4())
        with self._lock:
            now = self.now()
            timestamp = int(now)
            if params.get("timestamp") is not None:
                try:
                    timestamp = int(_parse_rfc3339(str(params["timestamp"])))
                except ValueError:
                    raise _ApiError(
                        400,
                        "invalid_request_error",
                        "timestamp must be an RFC 3339 date-time.",
                        code="invalid_fields",
                        param="timestamp",
                        cacheable=False,
                    ) from None
            meter = self._active_meter(event_name)
            if meter is None and self._inactive_meter(event_name) is not None:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    "The meter must be Active to submit events.",
                    code="archived_meter",
                    param="event_name",
                )  # v2.error.archived_meter
            if meter is None:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    "A meter must exist to submit events.",
                    code="no_meter",
                    param="event_name",
                )
            _check_payload_values(payload)
            if not payload.get(meter["customer_mapping"]["event_payload_key"]):
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    "The payload must have a reference to the customer.",
                    code="payload_no_customer_defined",
                    param="payload",
                )
            raw = payload.get(meter["value_settings"]["event_payload_key"])
            if raw in (None, ""):
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    "The payload must have a value.",
                    code="payload_no_value_defined",
                    param="payload",
                )
            value = self._parse_value(raw)
            if value is None or value <= 0:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    "The value must be a positive integer.",
                    code="payload_invalid_value",
                    param="payload",
                )
            self._expire_identifiers()
            if identifier in self._by_identifier:
                self._duplicates += 1
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    _V2_DUPLICATE_MESSAGE,
                    code="duplicate_meter_event",
                    headers={"Stripe-Should-Retry": "false"},
                )
            ev = self._store_event(
                event_name=event_name,
                identifier=identifier,
                payload={k: str(v) for k, v in payload.items()},
                timestamp=timestamp,
                source="v2",
                meter=meter,
            )
            return (
                200,
                {
                    "object": "v2.billing.meter_event",
                    "created": _rfc3339(ev["received_at"]),
                    "event_name": event_name,
                    "identifier": identifier,
                    "livemode": False,
                    "payload": dict(ev["payload"]),
                    "timestamp": _rfc3339(timestamp),
                },
                {},
            )

    def _v2_session(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        # POST /v2/billing/meter_event_session, no parameters; returns {id, object: v2.billing.meter_event_session,
        # authentication_token, created, expires_at, livemode} (https://docs.stripe.com/api/v2/billing-meter-stream/
        # object; stripe/v2/billing/_meter_event_session.py).
        _check_unknown(params, ())
        with self._lock:
            now = self.now()
            token = f"token_test_{_rand(40)}"
            session = {
                "id": f"mes_test_{_rand(24)}",
                "object": "v2.billing.meter_event_session",
                "authentication_token": token,
                "created": _rfc3339(now),
                "expires_at": _rfc3339(now + self._session_ttl),
                "livemode": False,
                "_expires": now + self._session_ttl,
            }
            self._sessions[token] = session
            return 200, {k: v for k, v in session.items() if not k.startswith("_")}, {}

    def _v2_stream(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        # POST /v2/billing/meter_event_stream on the meter-events base: {"events": [...]} of at most 100
        # {event_name, identifier?, payload, timestamp? (RFC 3339)}; "Events are processed asynchronously, including
        # validation"; the answer is `{}` (https://docs.stripe.com/api/v2/billing/meter-event-stream/create). So a
        # repeated identifier is dropped silently and a bad event is reported later, not rejected here. Only a body
        # that breaks the request schema (no events, > 100, a missing required field) is refused with a 400; that
        # error's code is not documented, "invalid_fields" is the v2 convention the SDKs special-case
        # (stripe-node generateV2Error).
        _check_unknown(params, ("events",))
        events = params.get("events")
        if not isinstance(events, list) or not events:
            raise _ApiError(
                400,
                "invalid_request_error",
                "events is required and must be a non-empty array.",
                code="invalid_fields",
                param="events",
            )
        if len(events) > MAX_STREAM_EVENTS:
            raise _ApiError(
                400,
                "invalid_request_error",
                f"events supports up to {MAX_STREAM_EVENTS} events per request; got {len(events)}.",
                code="invalid_fields",
                param="events",
            )
        parsed = []
        for i, ev in enumerate(events):
            if not isinstance(ev, dict):
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    f"events[{i}] must be an object.",
                    code="invalid_fields",
                    param=f"events[{i}]",
                )
            unknown = set(ev) - {"event_name", "identifier", "payload", "timestamp"}
            if unknown:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    f"Received unknown parameter: events[{i}].{sorted(unknown)[0]}",
                    code="invalid_fields",
                    param=f"events[{i}]",
                )
            if not isinstance(ev.get("event_name"), str) or not ev["event_name"]:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    f"events[{i}].event_name is required.",
                    code="invalid_fields",
                    param=f"events[{i}].event_name",
                )
            if not isinstance(ev.get("payload"), dict):
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    f"events[{i}].payload is required.",
                    code="invalid_fields",
                    param=f"events[{i}].payload",
                )
            ts = None
            if ev.get("timestamp") is not None:
                try:
                    ts = int(_parse_rfc3339(str(ev["timestamp"])))
                except ValueError:
                    raise _ApiError(
                        400,
                        "invalid_request_error",
                        f"events[{i}].timestamp must be an RFC 3339 date-time.",
                        code="invalid_fields",
                        param=f"events[{i}].timestamp",
                    ) from None
            parsed.append((ev, ts))
        stored = 0
        with self._lock:
            now = self.now()
            self._expire_identifiers()
            for ev, ts in parsed:
                identifier = ev.get("identifier") or str(uuid.uuid4())
                if identifier in self._by_identifier:
                    self._duplicates += 1
                    continue
                self._store_event(
                    event_name=ev["event_name"],
                    identifier=identifier,
                    payload={k: str(v) for k, v in ev["payload"].items()},
                    timestamp=int(now) if ts is None else ts,
                    source="v2_stream",
                    meter=self._active_meter(ev["event_name"]),
                )
                stored += 1
        return 200, {"_recorded": stored > 0}, {}

    # -- adjustments ------------------------------------------------------------------------------------------------

    def _cancel(self, event_name: str, identifier: str, source: str) -> dict[str, Any]:
        """Apply a cancel adjustment (Stripe applies it asynchronously; the fake does it at once)."""
        now = self.now()
        ev = self._by_identifier.get(identifier)
        if ev is None or ev["event_name"] != event_name:
            outcome = "not_found"
        elif ev["status"] == "cancelled":
            outcome = "already_cancelled"
        elif now - ev["received_at"] > CANCEL_WINDOW_S:
            outcome = "too_late"
        else:
            ev["status"], ev["cancelled_at"] = "cancelled", now
            outcome = "cancelled"
        adj = {
            "id": f"mtr_event_adj_test_{_rand(24)}",
            "event_name": event_name,
            "identifier": identifier,
            "source": source,
            "created": now,
            "outcome": outcome,
        }
        self._adjustments.append(adj)
        return adj

    def _v1_adjustment(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        # POST /v1/billing/meter_event_adjustments: event_name, type=cancel, cancel[identifier]; returns {object:
        # billing.meter_event_adjustment, livemode, status: "pending", event_name, type, cancel}
        # (https://docs.stripe.com/api/billing/meter-event-adjustment/create;
        # stripe/billing/_meter_event_adjustment.py).
        _check_unknown(params, ("event_name", "type", "cancel", "expand"))
        for name in ("event_name", "type"):
            if not params.get(name):
                raise _ApiError.missing(name)
        if params["type"] != "cancel":
            raise _ApiError(
                400,
                "invalid_request_error",
                "Invalid type: must be cancel",
                code="parameter_invalid_string",
                param="type",
            )
        cancel = params.get("cancel")
        identifier = cancel.get("identifier") if isinstance(cancel, dict) else None
        if not identifier:
            raise _ApiError.missing("cancel[identifier]")
        with self._lock:
            if self._active_meter(params["event_name"]) is None:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    _V1_NO_METER_MESSAGE.format(event_name=params["event_name"]),
                    param="event_name",
                )
            self._cancel(params["event_name"], identifier, "v1")
        return (
            200,
            {
                "object": "billing.meter_event_adjustment",
                "livemode": False,
                "status": "pending",
                "event_name": params["event_name"],
                "type": "cancel",
                "cancel": {"identifier": identifier},
            },
            {},
        )

    def _v2_adjustment(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        # POST /v2/billing/meter_event_adjustments (JSON): cancel.identifier, event_name, type; returns
        # v2.billing.meter_event_adjustment {id, object, cancel, created, event_name, livemode, status, type};
        # error 400 invalid_cancel_configuration (https://docs.stripe.com/api/v2/billing/meter-event-adjustment/create).
        _check_unknown(params, ("event_name", "type", "cancel"))
        for name in ("event_name", "type"):
            if not params.get(name):
                raise _ApiError.missing(name)
        cancel = params.get("cancel")
        identifier = cancel.get("identifier") if isinstance(cancel, dict) else None
        if params["type"] != "cancel" or not identifier:
            raise _ApiError(
                400,
                "invalid_request_error",
                "The adjustment configuration is invalid for the adjustment type.",
                code="invalid_cancel_configuration",
                param="cancel",
            )
        with self._lock:
            adj = self._cancel(params["event_name"], identifier, "v2")
            return (
                200,
                {
                    "id": adj["id"],
                    "object": "v2.billing.meter_event_adjustment",
                    "cancel": {"identifier": identifier},
                    "created": _rfc3339(adj["created"]),
                    "event_name": params["event_name"],
                    "livemode": False,
                    "status": "pending",
                    "type": "cancel",
                },
                {},
            )

    # -- v2 events --------------------------------------------------------------------------------------------------

    def _v2_get_event(self, req: _Request, m: re.Match[str], params: dict[str, Any]) -> _Handled:
        # GET /v2/core/events/{id}: what EventNotification.fetch_event() calls (stripe/v2/core/_event.py).
        with self._lock:
            event = self._v2_events.get(m["id"])
            if event is None:
                raise _ApiError(
                    404, "invalid_request_error", f"No such event: '{m['id']}'", code="resource_missing", param="id"
                )
            return 200, copy.deepcopy(event), {}


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spendgate.testing.fake_stripe",
        description="Run the fake Stripe API (Billing Meters) until interrupted.",
    )
    parser.add_argument("--port", type=int, default=0, help="API port (default: any free port)")
    parser.add_argument(
        "--meter-events-port",
        type=int,
        default=0,
        help="meter-events port (default: any free port; ignored with --same-host)",
    )
    parser.add_argument("--same-host", action="store_true", help="serve the meter event stream on the API port too")
    parser.add_argument(
        "--meter",
        action="append",
        default=None,
        metavar="EVENT_NAME",
        help="create a sum meter for this event name (repeatable; default: spendgate_usage and "
        "token-billing-tokens, with its dimensions model and token_type)",
    )
    parser.add_argument(
        "--customer",
        action="append",
        default=[],
        metavar="CUSTOMER_ID",
        help="a customer that exists from the start (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--rate-500", type=float, default=0.0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--fail-after-record-rate", type=float, default=0.0)
    parser.add_argument("--session-ttl", type=float, default=DEFAULT_SESSION_TTL_S)
    args = parser.parse_args(argv)

    meters = args.meter if args.meter is not None else list(DEFAULT_METERS)
    fake = FakeStripe(
        meters=meters,
        customers=args.customer,
        port=args.port,
        meter_events_port=args.meter_events_port,
        same_host=args.same_host,
        seed=args.seed,
        rate_429=args.rate_429,
        rate_500=args.rate_500,
        latency_seconds=args.latency,
        fail_after_record_rate=args.fail_after_record_rate,
        session_ttl_seconds=args.session_ttl,
    )
    print(f"fake Stripe API:          {fake.url}", flush=True)
    print(f"fake Stripe meter events: {fake.meter_events_url}", flush=True)
    names = [m if isinstance(m, str) else str(m["event_name"]) for m in meters]
    print("meters: " + ", ".join(f"{m['event_name']}={m['id']}" for m in (fake.meter(n) for n in names)), flush=True)
    print(
        'use: stripe.StripeClient("sk_test_...", base_addresses='
        f'{{"api": "{fake.url}", "meter_events": "{fake.meter_events_url}"}})',
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Alerts for apps: the alert webhook's body and signature, and how a receiver checks it.

With `alert_webhook_url` set, the sidecar POSTs each alert, one per request and in order, as a JSON body:

    {"id": "alert_42", "seq": 42, "kind": "limit_reached", "customer_id": "cus_123", "ts_ms": 1764547200000,
     "message": "budget \"cus_123\" reached its limit of ...", "values": {"limit": 5000000, "spent": 4990000, ...}}

signed like Stripe signs its webhooks, in the header

    Spendgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under alert_webhook_secret>

A receiver verifies the raw body before parsing it, and answers 2xx once it has the alert:

    from spendgate.alerts import SignatureVerificationError, verify_signature

    try:
        verify_signature(request_body, request.headers.get("Spendgate-Signature"), secret)
    except SignatureVerificationError:
        return 400                                   # not from this sidecar, altered, or older than 5 minutes
    alert = json.loads(request_body)                 # dedupe by alert["id"] (or "seq"): delivery is at-least-once

Stdlib only, so that an app can import it without the server's dependencies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "KINDS",
    "SIGNATURE_HEADER",
    "START_SEQ_METADATA_KEY",
    "SignatureVerificationError",
    "signature_header",
    "verify_signature",
    "webhook_body",
]

SIGNATURE_HEADER: Final[str] = "Spendgate-Signature"
SIGNATURE_SCHEME: Final[str] = "v1"
DEFAULT_TOLERANCE_S: Final[int] = 300
"""How far the signature's timestamp may be from the receiver's clock, either way: older requests are replays."""
KINDS: Final[tuple[str, ...]] = (
    "soft_limit_crossed",
    "limit_reached",
    "breaker_tripped",
    "frozen",
    "unfrozen",
    "settlement_dead_letter",
    "invoice_spike",
    "reconcile_divergence",
    "clock_step",
)
"""Every alert kind, as the engine names it (spendgate.v1.AlertKind without its prefix, lower case)."""
START_SEQ_METADATA_KEY: Final[str] = "spendgate-alert-start-seq"
"""Initial metadata of every WatchAlerts stream: the seq it starts after (for "from now": the newest alert then). A
client that loses the stream before its first alert resumes after this seq, so "from now" has no gap either."""
# A header longer than this is not ours (a few signatures of 64 hex digits and a timestamp): refuse without parsing.
MAX_HEADER_CHARS: Final[int] = 4096


class SignatureVerificationError(ValueError):
    """The request is not a genuine, fresh alert from the sidecar; the message says which check failed."""


def alert_id(alert: Mapping[str, Any]) -> str:
    """The alert's id in the webhook body: stable across redeliveries, so a receiver can dedupe on it, and unique
    across sidecars and restores (a restore rewinds the seq, not the instance id that raised the alert)."""
    instance = alert.get("instance_id") or "0" * 16
    if set(instance) == {"0"}:
        return f"alert_{alert['seq']}"  # raised before data dirs had instance ids
    return f"alert_{instance}_{alert['seq']}"


def webhook_body(alert: Mapping[str, Any]) -> bytes:
    """The JSON body of one alert (an engine AlertEntry): compact, keys sorted, the same bytes on every redelivery."""
    body = {
        "id": alert_id(alert),
        "seq": alert["seq"],
        "kind": alert["kind"],
        "customer_id": alert["customer_id"],
        "ts_ms": alert["ts_ms"],
        "message": alert["message"],
        "values": dict(alert["values"]),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


def _digest(payload: bytes, secret: str, timestamp_s: int) -> str:
    signed = str(timestamp_s).encode("ascii") + b"." + payload
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def signature_header(payload: bytes, secret: str, *, timestamp_s: int | None = None) -> str:
    """The Spendgate-Signature value for `payload`, signed now (or at `timestamp_s`)."""
    assert secret, "an alert webhook needs a secret"
    t = int(time.time()) if timestamp_s is None else timestamp_s
    return f"t={t},{SIGNATURE_SCHEME}={_digest(payload, secret, t)}"


def verify_signature(
    payload: bytes | str,
    header: str | None,
    secret: str,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    *,
    now_s: float | None = None,
) -> None:
    """Check that `payload` (the raw request body) was signed with `secret` within `tolerance_s` of now.

    Returns None when it was; raises SignatureVerificationError saying why not. Several v1 signatures may be present
    (one matching is enough); other schemes are ignored. The comparison is constant-time.
    """
    if not secret:
        raise SignatureVerificationError("no secret to verify with: pass the sidecar's alert_webhook_secret")
    if not header:
        raise SignatureVerificationError(f"no {SIGNATURE_HEADER} header")
    if len(header) > MAX_HEADER_CHARS:
        raise SignatureVerificationError(f"the {SIGNATURE_HEADER} header is longer than {MAX_HEADER_CHARS} characters")
    timestamp_s: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp_s = int(value, 10)
            except ValueError:
                raise SignatureVerificationError(f"the timestamp t={value!r} is not an integer") from None
        elif key == SIGNATURE_SCHEME:
            signatures.append(value)
    if timestamp_s is None:
        raise SignatureVerificationError(f"the {SIGNATURE_HEADER} header has no t=<unix seconds>")
    if not signatures:
        raise SignatureVerificationError(f"the {SIGNATURE_HEADER} header has no {SIGNATURE_SCHEME}= signature")
    body = payload.encode("utf-8") if isinstance(payload, str) else payload
    expected = _digest(body, secret, timestamp_s)
    # Check every signature (no early exit), so that the time taken does not tell which one matched.
    matched = False
    for signature in signatures:
        matched |= hmac.compare_digest(expected, signature)
    if not matched:
        raise SignatureVerificationError("no signature matches: a wrong secret, or the body was altered")
    now = time.time() if now_s is None else now_s
    if tolerance_s > 0 and abs(now - timestamp_s) > tolerance_s:
        raise SignatureVerificationError(
            f"the signature's timestamp is {abs(now - timestamp_s):.0f} s from now, more than the {tolerance_s} s"
            " tolerated (a replayed request, or a clock off)"
        )

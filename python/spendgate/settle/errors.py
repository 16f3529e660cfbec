"""What a failed Stripe call means for the events it carried: delivered after all, retry, or refused for good.

- DELIVERED: v1 answers a repeated identifier with HTTP 400 "An event already exists with identifier <id>." and no
  error code (v2's synchronous endpoint says `duplicate_meter_event`). Stripe has the event: acknowledge it.
- RETRY: 429, 409, 5xx and connection errors, retried now with exponential backoff and full jitter, unless the answer
  carries `Stripe-Should-Retry: false` (RETRY_LATER: not now; a later round resends it, which the identifier makes
  safe). `Stripe-Should-Retry: true` always retries.
- RETRY_LATER: also what a problem of the configuration gets (401 bad key, 403 a restricted key without the right
  permission, 404 a URL Stripe does not know: a wrong STRIPE_API_BASE). Those are nobody's event's fault, so they stall
  settlement with a clear error instead of dead-lettering everything.
- SESSION_EXPIRED: the v2 stream's session token expired: refresh it and resend at once.
- PERMANENT: any other 4xx (unknown meter, bad parameter, too old): dead-letter with Stripe's message.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import stripe

# Stripe's duplicate answer, recognised by more than one signal, since the v1 wording is not in the spec
# (research/stripe-fidelity.md D4): the v2 error code, the v1 message as observed, and the wordings Stripe uses for
# a repeated identifier elsewhere ("...duplicate identifier has already been submitted" on v2).
_DUPLICATE_MESSAGES: Final = re.compile(
    r"an event already exists with identifier|duplicate identifier|identifier .* already (?:exists|been submitted)",
    re.IGNORECASE,
)
DUPLICATE_V2_CODE: Final[str] = "duplicate_meter_event"
DUPLICATE_CODES: Final[frozenset[str]] = frozenset({DUPLICATE_V2_CODE, "duplicate_meter_event_identifier"})
# The metrics' label of a request that got no answer within its timeout (and of a call found running past it).
TIMEOUT_CODE: Final[str] = "timeout"
# Longest reason the engine stores with a dead letter.
MAX_REASON_BYTES: Final[int] = 1024


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    RETRY_LATER = "retry_later"
    SESSION_EXPIRED = "session_expired"
    PERMANENT = "permanent"


@dataclasses.dataclass(frozen=True, slots=True)
class Classified:
    verdict: Verdict
    reason: str


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A response header, whatever the case of its name (the SDK passes the HTTP library's mapping through)."""
    if not headers:
        return None
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def should_retry_header(error: stripe.StripeError) -> bool | None:
    value = header(error.headers, "Stripe-Should-Retry")
    if value is None:
        return None
    return value.strip().lower() == "true"


def describe(error: BaseException) -> str:
    """Stripe's answer in one line, for logs, dead-letter reasons and the status RPC (never a secret: Stripe's own
    messages redact keys)."""
    import stripe  # noqa: PLC0415 - the SDK loads only when settlement is on

    if not isinstance(error, stripe.StripeError):
        return f"{type(error).__name__}: {error}"
    if is_timeout(error):
        cause = error.__cause__
        return (
            "Stripe did not answer within the request timeout (settle_request_timeout_ms): "
            f"{type(cause).__name__}: {cause}"
        )
    parts = []
    if error.http_status is not None:
        parts.append(f"HTTP {error.http_status}")
    else:
        parts.append("no HTTP answer")
    if error.code:
        parts.append(f"code {error.code}")
    if error.request_id:
        parts.append(f"request {error.request_id}")
    message = error.user_message or type(error).__name__
    return f"Stripe {', '.join(parts)}: {message}"


def classify(error: BaseException) -> Classified:
    import stripe  # noqa: PLC0415

    reason = describe(error)
    if not isinstance(error, stripe.StripeError):
        return Classified(Verdict.RETRY_LATER, reason)  # a bug or an unexpected library error: never lose the event
    if isinstance(error, stripe.TemporarySessionExpiredError):
        return Classified(Verdict.SESSION_EXPIRED, reason)
    status = error.http_status
    message = error.user_message or ""
    if is_duplicate(status, error.code, message):
        return Classified(Verdict.DELIVERED, reason)
    if isinstance(error, stripe.APIConnectionError) or status is None:
        return Classified(Verdict.RETRY, reason)
    advice = should_retry_header(error)
    if advice is True:
        return Classified(Verdict.RETRY, reason)
    if status in (429, 409) or status >= 500:
        return Classified(Verdict.RETRY_LATER if advice is False else Verdict.RETRY, reason)
    if status in (401, 403, 404, 405):
        return Classified(Verdict.RETRY_LATER, f"{reason} (check STRIPE_API_KEY, its permissions and STRIPE_API_BASE)")
    return Classified(Verdict.PERMANENT, reason)


def is_duplicate(status: int | None, code: str | None, message: str) -> bool:
    """Whether a Stripe refusal says the event is already recorded (a 400 or 409 with a duplicate code or wording)."""
    if status not in (400, 409):
        return False
    return (code or "") in DUPLICATE_CODES or bool(_DUPLICATE_MESSAGES.search(message))


def truncate_reason(reason: str) -> str:
    """A dead-letter reason the engine accepts (1..=1024 bytes of UTF-8)."""
    data = reason.encode("utf-8")
    if not data:
        return "refused by Stripe"
    if len(data) <= MAX_REASON_BYTES:
        return reason
    return data[: MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


def is_timeout(error: BaseException) -> bool:
    """A request that ran past its timeout with no answer: the SDK's APIConnectionError caused by the HTTP library's
    timeout (requests' ConnectTimeout and ReadTimeout both derive from requests.exceptions.Timeout)."""
    import stripe  # noqa: PLC0415

    cause = error.__cause__
    return (
        isinstance(error, stripe.APIConnectionError)
        and cause is not None
        and any(klass.__name__ == "Timeout" for klass in type(cause).__mro__)
    )


def is_not_found(error: BaseException) -> bool:
    """A 404 for an object that does not exist (`resource_missing`), as opposed to a URL Stripe does not know."""
    return getattr(error, "http_status", None) == 404 and getattr(error, "code", None) == "resource_missing"


def is_permission_denied(error: BaseException) -> bool:
    return getattr(error, "http_status", None) == 403


def error_code(error: BaseException) -> str:
    """A short label for a failed Stripe call, for the metrics: Stripe's error code, else `http_<status>`, else
    `timeout` (no answer within the request timeout), `connection` (no HTTP answer) or the exception's class name (a
    bug or an unexpected library error)."""
    code = getattr(error, "code", None)
    if isinstance(code, str) and code:
        return code
    status = getattr(error, "http_status", None)
    if status is not None:
        return f"http_{status}"
    import stripe  # noqa: PLC0415

    if is_timeout(error):
        return TIMEOUT_CODE
    return "connection" if isinstance(error, stripe.APIConnectionError) else type(error).__name__

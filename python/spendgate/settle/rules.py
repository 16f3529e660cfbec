"""The rules that decide, before anything is sent, that an event must not go to Stripe: pure functions of the event and
the settler's clock, so that tests drive them with any time they like.

Each rule that fires gives the dead-letter reason, worded for the operator who reads `spendgate deadletter list`: what
is wrong, and what to do about it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

HOUR_MS: Final[int] = 3_600_000
DAY_MS: Final[int] = 24 * HOUR_MS

# "Must be within the past 35 calendar days or up to 5 minutes in the future" (the `timestamp` of a meter event,
# https://docs.stripe.com/api/billing/meter-event/create).
STRIPE_MAX_EVENT_AGE_MS: Final[int] = 35 * DAY_MS
STRIPE_MAX_FUTURE_SKEW_MS: Final[int] = 5 * 60_000
# Flag an event an hour before Stripe's limit, so that none turns too old while it is in flight or waits for a retry.
# This matters most on the v2 stream, which validates asynchronously: a too-old event would be answered 200,
# acknowledged here, and then dropped by Stripe.
EVENT_AGE_MARGIN_MS: Final[int] = HOUR_MS
MAX_EVENT_AGE_MS: Final[int] = STRIPE_MAX_EVENT_AGE_MS - EVENT_AGE_MARGIN_MS

# Stripe "will enforce uniqueness within a rolling period of at least 24 hours" (the `identifier` of a meter event). A
# resend is safe only while Stripe still remembers the identifier; an hour of margin again.
STRIPE_DEDUP_WINDOW_MS: Final[int] = 24 * HOUR_MS
SAFE_RESEND_MS: Final[int] = 23 * HOUR_MS

# Values with more than 15 significant digits are refused (400 on v1, an asynchronous error on the v2 stream).
MAX_EVENT_VALUE: Final[int] = 10**15 - 1


def iso(ts_ms: int) -> str:
    """A UTC time for messages: 2026-01-31T12:00:00Z."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def resend_too_late(first_attempt_ms: int | None, now_ms: int) -> str | None:
    """Why an unacknowledged event first sent long ago must not be resent blindly, or None.

    After Stripe's dedup window a resend under the same identifier would count again if the first send was recorded."""
    if first_attempt_ms is None or now_ms - first_attempt_ms <= SAFE_RESEND_MS:
        return None
    hours = (now_ms - first_attempt_ms) / HOUR_MS
    return (
        f"first sent over 23 h ago ({hours:.1f} h ago, at {iso(first_attempt_ms)}) and never acknowledged; Stripe may "
        "have recorded it and no longer deduplicates: check `spendgate reconcile` before requeueing"
    )


def restored_unsure(event_restored: bool, claimed: bool, ts_ms: int, now_ms: int, *, aggregating: bool) -> str | None:
    """Why an entry restored from a backup must not be sent, or None.

    The sidecar the backup came from may have sent it after the backup was taken. A resend under the same identifier
    is safe only while Stripe still deduplicates it: the first send was at the earliest at the commit (ts_ms), so the
    resend must come within 23 hours of that. With pre-aggregation on, an unclaimed restored entry may have gone out in
    an aggregate whose identifier the backup does not know, so no resend of it can be deduplicated."""
    if not event_restored:
        return None
    advice = (
        "run `spendgate reconcile` for this customer first; requeue (with --confirmed-missing) only if it shows "
        "this usage missing at Stripe"
    )
    if not claimed and aggregating:
        return (
            f"restored from a backup, and pre-aggregation (settle_aggregate_window_ms, or settle_auto_aggregate "
            f"under a backlog) is on: the sidecar the "
            f"backup came from may have sent it in an aggregate event this copy cannot repeat exactly; {advice}"
        )
    if now_ms - ts_ms > SAFE_RESEND_MS:
        return (
            f"restored from a backup and committed {(now_ms - ts_ms) / HOUR_MS:.1f} h ago (at {iso(ts_ms)}): it "
            f"may be at Stripe already, which no longer deduplicates it after 24 h; {advice}"
        )
    return None


def timestamp_out_of_window(ts_ms: int, now_ms: int) -> str | None:
    """Why Stripe would refuse this event's timestamp, or None."""
    age_ms = now_ms - ts_ms
    if age_ms > MAX_EVENT_AGE_MS:
        return (
            f"timestamp {iso(ts_ms)} is {age_ms / DAY_MS:.1f} days old: Stripe accepts meter events only within the "
            "past 35 days (spendgate flags them an hour early), so it was not sent. Bill this usage another way "
            "(for example an invoice item); requeueing cannot help"
        )
    if -age_ms > STRIPE_MAX_FUTURE_SKEW_MS:
        return (
            f"timestamp {iso(ts_ms)} is {-age_ms / 60_000:.1f} minutes in the future: Stripe accepts at most 5 "
            "minutes ahead. Check this host's clock (NTP); requeue once the timestamp is no longer ahead"
        )
    return None


def value_refused(value: int) -> str | None:
    """Why Stripe would refuse this value, or None."""
    if value < 0:
        return f"value {value} is negative: meter events carry whole numbers >= 0"
    if value > MAX_EVENT_VALUE:
        return f"value {value} has more than 15 digits: Stripe refuses meter event values above {MAX_EVENT_VALUE}"
    return None


def customer_missing(stripe_customer_id: str, customer_ids: tuple[str, ...]) -> str | None:
    """Why an event has no Stripe customer to bill, or None."""
    if stripe_customer_id:
        return None
    return (
        f"budget {', '.join(sorted(set(customer_ids)))} has no stripe_customer_id, so there is no Stripe customer to "
        "bill"
    )


def token_meter_off(event_name: str, claim: str, *, token_event: bool) -> str | None:
    """Why a claimed token event cannot be resent: it was first sent to the token meter, and settle_token_event_name
    is now empty. Resending it as units under another identifier could count it twice, so it waits for an operator."""
    if event_name or not token_event:
        return None
    return (
        f"claimed as token events ({claim}) but settle_token_event_name is now empty, so they cannot be resent as they "
        "were first sent: set settle_token_event_name back to the token meter's event name and requeue, after checking "
        "`spendgate reconcile` (Stripe may have them already)"
    )

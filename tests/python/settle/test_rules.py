"""The rules that hold an event back before any call: pure functions of the event and the settler's clock.

The engine's clock cannot be moved from Python (it stamps commits and claims with the system time), so the time rules
are driven here with explicit times, and in test_settler.py through the settler's injectable clock and the fake's
clock."""

from __future__ import annotations

from spendgate.settle import rules

NOW = 1_800_000_000_000
HOUR = rules.HOUR_MS
DAY = rules.DAY_MS


def test_a_resend_within_23_hours_of_the_first_send_is_safe() -> None:
    assert rules.resend_too_late(None, NOW) is None  # never sent
    assert rules.resend_too_late(NOW - 23 * HOUR, NOW) is None


def test_a_resend_more_than_23_hours_after_the_first_send_is_held_back_with_what_to_do() -> None:
    reason = rules.resend_too_late(NOW - 23 * HOUR - 1, NOW)
    assert reason is not None
    assert "first sent over 23 h ago" in reason
    assert "Stripe may have recorded it and no longer deduplicates" in reason
    assert "check `spendgate reconcile` before requeueing" in reason


def test_timestamps_inside_stripes_window_pass() -> None:
    assert rules.timestamp_out_of_window(NOW, NOW) is None
    assert rules.timestamp_out_of_window(NOW - 34 * DAY, NOW) is None
    assert rules.timestamp_out_of_window(NOW + 5 * 60_000, NOW) is None


def test_a_timestamp_near_the_35_day_limit_is_flagged_an_hour_early() -> None:
    assert rules.timestamp_out_of_window(NOW - 35 * DAY + HOUR, NOW) is None
    reason = rules.timestamp_out_of_window(NOW - 35 * DAY + HOUR - 1, NOW)
    assert reason is not None and "35 days" in reason and "not sent" in reason


def test_a_timestamp_more_than_5_minutes_ahead_is_clock_skew() -> None:
    reason = rules.timestamp_out_of_window(NOW + 5 * 60_000 + 1, NOW)
    assert reason is not None and "in the future" in reason and "clock" in reason


def test_values_stripe_refuses() -> None:
    assert rules.value_refused(0) is None
    assert rules.value_refused(rules.MAX_EVENT_VALUE) is None
    reason = rules.value_refused(rules.MAX_EVENT_VALUE + 1)
    assert reason is not None and "15 digits" in reason


def test_an_event_without_a_stripe_customer() -> None:
    assert rules.customer_missing("cus_1", ("a",)) is None
    reason = rules.customer_missing("", ("b", "a", "b"))
    assert reason is not None and "budget a, b has no stripe_customer_id" in reason

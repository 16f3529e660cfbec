"""The dashboard figures of a period, from a usage record: exact numbers."""

from __future__ import annotations

import pytest

from spendgate.policy.usage_report import (
    DAY_MS,
    MAX_DAILY_DAYS,
    NEVER_MS,
    day_name,
    period_at_ms,
    usage_report,
)

NOV_1 = 20_393 * DAY_MS  # 2025-11-01T00:00Z
NOV_30_DAYS_MS = 30 * DAY_MS


def record(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "customer_id": "cus", "period_start_ms": NOV_1, "period_end_ms": NOV_1 + NOV_30_DAYS_MS, "current": True,
        "limit": 10_000, "included": 3_000, "units": 0, "commits": 0, "days": [], "models": [], "dimensions": [],
    }  # fmt: skip
    base.update(fields)
    return base


def test_the_projection_is_linear_in_elapsed_time_and_rounded_up() -> None:
    # 1,001 units in the first 10 of 30 days project to 3,003; past the included 3,000 by 3.
    report = usage_report(record(units=1_001, days=[(20_393, 1_001)]), now_ms=NOV_1 + 10 * DAY_MS)
    assert (report.projected_total, report.projected_overage) == (3_003, 3)
    assert (report.overage, report.included_remaining) == (0, 1_999)
    odd = usage_report(record(units=1_000), now_ms=NOV_1 + 7 * DAY_MS)
    assert odd.projected_total == 4_286  # 1,000 x 30 / 7 = 4,285.7 -> 4,286


def test_a_closed_or_lifetime_period_projects_its_total() -> None:
    assert usage_report(record(units=500, current=False), now_ms=NOV_1 + DAY_MS).projected_total == 500
    lifetime = record(units=500, period_start_ms=0, period_end_ms=NEVER_MS, days=[(20_400, 500)])
    report = usage_report(lifetime, now_ms=20_402 * DAY_MS)
    assert report.projected_total == 500
    assert [date for date, _ in report.daily] == [day_name(20_400), day_name(20_401), day_name(20_402)]


def test_the_daily_series_fills_every_day_up_to_today_with_zeros() -> None:
    report = usage_report(record(units=30, days=[(20_393, 10), (20_395, 20)]), now_ms=NOV_1 + 3 * DAY_MS + 5)
    assert report.daily == (("2025-11-01", 10), ("2025-11-02", 0), ("2025-11-03", 20), ("2025-11-04", 0))


def test_the_daily_series_is_bounded() -> None:
    lifetime = record(period_start_ms=0, period_end_ms=NEVER_MS, days=[(1, 1)], units=1)
    assert len(usage_report(lifetime, now_ms=5_000 * DAY_MS).daily) == MAX_DAILY_DAYS


def test_breakdowns_are_sorted_largest_first_and_dimensions_cut_to_the_top() -> None:
    raw = record(
        units=60,
        models=[("a", "input", 10, 5), ("b", "output", 3, 40), ("a", "output", 1, 15)],
        dimensions=[("feature", "x", 10), ("feature", "y", 30), ("feature", "z", 20), ("member", "m1", 60)],
    )
    report = usage_report(raw, now_ms=NOV_1 + DAY_MS, top=2)
    assert [row[3] for row in report.by_model] == [40, 15, 5]
    assert report.by_dimension == (("feature", "y", 30), ("feature", "z", 20), ("member", "m1", 60))


def test_without_an_included_quota_nothing_is_overage() -> None:
    report = usage_report(record(units=5_000, included=0), now_ms=NOV_1 + DAY_MS)
    assert (report.overage, report.projected_overage, report.included_remaining) == (0, 0, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", None), ("current", None), ("previous", 42), ("2026-11-15", 1_794_700_800_000),
     ("2026-11-15T12:00:00+01:00", 1_794_740_400_000)],
)  # fmt: skip
def test_a_period_is_named_by_current_previous_or_a_date(text: str, expected: int | None) -> None:
    assert period_at_ms(text, previous_start_ms=42) == expected


def test_a_bad_period_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="ISO date"):
        period_at_ms("last month", previous_start_ms=None)
    with pytest.raises(ValueError, match="no previous period"):
        period_at_ms("previous", previous_start_ms=None)

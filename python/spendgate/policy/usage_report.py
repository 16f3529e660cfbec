"""The numbers behind a usage dashboard, from the engine's usage record of a period.

    raw = engine.usage("cus_123")                          # exactly the ledger's entries of the current period
    report = usage_report(raw, now_ms=now, top=10)
    report.total, report.included_remaining, report.projected_total, report.daily, report.by_dimension

Shared by GetUsage, `spendgate usage` and the operator page, so that all three show the same figures.

- total: units committed in the period (durable commits: what the ledger holds).
- overage: total past the included quota (0 without one); included_remaining: what is left of it.
- projected_total: linear in the period's elapsed time, total x length / elapsed, rounded up; for a closed period (or
  a lifetime one) it is the total. projected_overage: the projection past the included quota.
- daily: every UTC day from the period's start (a lifetime period: from its first day with usage) to today or the
  period's end, zeros included, at most MAX_DAILY_DAYS (the latest).
- by_model: (model, token type, tokens, units), largest units first.
- by_dimension: per dimension key, its `top` largest values, largest first.
- folded_dimension_keys: the keys past the record's tracking bounds in this period, whose further values are summed
  under OTHER_VALUE ("(other)"; a key OTHER_VALUE sums keys past the bound on keys).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING, Final

from spendgate._core import OTHER_VALUE

if TYPE_CHECKING:
    from spendgate._core import UsageRecord

DAY_MS: Final[int] = 86_400_000
# A period that never ends has this end (i64::MAX in the engine).
NEVER_MS: Final[int] = 2**63 - 1
MAX_DAILY_DAYS: Final[int] = 400
DEFAULT_TOP: Final[int] = 10
MAX_TOP: Final[int] = 1_000
# A projection over less elapsed time than this is noise: the first seconds of a period would project wildly.
MIN_ELAPSED_FOR_PROJECTION_MS: Final[int] = 60_000


@dataclasses.dataclass(frozen=True, slots=True)
class UsageReport:
    customer_id: str
    period_start_ms: int
    period_end_ms: int  # NEVER_MS for a lifetime period
    current: bool
    total: int
    commits: int
    included: int
    limit: int
    overage: int
    included_remaining: int
    projected_total: int
    projected_overage: int
    daily: tuple[tuple[str, int], ...]
    by_model: tuple[tuple[str, str, int, int], ...]
    by_dimension: tuple[tuple[str, str, int], ...]
    folded_dimension_keys: tuple[str, ...]


def usage_report(raw: UsageRecord, *, now_ms: int, top: int = DEFAULT_TOP) -> UsageReport:
    """The dashboard figures of one period. `top` is per dimension key (1..=MAX_TOP)."""
    assert 1 <= top <= MAX_TOP, top
    total, included = raw["units"], raw["included"]
    start_ms, end_ms = raw["period_start_ms"], raw["period_end_ms"]
    projected = _projection(total, start_ms, end_ms, now_ms) if raw["current"] else total
    report = UsageReport(
        customer_id=raw["customer_id"],
        period_start_ms=start_ms,
        period_end_ms=end_ms,
        current=raw["current"],
        total=total,
        commits=raw["commits"],
        included=included,
        limit=raw["limit"],
        overage=_past(total, included),
        included_remaining=max(0, included - total),
        projected_total=projected,
        projected_overage=_past(projected, included),
        daily=_daily(raw["days"], start_ms, end_ms, now_ms),
        by_model=tuple(sorted(raw["models"], key=lambda row: (-row[3], row[0], row[1]))),
        by_dimension=_top_values(raw["dimensions"], top),
        folded_dimension_keys=tuple(sorted({key for key, value, _ in raw["dimensions"] if value == OTHER_VALUE})),
    )
    assert sum(units for _, units in report.daily) <= total, "the daily series never exceeds the total"
    return report


def _past(units: int, included: int) -> int:
    return max(0, units - included) if included > 0 else 0


def _projection(total: int, start_ms: int, end_ms: int, now_ms: int) -> int:
    if end_ms == NEVER_MS:
        return total
    elapsed_ms = min(now_ms, end_ms) - start_ms
    if elapsed_ms < MIN_ELAPSED_FOR_PROJECTION_MS:
        return total
    return -(-total * (end_ms - start_ms) // elapsed_ms)  # exact integers, rounded up


def _daily(days: list[tuple[int, int]], start_ms: int, end_ms: int, now_ms: int) -> tuple[tuple[str, int], ...]:
    by_day = dict(days)
    first = start_ms // DAY_MS if end_ms != NEVER_MS else min(by_day, default=now_ms // DAY_MS)
    last = (min(now_ms, end_ms - 1)) // DAY_MS
    last = max(last, max(by_day, default=last))
    first = max(first, last - MAX_DAILY_DAYS + 1)
    return tuple((day_name(day), by_day.get(day, 0)) for day in range(first, last + 1))


def day_name(day: int) -> str:
    """YYYY-MM-DD of a day number since 1970-01-01 (UTC)."""
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


def _top_values(dimensions: list[tuple[str, str, int]], top: int) -> tuple[tuple[str, str, int], ...]:
    by_key: dict[str, list[tuple[str, str, int]]] = {}
    for row in dimensions:
        by_key.setdefault(row[0], []).append(row)
    rows: list[tuple[str, str, int]] = []
    for key in sorted(by_key):
        rows += sorted(by_key[key], key=lambda row: (-row[2], row[1]))[:top]
    return tuple(rows)


def period_at_ms(period: str, *, previous_start_ms: int | None) -> int | None:
    """The time a GetUsage `period` names: None for the current period, the previous period's start for
    "previous", or the given ISO date / date-time (UTC unless it says). Raises ValueError saying what is accepted."""
    text = period.strip()
    if text in ("", "current"):
        return None
    if text == "previous":
        if previous_start_ms is None:
            raise ValueError("there is no previous period yet: this budget has not rolled over")
        return previous_start_ms
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f'period {period!r} is not "current", "previous" or an ISO date such as 2026-11-15 or 2026-11-15T12:00Z'
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)

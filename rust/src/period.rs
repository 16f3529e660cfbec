//! Budget periods: when a budget's spend starts again from zero.
//!
//! A period is the half-open interval `[start_ms, end_ms)` of Unix milliseconds. Three rules make them:
//! - `Monthly { anchor_ms }`: months starting on the anchor's day of month and time of day, in UTC. A day past the end
//!   of a shorter month is clamped to its last day (an anchor on the 31st gives Feb 28, then Mar 31), as Stripe does
//!   with a billing cycle anchor. The calendar month in UTC, the default, is anchor 0 (1970-01-01T00:00Z).
//! - `Fixed { anchor_ms, length_ms }`: back-to-back periods of one length. A Stripe subscription's current period is
//!   set this way (start, end), and its webhooks realign it at each renewal.
//! - `Lifetime`: one period that never ends (prepaid credits, and budgets made before periods existed).
//!
//! Dates are computed with Howard Hinnant's civil-from-days algorithms: no calendar crate, no time zones, no floats.

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

pub const DAY_MS: i64 = 86_400_000;
/// The latest time a period boundary may have: 9999-12-31T00:00Z. Keeps every date computation far from overflow.
pub const MAX_TIMESTAMP_MS: i64 = 253_402_214_400_000;
/// The end of a period that never ends.
pub const NEVER_MS: i64 = i64::MAX;
/// Shortest fixed period: one second (short periods exist for tests and demos; billing periods are months).
pub const MIN_PERIOD_MS: i64 = 1_000;
/// Longest fixed period: 5 years of 366 days.
pub const MAX_PERIOD_MS: i64 = 5 * 366 * DAY_MS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PeriodRule {
    Lifetime,
    Monthly { anchor_ms: i64 },
    Fixed { anchor_ms: i64, length_ms: i64 },
}

impl PeriodRule {
    pub const CALENDAR_MONTH: PeriodRule = PeriodRule::Monthly { anchor_ms: 0 };

    pub fn validate(&self) -> Result<(), EngineError> {
        let check_anchor = |anchor_ms: i64| {
            if !(0..=MAX_TIMESTAMP_MS).contains(&anchor_ms) {
                return Err(EngineError::invalid(format!(
                    "period anchor {anchor_ms} ms is outside 1970..9999; pass Unix milliseconds"
                )));
            }
            Ok(())
        };
        match *self {
            PeriodRule::Lifetime => Ok(()),
            PeriodRule::Monthly { anchor_ms } => check_anchor(anchor_ms),
            PeriodRule::Fixed { anchor_ms, length_ms } => {
                check_anchor(anchor_ms)?;
                if !(MIN_PERIOD_MS..=MAX_PERIOD_MS).contains(&length_ms) {
                    return Err(EngineError::invalid(format!(
                        "a fixed period of {length_ms} ms is outside {MIN_PERIOD_MS}..={MAX_PERIOD_MS} ms (1 s to 5 \
                         years); check the period's start and end"
                    )));
                }
                Ok(())
            }
        }
    }

    /// The period `[start, end)` that contains `at_ms`.
    pub fn containing(&self, at_ms: i64) -> (i64, i64) {
        let at_ms = at_ms.clamp(0, MAX_TIMESTAMP_MS);
        let (start, end) = match *self {
            PeriodRule::Lifetime => (0, NEVER_MS),
            PeriodRule::Fixed { anchor_ms, length_ms } => {
                let start = anchor_ms + (at_ms - anchor_ms).div_euclid(length_ms) * length_ms;
                (start, start + length_ms)
            }
            PeriodRule::Monthly { anchor_ms } => monthly_containing(anchor_ms, at_ms),
        };
        debug_assert!(start <= at_ms && at_ms < end, "{self:?} at {at_ms}: [{start}, {end})");
        (start, end)
    }
}

fn monthly_containing(anchor_ms: i64, at_ms: i64) -> (i64, i64) {
    let (_, _, anchor_day) = civil_from_days(anchor_ms.div_euclid(DAY_MS));
    let time_of_day_ms = anchor_ms.rem_euclid(DAY_MS);
    let (year, month, _) = civil_from_days(at_ms.div_euclid(DAY_MS));
    let mut index = year * 12 + i64::from(month) - 1; // months since year 0
    let mut start = month_boundary(index, anchor_day, time_of_day_ms);
    if start > at_ms {
        index -= 1;
        start = month_boundary(index, anchor_day, time_of_day_ms);
    }
    (start, month_boundary(index + 1, anchor_day, time_of_day_ms))
}

/// The boundary in month `index` (months since year 0): the anchor's day, clamped to the month's length.
fn month_boundary(index: i64, anchor_day: u32, time_of_day_ms: i64) -> i64 {
    let (year, month) = (index.div_euclid(12), (index.rem_euclid(12) + 1) as u32);
    let day = anchor_day.min(days_in_month(year, month));
    days_from_civil(year, month, day) * DAY_MS + time_of_day_ms
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// (year, month 1..=12, day 1..=31) of a day number since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(year: i64, month: u32, day: u32) -> i64 {
        days_from_civil(year, month, day) * DAY_MS
    }

    #[test]
    fn civil_dates_round_trip_over_four_centuries() {
        for days in (-1_000..146_097 * 2).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn the_calendar_month_contains_its_first_millisecond_but_not_the_next_month_s() {
        let rule = PeriodRule::CALENDAR_MONTH;
        assert_eq!(rule.containing(ms(2026, 11, 1)), (ms(2026, 11, 1), ms(2026, 12, 1)));
        assert_eq!(rule.containing(ms(2026, 12, 1) - 1), (ms(2026, 11, 1), ms(2026, 12, 1)));
        assert_eq!(rule.containing(ms(2024, 2, 29) + 5), (ms(2024, 2, 1), ms(2024, 3, 1)));
        assert_eq!(rule.containing(ms(2026, 12, 31)), (ms(2026, 12, 1), ms(2027, 1, 1)));
    }

    #[test]
    fn an_anchor_on_the_31st_clamps_to_short_months_and_comes_back() {
        let rule = PeriodRule::Monthly { anchor_ms: ms(2026, 1, 31) + 3_600_000 };
        let hour = 3_600_000;
        assert_eq!(rule.containing(ms(2026, 2, 10)), (ms(2026, 1, 31) + hour, ms(2026, 2, 28) + hour));
        assert_eq!(rule.containing(ms(2026, 3, 5)), (ms(2026, 2, 28) + hour, ms(2026, 3, 31) + hour));
        assert_eq!(rule.containing(ms(2026, 4, 30) + 2 * hour), (ms(2026, 4, 30) + hour, ms(2026, 5, 31) + hour));
        // Before the boundary's hour on its day, the previous period still runs.
        assert_eq!(rule.containing(ms(2026, 3, 31)), (ms(2026, 2, 28) + hour, ms(2026, 3, 31) + hour));
    }

    #[test]
    fn fixed_periods_are_back_to_back_from_the_anchor_in_both_directions() {
        let rule = PeriodRule::Fixed { anchor_ms: 10_000, length_ms: 3_000 };
        assert_eq!(rule.containing(10_000), (10_000, 13_000));
        assert_eq!(rule.containing(12_999), (10_000, 13_000));
        assert_eq!(rule.containing(13_000), (13_000, 16_000));
        assert_eq!(rule.containing(9_999), (7_000, 10_000));
    }

    #[test]
    fn a_lifetime_period_never_ends() {
        assert_eq!(PeriodRule::Lifetime.containing(ms(2026, 5, 5)), (0, NEVER_MS));
    }

    #[test]
    fn out_of_range_rules_are_invalid_argument() {
        for bad in [
            PeriodRule::Monthly { anchor_ms: -1 },
            PeriodRule::Fixed { anchor_ms: 0, length_ms: 999 },
            PeriodRule::Fixed { anchor_ms: 0, length_ms: MAX_PERIOD_MS + 1 },
            PeriodRule::Monthly { anchor_ms: MAX_TIMESTAMP_MS + 1 },
        ] {
            assert_eq!(bad.validate().unwrap_err().kind, crate::ErrorKind::InvalidArgument, "{bad:?}");
        }
    }
}

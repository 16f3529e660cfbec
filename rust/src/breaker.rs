//! The circuit breaker against runaway agents: it freezes a budget whose usage in the last hour runs at N times its
//! typical hourly rate.
//!
//! "The last hour" is `recent_ms` (an hour by default), summed over `FINE_BUCKETS` fine buckets as it slides. "Typical"
//! is the mean of the *active* whole hours (those with any usage) among the `window_ms` before it (a day by default): idle
//! nights and weekends do not make a normal working hour look like a spike. The breaker trips when
//!     recent > max(multiplier x typical, min_units)
//! and, with no active hour in the window yet (a new or long-idle customer), only when `min_units > 0` and
//! recent > min_units: without history there is nothing to call "typical", and a hard limit still applies.
//!
//! Times are the engine's trusted wall time (crate::clock): a step of the wall clock moves the windows only once it
//! has held for clock_step_confirm_ms. An accepted step forward ages the history out (the breaker then has none); an
//! accepted step back would put the history in the future, so the ring shifts it back by whole recent windows to end
//! at the new time (`rebase`).
//!
//! The ring is sparse and bounded (at most FINE_BUCKETS + 1 fine and MAX_WINDOW_HOURS + 1 hourly buckets), small
//! enough to persist with the budget record on every commit, so that a restart keeps the history.

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// Fine buckets per recent window: the last hour is measured to within 5 minutes.
pub const FINE_BUCKETS: i64 = 12;
/// The multiplier's floor: below 2 ordinary variation would freeze customers.
pub const MIN_BREAKER_MULTIPLIER: u64 = 2;
pub const MAX_BREAKER_MULTIPLIER: u64 = 1_000;
/// The shortest recent window (12 fine buckets of 100 ms; short windows are for tests and demos).
pub const MIN_RECENT_MS: u64 = 1_200;
/// The trailing window holds at most this many recent windows (a week of hours).
pub const MAX_WINDOW_HOURS: u64 = 168;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// 0: the breaker is off.
    pub multiplier: u64,
    pub recent_ms: u64,
    pub window_ms: u64,
    pub min_units: i64,
}

impl BreakerConfig {
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.multiplier != 0 && !(MIN_BREAKER_MULTIPLIER..=MAX_BREAKER_MULTIPLIER).contains(&self.multiplier) {
            return Err(EngineError::invalid(format!(
                "breaker_multiplier is {}; use 0 (off) or {MIN_BREAKER_MULTIPLIER}..={MAX_BREAKER_MULTIPLIER}",
                self.multiplier
            )));
        }
        if self.recent_ms < MIN_RECENT_MS || !self.recent_ms.is_multiple_of(FINE_BUCKETS as u64) {
            return Err(EngineError::invalid(format!(
                "breaker_recent_ms is {}; it must be at least {MIN_RECENT_MS} and a multiple of {FINE_BUCKETS}",
                self.recent_ms
            )));
        }
        let hours = self.window_ms / self.recent_ms;
        if !self.window_ms.is_multiple_of(self.recent_ms) || !(1..=MAX_WINDOW_HOURS).contains(&hours) {
            return Err(EngineError::invalid(format!(
                "breaker_window_ms is {}; it must be 1..={MAX_WINDOW_HOURS} times breaker_recent_ms ({})",
                self.window_ms, self.recent_ms
            )));
        }
        if self.min_units < 0 {
            return Err(EngineError::invalid(format!("breaker_min_units is {}; it must be >= 0", self.min_units)));
        }
        Ok(())
    }

    fn fine_ms(&self) -> i64 {
        self.recent_ms as i64 / FINE_BUCKETS
    }
}

/// Why the breaker tripped: the figures go into the alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trip {
    pub recent_units: i64,
    pub typical_units: i64,
    pub threshold_units: i64,
}

/// Usage over time, for one budget. `fine`: (bucket start, units) of the recent window; `hours`: (hour start, units)
/// of the trailing window. Both sorted by start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRing {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fine: Vec<(i64, i64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hours: Vec<(i64, i64)>,
}

impl UsageRing {
    pub fn is_empty(&self) -> bool {
        self.fine.is_empty() && self.hours.is_empty()
    }

    /// Count `units` used at `at_ms`. Usage older than the whole window is dropped.
    pub fn add(&mut self, config: &BreakerConfig, at_ms: i64, units: i64) {
        debug_assert!(units >= 0);
        if units == 0 {
            return;
        }
        self.rebase(config, at_ms);
        let start = at_ms - at_ms.rem_euclid(config.fine_ms());
        match self.fine.binary_search_by_key(&start, |(bucket, _)| *bucket) {
            Ok(index) => self.fine[index].1 = self.fine[index].1.saturating_add(units),
            Err(index) => self.fine.insert(index, (start, units)),
        }
        self.age(config, at_ms.max(self.newest_ms()));
    }

    /// Move fine buckets that left the recent window into their hour, and drop hours older than the window.
    fn age(&mut self, config: &BreakerConfig, now_ms: i64) {
        let recent_start = now_ms - config.recent_ms as i64;
        let fine_ms = config.fine_ms();
        while let Some(&(start, units)) = self.fine.first() {
            if start + fine_ms > recent_start {
                break;
            }
            self.fine.remove(0);
            let hour = start - start.rem_euclid(config.recent_ms as i64);
            match self.hours.binary_search_by_key(&hour, |(bucket, _)| *bucket) {
                Ok(index) => self.hours[index].1 = self.hours[index].1.saturating_add(units),
                Err(index) => self.hours.insert(index, (hour, units)),
            }
        }
        let oldest_kept = recent_start - config.window_ms as i64 - config.recent_ms as i64;
        self.hours.retain(|(hour, _)| *hour >= oldest_kept);
        assert!(self.fine.len() as i64 <= FINE_BUCKETS + 1, "fine buckets overflow: {}", self.fine.len());
        assert!(self.hours.len() as u64 <= MAX_WINDOW_HOURS + 2, "hour buckets overflow: {}", self.hours.len());
    }

    /// When `now_ms` is more than a recent window before the newest usage (the clock was set back), shift the whole
    /// history back by whole recent windows so that it ends at or before `now_ms`: its shape is kept, alignment too
    /// (a fine bucket divides a recent window), and no usage counts as recent for longer than it was. A small step
    /// back (within the recent window) changes nothing: that usage is still recent.
    fn rebase(&mut self, config: &BreakerConfig, now_ms: i64) {
        let recent_ms = config.recent_ms as i64;
        let newest = self.newest_ms().max(self.hours.last().map_or(i64::MIN, |(hour, _)| *hour));
        if newest == i64::MIN || newest - now_ms <= recent_ms {
            return;
        }
        let shift_ms = (newest - now_ms).div_euclid(recent_ms).saturating_add(1).saturating_mul(recent_ms);
        for (start, _) in self.fine.iter_mut().chain(self.hours.iter_mut()) {
            *start -= shift_ms;
        }
        debug_assert!(self.newest_ms() <= now_ms, "rebased to {} > {now_ms}", self.newest_ms());
    }

    fn newest_ms(&self) -> i64 {
        self.fine.last().map_or(i64::MIN, |(start, _)| *start)
    }

    /// Has usage at `now_ms` run away? `multiplier` 0 never trips.
    pub fn check(&mut self, config: &BreakerConfig, multiplier: u64, now_ms: i64) -> Option<Trip> {
        if multiplier == 0 {
            return None;
        }
        self.rebase(config, now_ms);
        self.age(config, now_ms);
        let recent_units: i64 = self.fine.iter().map(|(_, units)| *units).sum();
        // Only whole hours: the hour that the recent window is still sliding out of is partly counted there. And not
        // the first hour of a run of use (an active hour after an idle or unknown one): use that began at 10:55 fills
        // 5 minutes of its hour, and counting it as typical made an ordinary next hour look like a 12x spike.
        let whole_before = now_ms - 2 * config.recent_ms as i64;
        let hour_ms = config.recent_ms as i64;
        let used = |hour: i64| {
            self.hours.binary_search_by_key(&hour, |(bucket, _)| *bucket).is_ok_and(|i| self.hours[i].1 > 0)
        };
        let active: Vec<i64> = self
            .hours
            .iter()
            .filter(|(hour, units)| *hour <= whole_before && *units > 0 && used(*hour - hour_ms))
            .map(|(_, units)| *units)
            .collect();
        let typical_units = if active.is_empty() { 0 } else { active.iter().sum::<i64>() / active.len() as i64 };
        let threshold_units = match (active.is_empty(), config.min_units) {
            (true, 0) => return None,
            (true, min_units) => min_units,
            (false, min_units) => typical_units.saturating_mul(multiplier as i64).max(min_units),
        };
        (recent_units > threshold_units).then_some(Trip { recent_units, typical_units, threshold_units })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    fn config() -> BreakerConfig {
        BreakerConfig { multiplier: 10, recent_ms: HOUR as u64, window_ms: 24 * HOUR as u64, min_units: 0 }
    }

    /// `per_hour[i]` units spread evenly over hour i (12 commits an hour), then the breaker's verdict after each hour.
    fn run(per_hour: &[i64]) -> Vec<Option<Trip>> {
        let config = config();
        let mut ring = UsageRing::default();
        let mut verdicts = Vec::new();
        for (hour, units) in per_hour.iter().enumerate() {
            let mut last = None;
            for step in 0..12 {
                let at = hour as i64 * HOUR + step * HOUR / 12 + 1;
                ring.add(&config, at, units / 12);
                last = ring.check(&config, config.multiplier, at);
            }
            verdicts.push(last);
        }
        verdicts
    }

    #[test]
    fn a_tenfold_spike_after_steady_use_trips() {
        let mut hours = vec![1_200; 24];
        hours.push(12_000 * 2); // 20x the typical hour
        let verdicts = run(&hours);
        assert!(verdicts[..24].iter().all(Option::is_none));
        let trip = verdicts[24].expect("the runaway hour trips");
        assert_eq!(trip.typical_units, 1_200);
        assert_eq!(trip.threshold_units, 12_000);
        assert!(trip.recent_units > trip.threshold_units);
    }

    #[test]
    fn steady_growth_of_twenty_percent_an_hour_never_trips() {
        let hours: Vec<i64> = (0..48).map(|hour| (1_200.0 * 1.2f64.powi(hour)) as i64 / 12 * 12).collect();
        assert!(run(&hours).iter().all(Option::is_none));
    }

    #[test]
    fn idle_hours_do_not_dilute_the_typical_rate() {
        // Busy 8 hours, idle 16, busy again at the same rate: nothing unusual.
        let mut hours = vec![1_200; 8];
        hours.extend([0; 16]);
        hours.extend([1_200; 8]);
        assert!(run(&hours).iter().all(Option::is_none));
    }

    #[test]
    fn use_that_begins_late_in_an_hour_then_goes_on_steadily_never_trips() {
        // The first hour holds one twelfth of a steady hour: it is not typical, so the next hours are not spikes.
        let config = config();
        let mut ring = UsageRing::default();
        let start = 11 * HOUR / 12 + 1;
        let mut at = start;
        while at < start + 6 * HOUR {
            ring.add(&config, at, 100);
            assert_eq!(ring.check(&config, config.multiplier, at), None, "tripped at {at}");
            at += HOUR / 12;
        }
    }

    #[test]
    fn without_history_only_min_units_can_trip() {
        let mut config = config();
        let mut ring = UsageRing::default();
        ring.add(&config, 1, 1_000_000);
        assert_eq!(ring.check(&config, 10, 1), None);
        config.min_units = 500_000;
        assert_eq!(ring.check(&config, 10, 1).map(|trip| trip.threshold_units), Some(500_000));
        assert_eq!(ring.check(&config, 0, 1), None, "multiplier 0 is off");
    }

    #[test]
    fn the_ring_stays_bounded_over_a_month_of_use() {
        let config = config();
        let mut ring = UsageRing::default();
        for minute in 0..(31 * 24 * 60) {
            ring.add(&config, minute * 60_000, 7);
        }
        assert!(ring.fine.len() <= 13 && ring.hours.len() <= 26, "{} {}", ring.fine.len(), ring.hours.len());
    }

    #[test]
    fn a_clock_set_back_a_day_keeps_the_history_s_shape_and_counts_nothing_as_recent_twice() {
        let config = config();
        let mut ring = UsageRing::default();
        let mut at = 0;
        for _ in 0..(30 * 12) {
            ring.add(&config, at, 100); // 1,200 an hour for 30 hours
            at += HOUR / 12;
        }
        let before = ring.clone();
        at -= DAY;
        ring.add(&config, at, 100);
        assert!(ring.newest_ms() <= at, "no usage in the future");
        let recent: i64 = ring.fine.iter().map(|(_, units)| units).sum();
        let recent_before: i64 = before.fine.iter().map(|(_, units)| units).sum();
        assert!(recent <= recent_before + 100, "recent {recent}, before the step {recent_before}");
        assert_eq!(ring.check(&config, 10, at), None, "a steady customer does not trip after the step");
        let hours: i64 = ring.hours.iter().map(|(_, units)| units).sum();
        assert!(hours >= before.hours.iter().map(|(_, units)| units).sum::<i64>() - 1_200, "the history is kept");
    }

    #[test]
    fn a_small_step_back_changes_nothing() {
        let config = config();
        let mut ring = UsageRing::default();
        ring.add(&config, 10 * HOUR, 100);
        let before = ring.clone();
        ring.rebase(&config, 10 * HOUR - 1_000);
        assert_eq!(ring, before);
    }

    #[test]
    fn bad_configs_are_invalid_argument() {
        let good = config();
        for bad in [
            BreakerConfig { multiplier: 1, ..good },
            BreakerConfig { multiplier: 1_001, ..good },
            BreakerConfig { recent_ms: 1_000, ..good },
            BreakerConfig { window_ms: good.recent_ms * 169, ..good },
            BreakerConfig { window_ms: good.recent_ms + 1, ..good },
            BreakerConfig { min_units: -1, ..good },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(good.validate().is_ok());
    }
}

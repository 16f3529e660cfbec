//! The clocks in the engine (the rule itself is crate::clock): persisting the checkpoint, raising clock_step alerts,
//! and the engine-time deadline of a hold read back from LMDB.

use super::Shared;
use crate::alerts::{AlertKind, PendingAlert};
use crate::clock::{ClockCheckpoint, ClockEvent, CLOCK_DOCUMENT};
use crate::error::EngineError;
use crate::records::HoldRecord;
use crate::store::Store;
use crate::writer::Op;

/// The data dir's clock checkpoint, if it has one (a data dir made before it has none).
pub(super) fn clock_checkpoint(store: &Store) -> Result<Option<ClockCheckpoint>, EngineError> {
    let Some(body) = store.document(CLOCK_DOCUMENT)? else { return Ok(None) };
    serde_json::from_str(&body).map(Some).map_err(|err| {
        EngineError::internal(format!(
            "the data dir's clock checkpoint (document {CLOCK_DOCUMENT:?}) is unreadable: {err}; restore from a backup"
        ))
    })
}

impl Shared {
    pub(super) fn clock_op(&self) -> Op {
        let body = serde_json::to_string(&self.clock.checkpoint()).expect("a checkpoint serializes");
        Op::PutDocument { name: CLOCK_DOCUMENT.to_string(), body }
    }

    /// Persist the clock checkpoint (through the writer, in ticket order).
    pub(super) fn save_clock(&self) -> Result<u64, EngineError> {
        self.submit(self.clock_op())
    }

    /// Compare the clocks (crate::clock::TimeKeeper::observe) and alert on what that found.
    pub(super) fn observe_clock(&self) {
        if let Some(event) = self.clock.observe() {
            self.clock_event(event);
        }
    }

    pub(super) fn clock_event(&self, event: ClockEvent) {
        let (max_ms, confirm_ms) = (self.clock.max_step_ms(), self.clock.confirm_ms());
        let (message, values) = match event {
            ClockEvent::Stepped { alert: false, .. } | ClockEvent::Undone { .. } => return,
            ClockEvent::Stepped { step_ms, alert: true } => (
                format!(
                    "the wall clock stepped {} against the monotonic clock (more than max_clock_step_ms, {max_ms} \
                     ms): budget periods, the circuit breaker and timestamps go on with the wall time last agreed, \
                     extrapolated on the monotonic clock, until the step has held for clock_step_confirm_ms ({} s); \
                     hold lifetimes are monotonic and unaffected. Check the host's time synchronization (NTP)",
                    signed_duration(step_ms),
                    confirm_ms / 1000
                ),
                [("step_ms", step_ms), ("max_clock_step_ms", max_ms), ("accepted", 0)],
            ),
            ClockEvent::Accepted { step_ms } => (
                format!(
                    "the wall clock's step of {} held for clock_step_confirm_ms ({} s): budget periods, the circuit \
                     breaker and timestamps follow the wall clock again",
                    signed_duration(step_ms),
                    confirm_ms / 1000
                ),
                [("step_ms", step_ms), ("max_clock_step_ms", max_ms), ("accepted", 1)],
            ),
        };
        // Server-wide: no customer. A full queue drops it; the step is counted all the same.
        let alert = PendingAlert::new(AlertKind::ClockStep, "", self.clock.now_ms(), message, &values);
        self.raise(alert);
    }

    /// The engine-time deadline of an active hold read back from LMDB. A hold from before engine time (or from a data
    /// dir whose timeline is unknown) ends by the wall clock at its `expires_ms`, but never later than its whole TTL
    /// from now: it cannot end before the upgrade, nor outlive its TTL by more than the time it was down.
    pub(super) fn restored_deadline(&self, hold: &HoldRecord, timeline_known: bool) -> i64 {
        match hold.deadline_mono_ms {
            Some(deadline_ms) if timeline_known => deadline_ms,
            _ => {
                let (mono_ms, now_ms) = self.clock.mono_and_now();
                let ttl_ms = (hold.expires_ms - hold.created_ms).max(0);
                mono_ms + (hold.expires_ms - now_ms).clamp(0, ttl_ms)
            }
        }
    }
}

/// "+2 h 0 min 0 s", "-32 d 0 h": a step's size for people.
fn signed_duration(step_ms: i64) -> String {
    let sign = if step_ms < 0 { '-' } else { '+' };
    let ms = step_ms.unsigned_abs();
    let (days, hours, minutes, seconds) =
        (ms / 86_400_000, ms / 3_600_000 % 24, ms / 60_000 % 60, ms as f64 / 1_000.0 % 60.0);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{sign}{seconds:.3} s"),
        (0, 0, _) => format!("{sign}{minutes} min {seconds:.0} s"),
        (0, _, _) => format!("{sign}{hours} h {minutes} min"),
        _ => format!("{sign}{days} d {hours} h"),
    }
}

#[cfg(test)]
mod tests {
    use super::signed_duration;

    #[test]
    fn step_sizes_read_as_durations() {
        assert_eq!(signed_duration(1_500), "+1.500 s");
        assert_eq!(signed_duration(-7_200_000), "-2 h 0 min");
        assert_eq!(signed_duration(32 * 86_400_000 + 3_600_000), "+32 d 1 h");
        assert_eq!(signed_duration(-90_000), "-1 min 30 s");
    }
}

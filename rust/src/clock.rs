//! Time for the engine: two clocks, and the rule that decides between them (README "Time and clock steps").
//!
//! - The **monotonic clock** measures durations: hold lifetimes. It is CLOCK_BOOTTIME, which never steps and counts
//!   time spent suspended (CLOCK_MONOTONIC stops during a suspend, so a hold would outlive its TTL by the nap). The
//!   engine keeps it on one timeline across restarts, *engine time* (`mono_ms`): boot time plus an offset fixed for
//!   each kernel boot (its boot id, /proc/sys/kernel/random/boot_id), persisted in a checkpoint. A restart on the same
//!   boot continues the timeline exactly, so a hold ends at its original deadline. After a reboot (or on another
//!   machine) the downtime cannot be measured on any monotonic clock; engine time resumes where the last checkpoint
//!   left it, so a hold keeps the lifetime it had left then: it never ends early (which would free its units while its
//!   call still runs, and its commit would then pass a HARD limit), and it outlives its TTL in real time by at most the
//!   downtime, never by more than what it had left.
//! - The **wall clock** places things in the calendar: budget periods, the breaker's windows, timestamps. It steps
//!   (NTP, an operator, a VM resumed with a stale clock), so the engine uses *trusted wall time* (`now_ms`): the wall
//!   clock as last seen in agreement with the monotonic clock, extrapolated on the monotonic clock. The reaper compares
//!   the two every reap interval (`observe`). While they agree within `max_clock_step_ms` the trusted time follows the
//!   wall clock (NTP's slewing, a leap second). A larger disagreement is a step: it is counted and alerted on, and the
//!   trusted time goes on without it. A step undone within `clock_step_confirm_ms` (of monotonic time) is forgotten; a
//!   step that holds that long, the wall clock staying within `max_clock_step_ms` of its stepped position throughout,
//!   is accepted, so a clock that was wrong and got corrected is followed. A further step while one is pending starts
//!   the wait again.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The engine document (Engine::put_document's store) that holds the clock checkpoint.
pub const CLOCK_DOCUMENT: &str = "engine_clock";
/// How often the reaper persists the checkpoint: after a reboot a hold may outlive its TTL by this much more.
pub const CLOCK_CHECKPOINT_INTERVAL_MS: u64 = 10_000;
/// At most one clock_step alert for detected steps in this much monotonic time, so that a flapping clock cannot fill
/// the alert log (every step is still counted). The acceptance of a step always raises one.
pub const CLOCK_STEP_ALERT_INTERVAL_MS: i64 = 60_000;
/// Bounds of `max_clock_step_ms` and `clock_step_confirm_ms`: past a day a step would never be noticed, or never
/// be followed.
pub const MAX_CLOCK_STEP_MS_CEILING: u64 = 86_400_000;
pub const MAX_CLOCK_STEP_CONFIRM_MS_CEILING: u64 = 7 * 86_400_000;
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The two clocks, behind a trait so that tests step them without sleeping.
pub trait Clock: Send + Sync + 'static {
    /// Unix milliseconds from the wall clock (CLOCK_REALTIME): may step either way.
    fn wall_ms(&self) -> i64;
    /// Milliseconds since the kernel booted, suspend included (CLOCK_BOOTTIME): never steps, never goes back.
    fn boot_ms(&self) -> i64;
    /// The kernel boot's id: boot_ms readings compare only under the same id. "" when unknown (every start is then
    /// treated as a new boot).
    fn boot_id(&self) -> String;

    /// The wall clock's raw reading (tests). The engine goes by TimeKeeper::now_ms, the trusted wall time.
    fn now_ms(&self) -> i64 {
        self.wall_ms()
    }
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_ms(&self) -> i64 {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).expect("the system clock is before 1970");
        i64::try_from(since_epoch.as_millis()).expect("milliseconds since 1970 fit in i64")
    }

    fn boot_ms(&self) -> i64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec to the valid pointer it is given.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed: {}", std::io::Error::last_os_error());
        ts.tv_sec * 1_000 + ts.tv_nsec / 1_000_000
    }

    fn boot_id(&self) -> String {
        static BOOT_ID: OnceLock<String> = OnceLock::new();
        BOOT_ID
            .get_or_init(|| std::fs::read_to_string(BOOT_ID_PATH).map(|id| id.trim().to_string()).unwrap_or_default())
            .clone()
    }
}

/// Clocks that only move when told to. `advance_ms` is time passing (both clocks); `step_wall_ms` steps the wall
/// clock alone; `reboot` starts a new boot.
pub struct ManualClock {
    wall_ms: AtomicI64,
    boot_ms: AtomicI64,
    boots: AtomicU64,
}

/// Where a ManualClock's boot time starts (the kernel has been up a while when a test begins).
const MANUAL_BOOT_START_MS: i64 = 3_600_000;

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        ManualClock {
            wall_ms: AtomicI64::new(start_ms),
            boot_ms: AtomicI64::new(MANUAL_BOOT_START_MS),
            boots: AtomicU64::new(1),
        }
    }

    pub fn advance_ms(&self, delta_ms: i64) {
        assert!(delta_ms >= 0, "time never runs backwards");
        self.wall_ms.fetch_add(delta_ms, Ordering::SeqCst);
        self.boot_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }

    /// Step the wall clock alone (an NTP step, an operator's `date -s`), by `delta_ms` either way.
    pub fn step_wall_ms(&self, delta_ms: i64) {
        self.wall_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }

    /// A reboot that took `downtime_ms` of real time: the wall clock moves on, boot time starts again from one
    /// second, under a new boot id.
    pub fn reboot(&self, downtime_ms: i64) {
        assert!(downtime_ms >= 1_000, "a reboot takes at least the second the new boot has been up");
        self.wall_ms.fetch_add(downtime_ms, Ordering::SeqCst);
        self.boot_ms.store(1_000, Ordering::SeqCst);
        self.boots.fetch_add(1, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn wall_ms(&self) -> i64 {
        self.wall_ms.load(Ordering::SeqCst)
    }

    fn boot_ms(&self) -> i64 {
        self.boot_ms.load(Ordering::SeqCst)
    }

    fn boot_id(&self) -> String {
        format!("manual-boot-{}", self.boots.load(Ordering::SeqCst))
    }
}

/// A wall-clock step not yet accepted: the wall clock minus the trusted time when it was seen, and since when (engine
/// time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingStep {
    pub step_ms: i64,
    pub since_mono_ms: i64,
}

/// What the engine persists about time (the CLOCK_DOCUMENT), so that a restart continues engine time and the trusted
/// wall time, and does not launder a pending step into an accepted one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockCheckpoint {
    pub boot_id: String,
    /// Engine time = boot time + this, on `boot_id`.
    pub offset_ms: i64,
    /// Engine time when the checkpoint was taken.
    pub mono_ms: i64,
    /// The trusted wall time then.
    pub wall_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingStep>,
}

/// What an observation found, for the engine to alert on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockEvent {
    /// A new step of `step_ms` (wall minus trusted time). `alert`: not within CLOCK_STEP_ALERT_INTERVAL_MS of the
    /// last clock_step alert.
    Stepped { step_ms: i64, alert: bool },
    /// The pending step was undone: the wall clock agrees with the trusted time again.
    Undone { step_ms: i64 },
    /// The pending step held for `clock_step_confirm_ms`: the trusted time now follows the wall clock.
    Accepted { step_ms: i64 },
}

struct StepState {
    pending: Option<PendingStep>,
    last_alert_mono_ms: Option<i64>,
}

/// Engine time and trusted wall time (see the module doc).
pub struct TimeKeeper {
    clock: Arc<dyn Clock>,
    boot_id: String,
    /// Engine time = clock.boot_ms() + offset_ms.
    offset_ms: i64,
    max_step_ms: i64,
    confirm_ms: i64,
    /// Trusted wall time minus engine time: one atomic, so the hot paths read the trusted time without a lock.
    delta_ms: AtomicI64,
    state: Mutex<StepState>,
    steps_total: AtomicU64,
    /// The pending step's size, 0 when none (for metrics).
    pending_step_ms: AtomicI64,
}

impl TimeKeeper {
    /// Continue from `checkpoint` (the data dir's, None for a new or older data dir). The first observation is made
    /// at once: a step that happened while the engine was down (on the same boot) is reported.
    pub fn open(
        clock: Arc<dyn Clock>,
        checkpoint: Option<&ClockCheckpoint>,
        max_step_ms: u64,
        confirm_ms: u64,
    ) -> (TimeKeeper, Option<ClockEvent>) {
        let boot_id = clock.boot_id();
        let boot_ms = clock.boot_ms();
        let wall_ms = clock.wall_ms();
        let (offset_ms, delta_ms, pending) = match checkpoint {
            // The same boot: engine time and the trusted wall time go on exactly.
            Some(cp) if !boot_id.is_empty() && cp.boot_id == boot_id && boot_ms + cp.offset_ms >= cp.mono_ms => {
                (cp.offset_ms, cp.wall_ms - cp.mono_ms, cp.pending)
            }
            // Another boot or machine: engine time resumes at the checkpoint (the downtime counts as none), and the
            // wall clock is all there is to place it in the calendar.
            Some(cp) => (cp.mono_ms - boot_ms, wall_ms - cp.mono_ms, None),
            None => (0, wall_ms - boot_ms, None),
        };
        let keeper = TimeKeeper {
            clock,
            boot_id,
            offset_ms,
            max_step_ms: max_step_ms as i64,
            confirm_ms: confirm_ms as i64,
            delta_ms: AtomicI64::new(delta_ms),
            state: Mutex::new(StepState { pending, last_alert_mono_ms: None }),
            steps_total: AtomicU64::new(0),
            pending_step_ms: AtomicI64::new(pending.map_or(0, |p| p.step_ms)),
        };
        let event = keeper.observe();
        (keeper, event)
    }

    /// Engine time: monotonic milliseconds on the data dir's timeline.
    pub fn mono_ms(&self) -> i64 {
        self.clock.boot_ms() + self.offset_ms
    }

    /// Trusted wall time: Unix milliseconds for periods, the breaker and timestamps.
    pub fn now_ms(&self) -> i64 {
        self.mono_and_now().1
    }

    /// (engine time, trusted wall time) of one reading.
    pub fn mono_and_now(&self) -> (i64, i64) {
        let mono_ms = self.mono_ms();
        (mono_ms, mono_ms + self.delta_ms.load(Ordering::SeqCst))
    }

    /// Compare the wall clock with the trusted time, and follow it, hold it off, or accept its step.
    pub fn observe(&self) -> Option<ClockEvent> {
        let mut state = self.state.lock().expect("clock state lock");
        let mono_ms = self.mono_ms();
        let wall_ms = self.clock.wall_ms();
        let step_ms = wall_ms - (mono_ms + self.delta_ms.load(Ordering::SeqCst));
        let agrees = step_ms.abs() <= self.max_step_ms;
        let event = match state.pending {
            None if agrees => None,
            Some(pending) if agrees => Some(ClockEvent::Undone { step_ms: pending.step_ms }),
            Some(pending) if (step_ms - pending.step_ms).abs() <= self.max_step_ms => {
                if mono_ms - pending.since_mono_ms < self.confirm_ms {
                    return None; // still waiting: the trusted time goes on without the step
                }
                Some(ClockEvent::Accepted { step_ms })
            }
            // A step, or a further step while one is pending: the wait starts (again).
            _ => {
                state.pending = Some(PendingStep { step_ms, since_mono_ms: mono_ms });
                self.pending_step_ms.store(step_ms, Ordering::SeqCst);
                self.steps_total.fetch_add(1, Ordering::SeqCst);
                let alert = state.last_alert_mono_ms.is_none_or(|at| mono_ms - at >= CLOCK_STEP_ALERT_INTERVAL_MS);
                if alert {
                    state.last_alert_mono_ms = Some(mono_ms);
                }
                return Some(ClockEvent::Stepped { step_ms, alert });
            }
        };
        // The clocks agree (again), or the step is accepted: follow the wall clock.
        state.pending = None;
        self.pending_step_ms.store(0, Ordering::SeqCst);
        self.delta_ms.store(wall_ms - mono_ms, Ordering::SeqCst);
        event
    }

    /// What to persist now.
    pub fn checkpoint(&self) -> ClockCheckpoint {
        let state = self.state.lock().expect("clock state lock");
        let (mono_ms, wall_ms) = self.mono_and_now();
        ClockCheckpoint {
            boot_id: self.boot_id.clone(),
            offset_ms: self.offset_ms,
            mono_ms,
            wall_ms,
            pending: state.pending,
        }
    }

    /// Steps seen since the engine opened.
    pub fn steps_total(&self) -> u64 {
        self.steps_total.load(Ordering::SeqCst)
    }

    /// The pending step (wall minus trusted time), 0 while the clocks agree.
    pub fn pending_step_ms(&self) -> i64 {
        self.pending_step_ms.load(Ordering::SeqCst)
    }

    pub fn max_step_ms(&self) -> i64 {
        self.max_step_ms
    }

    pub fn confirm_ms(&self) -> i64 {
        self.confirm_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START_MS: i64 = 1_764_547_200_000; // 2025-12-01T00:00Z
    const DAY_MS: i64 = 86_400_000;

    fn keeper(clock: &Arc<ManualClock>, checkpoint: Option<&ClockCheckpoint>) -> (TimeKeeper, Option<ClockEvent>) {
        TimeKeeper::open(clock.clone(), checkpoint, 1_000, 60_000)
    }

    #[test]
    fn the_trusted_time_follows_an_agreeing_wall_clock_and_its_small_corrections() {
        let clock = Arc::new(ManualClock::new(START_MS));
        let (time, event) = keeper(&clock, None);
        assert_eq!(event, None);
        assert_eq!(time.now_ms(), START_MS);
        clock.advance_ms(500);
        clock.step_wall_ms(-900); // a leap second, NTP's small step: within max_clock_step_ms
        assert_eq!(time.observe(), None);
        assert_eq!(time.now_ms(), START_MS - 400);
        assert_eq!(time.steps_total(), 0);
    }

    #[test]
    fn a_step_undone_a_second_later_never_reaches_the_trusted_time() {
        let clock = Arc::new(ManualClock::new(START_MS));
        let (time, _) = keeper(&clock, None);
        let mono_before = time.mono_ms();
        clock.step_wall_ms(32 * DAY_MS);
        assert_eq!(time.observe(), Some(ClockEvent::Stepped { step_ms: 32 * DAY_MS, alert: true }));
        assert_eq!(time.now_ms(), START_MS, "the trusted time is extrapolated on the monotonic clock");
        assert_eq!(time.pending_step_ms(), 32 * DAY_MS);
        clock.advance_ms(1_000);
        assert_eq!(time.now_ms(), START_MS + 1_000);
        clock.step_wall_ms(-32 * DAY_MS);
        assert_eq!(time.observe(), Some(ClockEvent::Undone { step_ms: 32 * DAY_MS }));
        assert_eq!((time.now_ms(), time.pending_step_ms(), time.steps_total()), (START_MS + 1_000, 0, 1));
        assert_eq!(time.mono_ms(), mono_before + 1_000, "engine time never sees the wall clock");
    }

    #[test]
    fn a_step_that_holds_for_the_confirm_window_is_accepted() {
        let clock = Arc::new(ManualClock::new(START_MS));
        let (time, _) = keeper(&clock, None);
        clock.step_wall_ms(-2 * 3_600_000);
        assert!(matches!(time.observe(), Some(ClockEvent::Stepped { .. })));
        clock.advance_ms(59_999);
        clock.step_wall_ms(300); // NTP still slewing it: within max_clock_step_ms of the step
        assert_eq!(time.observe(), None);
        assert_eq!(time.now_ms(), START_MS + 59_999);
        clock.advance_ms(1);
        assert_eq!(time.observe(), Some(ClockEvent::Accepted { step_ms: -2 * 3_600_000 + 300 }));
        assert_eq!(time.now_ms(), clock.now_ms());
        assert_eq!(time.pending_step_ms(), 0);
    }

    #[test]
    fn a_further_step_while_one_is_pending_starts_the_wait_again_and_alerts_are_rate_limited() {
        let clock = Arc::new(ManualClock::new(START_MS));
        let (time, _) = keeper(&clock, None);
        clock.step_wall_ms(DAY_MS);
        assert_eq!(time.observe(), Some(ClockEvent::Stepped { step_ms: DAY_MS, alert: true }));
        clock.advance_ms(40_000);
        clock.step_wall_ms(DAY_MS);
        assert_eq!(time.observe(), Some(ClockEvent::Stepped { step_ms: 2 * DAY_MS, alert: false }));
        clock.advance_ms(40_000);
        assert_eq!(time.observe(), None, "40 s into the new wait: not accepted, although 80 s since the first step");
        clock.advance_ms(20_000);
        assert_eq!(time.observe(), Some(ClockEvent::Accepted { step_ms: 2 * DAY_MS }));
        assert_eq!(time.steps_total(), 2);
        clock.step_wall_ms(DAY_MS);
        assert_eq!(time.observe(), Some(ClockEvent::Stepped { step_ms: DAY_MS, alert: true }), "60 s after the last");
    }

    #[test]
    fn a_restart_on_the_same_boot_continues_engine_time_and_a_pending_step_exactly() {
        let clock = Arc::new(ManualClock::new(START_MS));
        let (time, _) = keeper(&clock, None);
        clock.advance_ms(5_000);
        clock.step_wall_ms(2 * 3_600_000);
        time.observe();
        clock.advance_ms(30_000);
        let checkpoint = time.checkpoint();
        let mono_at_checkpoint = time.mono_ms();
        drop(time);
        clock.advance_ms(10_000); // down for 10 s
        let (time, event) = keeper(&clock, Some(&checkpoint));
        assert_eq!(event, None, "the same pending step, not a new one");
        assert_eq!(time.mono_ms(), mono_at_checkpoint + 10_000, "the downtime is measured on the same boot");
        assert_eq!(time.now_ms(), START_MS + 45_000);
        clock.advance_ms(20_000);
        assert!(matches!(time.observe(), Some(ClockEvent::Accepted { .. })), "60 s after the step, across the restart");
    }

    #[test]
    fn a_step_while_the_engine_was_down_is_seen_when_it_opens() {
        let clock = Arc::new(ManualClock::new(START_MS));
        let (time, _) = keeper(&clock, None);
        let checkpoint = time.checkpoint();
        drop(time);
        clock.advance_ms(1_000);
        clock.step_wall_ms(32 * DAY_MS);
        let (time, event) = keeper(&clock, Some(&checkpoint));
        assert_eq!(event, Some(ClockEvent::Stepped { step_ms: 32 * DAY_MS, alert: true }));
        assert_eq!(time.now_ms(), START_MS + 1_000);
    }

    #[test]
    fn after_a_reboot_engine_time_resumes_at_the_checkpoint_and_the_wall_clock_places_it() {
        let clock = Arc::new(ManualClock::new(START_MS));
        let (time, _) = keeper(&clock, None);
        clock.advance_ms(7_000);
        let checkpoint = time.checkpoint();
        drop(time);
        clock.reboot(120_000);
        let (time, event) = keeper(&clock, Some(&checkpoint));
        assert_eq!(event, None);
        assert_eq!(time.mono_ms(), checkpoint.mono_ms, "the downtime is not on any monotonic clock: it counts none");
        assert_eq!(time.now_ms(), clock.now_ms());
        clock.advance_ms(1_000);
        assert_eq!(time.mono_ms(), checkpoint.mono_ms + 1_000);
    }
}

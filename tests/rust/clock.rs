//! The time rule through the engine (crate::clock), with the manual clocks: hold lifetimes are monotonic and survive
//! restarts, periods and HARD limits do not move on a wall-clock step until it has held, and clock_step is alerted.

use std::sync::Arc;
use std::time::Duration;

use spendgate::clock::{ManualClock, CLOCK_DOCUMENT};
use spendgate::period::{days_from_civil, PeriodRule, DAY_MS};
use spendgate::store::Store;
use spendgate::{BudgetUpdate, DenyReason, Engine, EngineConfig, HoldState};

const WAIT: Duration = Duration::from_secs(10);
const HOUR_MS: i64 = 3_600_000;
const CONFIRM_MS: u64 = 60_000;

/// 2026-12-31T23:00Z: an hour before a month ends.
fn dec_31_23h() -> i64 {
    days_from_civil(2026, 12, 31) * DAY_MS + 23 * HOUR_MS
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    clock: Arc<ManualClock>,
    engine: Option<Engine>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut f = Fixture { _dir: dir, path, clock: Arc::new(ManualClock::new(dec_31_23h())), engine: None };
        f.engine = Some(f.open());
        f
    }

    fn open(&self) -> Engine {
        let mut config = EngineConfig::new(&self.path);
        config.map_size_mb = 64;
        config.reap_interval_ms = 3_600_000; // tests observe, reap and roll by hand
        config.max_ttl_ms = 86_400_000;
        config.clock_step_confirm_ms = CONFIRM_MS;
        Engine::open_with_clock(config, self.clock.clone()).unwrap()
    }

    fn close(&mut self) {
        self.engine.take().unwrap().close();
    }

    fn reopen(&mut self) {
        self.close();
        self.engine = Some(self.open());
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    fn budget(&self, customer: &str, limit: i64) {
        let update = BudgetUpdate { limit: Some(limit), ..Default::default() };
        let outcome = self.engine().update_budget(customer, &update).unwrap();
        self.engine().wait_durable(outcome.ticket, WAIT).unwrap();
    }

    fn reserve(&self, customer: &str, amount: i64, ttl_ms: u64) -> spendgate::ReserveOutcome {
        let outcome = self.engine().reserve(customer, amount, "", ttl_ms).unwrap();
        self.engine().wait_durable(outcome.ticket, WAIT).unwrap();
        outcome
    }

    fn commit(&self, id: &str, amount: i64) -> spendgate::CommitOutcome {
        let outcome = self.engine().commit(id, amount).unwrap();
        self.engine().wait_durable(outcome.ticket, WAIT).unwrap();
        outcome
    }

    /// One reaper round: compare the clocks, roll what is due, expire what is due. Returns (rolled, expired).
    fn tick(&self) -> (u64, u64) {
        let rolled = self.engine().roll_due();
        (rolled, self.engine().reap_expired())
    }

    /// (kind, customer, step_ms, accepted) of every durable clock_step alert.
    fn clock_alerts(&self) -> Vec<(String, i64, i64)> {
        let ticket = self.engine().set_alert_cursor(0).unwrap(); // flushes the alerts queued before it
        self.engine().wait_durable(ticket, WAIT).unwrap();
        let alerts = self.engine().alerts_after(0, 1_000).unwrap();
        alerts
            .into_iter()
            .filter(|a| a.kind == "clock_step")
            .map(|a| {
                assert_eq!(a.customer_id, "", "a clock step is server-wide");
                assert!(a.message.contains("clock_step_confirm_ms"), "{}", a.message);
                (a.kind, a.values["step_ms"], a.values["accepted"])
            })
            .collect()
    }
}

#[test]
fn a_forward_step_of_two_hours_expires_no_hold_and_a_hard_budget_stays_within_its_limit() {
    let f = Fixture::new();
    f.budget("cus", 1_000);
    let a = f.reserve("cus", 1_000, 600_000);
    assert!(a.granted);
    f.clock.step_wall_ms(2 * HOUR_MS);
    f.clock.advance_ms(500);
    assert_eq!(f.tick(), (0, 0), "nothing rolls, nothing expires");
    let b = f.reserve("cus", 1, 600_000);
    assert!(!b.granted && b.reason == DenyReason::InsufficientBudget, "{b:?}");
    let commit = f.commit(&a.reservation_id, 1_000);
    assert!(!commit.hold_expired && commit.excess == 0, "{commit:?}");
    let balance = f.engine().balance("cus").unwrap();
    assert_eq!((balance.spent, balance.overdraft, balance.reserved), (1_000, 0, 0));
    assert_eq!(f.engine().stats().clock_steps_total, 1);
    assert_eq!(f.clock_alerts(), vec![("clock_step".to_string(), 2 * HOUR_MS, 0)]);
    f.engine().check_invariants().unwrap();
}

#[test]
fn a_hold_ends_at_its_ttl_in_monotonic_time_whichever_way_the_wall_clock_steps() {
    for step_ms in [-2 * HOUR_MS, 2 * HOUR_MS] {
        let f = Fixture::new();
        f.budget("cus", 1_000);
        let hold = f.reserve("cus", 100, 10_000);
        f.clock.step_wall_ms(step_ms);
        f.clock.advance_ms(9_999);
        assert_eq!(f.tick().1, 0, "step {step_ms}: not before its TTL");
        assert_eq!(f.engine().balance("cus").unwrap().reserved, 100);
        f.clock.advance_ms(1);
        assert_eq!(f.tick().1, 1, "step {step_ms}: at its TTL, not later");
        assert_eq!(f.engine().balance("cus").unwrap().reserved, 0);
        assert_eq!(f.engine().release(&hold.reservation_id).unwrap().state, HoldState::Expired);
    }
}

#[test]
fn a_step_past_the_month_end_undone_a_second_later_resets_nothing() {
    let f = Fixture::new();
    f.budget("cus", 1_000);
    let hold = f.reserve("cus", 1_000, 600_000);
    f.commit(&hold.reservation_id, 1_000);
    let before = f.engine().balance("cus").unwrap();
    f.clock.step_wall_ms(32 * DAY_MS);
    assert_eq!(f.tick(), (0, 0));
    f.clock.advance_ms(1_000);
    assert_eq!(f.tick(), (0, 0));
    f.clock.step_wall_ms(-32 * DAY_MS);
    assert_eq!(f.tick(), (0, 0));
    let after = f.engine().balance("cus").unwrap();
    assert_eq!((after.spent, after.period_start_ms), (1_000, before.period_start_ms), "the month did not reset");
    assert!(!f.reserve("cus", 1, 600_000).granted, "the month's limit still holds");
    assert!(f.engine().closed_periods("cus", 10).unwrap().is_empty());
    assert_eq!(f.engine().stats().clock_step_pending_ms, 0, "undone");
    // The real month end rolls it, as always.
    f.clock.advance_ms(HOUR_MS);
    assert_eq!(f.tick().0, 1);
    let jan = f.engine().balance("cus").unwrap();
    assert_eq!((jan.spent, jan.period_start_ms), (0, days_from_civil(2027, 1, 1) * DAY_MS));
}

#[test]
fn while_a_step_is_pending_periods_and_timestamps_go_by_the_extrapolated_time_then_follow_it() {
    let f = Fixture::new();
    f.budget("cus", 1_000);
    f.clock.step_wall_ms(2 * HOUR_MS); // past the month end, and it stays
    assert_eq!(f.tick().0, 0);
    assert_eq!(f.engine().now_ms(), dec_31_23h());
    assert_eq!(f.engine().stats().clock_step_pending_ms, 2 * HOUR_MS);
    let hold = f.reserve("cus", 10, 600_000);
    assert_eq!(hold.expires_at_ms, dec_31_23h() + 600_000, "the caller is shown the extrapolated time");
    f.clock.advance_ms(CONFIRM_MS as i64 - 1);
    assert_eq!(f.tick().0, 0, "not yet held for clock_step_confirm_ms");
    f.clock.advance_ms(1);
    assert_eq!(f.tick().0, 1, "held long enough: the wall clock is followed and the month rolls");
    assert_eq!(f.engine().now_ms(), f.clock_now());
    assert_eq!(
        f.clock_alerts(),
        vec![("clock_step".to_string(), 2 * HOUR_MS, 0), ("clock_step".to_string(), 2 * HOUR_MS, 1)]
    );
    assert_eq!(f.engine().stats().clock_steps_total, 1, "one step, alerted when seen and when accepted");
}

#[test]
fn a_restart_on_the_same_boot_keeps_a_hold_s_original_deadline() {
    let mut f = Fixture::new();
    f.budget("cus", 1_000);
    f.reserve("cus", 100, 10_000);
    f.clock.advance_ms(3_000);
    f.close();
    f.clock.advance_ms(4_000); // down for 4 s
    f.clock.step_wall_ms(-HOUR_MS); // and the wall clock stepped meanwhile
    f.engine = Some(f.open());
    assert_eq!(f.engine().balance("cus").unwrap().reserved, 100);
    f.clock.advance_ms(2_999);
    assert_eq!(f.tick().1, 0, "not before its deadline");
    f.clock.advance_ms(1);
    assert_eq!(f.tick().1, 1, "at its deadline: 10 s after the Reserve, the restart's downtime included");
    assert_eq!(f.engine().stats().clock_steps_total, 1, "the step while down was seen at the start");
}

#[test]
fn after_a_reboot_a_hold_keeps_the_lifetime_it_had_left_and_never_ends_early() {
    let mut f = Fixture::new();
    f.budget("cus", 1_000);
    f.reserve("cus", 100, 60_000);
    f.clock.advance_ms(20_000);
    f.close(); // the last checkpoint: 40 s left
    f.clock.reboot(30_000);
    f.engine = Some(f.open());
    f.clock.advance_ms(39_999);
    assert_eq!(f.tick().1, 0, "it had 40 s left when last seen: the downtime does not shorten it");
    f.clock.advance_ms(1);
    assert_eq!(f.tick().1, 1);
    assert_eq!(f.engine().stats().clock_steps_total, 0, "a reboot is not a clock step");
}

#[test]
fn after_a_crash_and_a_reboot_a_hold_outlives_its_ttl_by_at_most_the_time_since_the_last_checkpoint() {
    let mut f = Fixture::new();
    f.budget("cus", 1_000);
    f.reserve("cus", 100, 60_000);
    f.clock.advance_ms(20_000);
    f.reopen(); // its open checkpointed at 40 s left
    f.budget("flush", 1);
    let at_open = f.engine().document(CLOCK_DOCUMENT).unwrap().expect("a checkpoint");
    f.clock.advance_ms(5_000);
    f.close();
    // A crash 5 s after that checkpoint leaves it as the last one (a clean close writes a later one).
    {
        let store = Store::open(&f.path, 64, false).unwrap();
        let mut wtxn = store.env.write_txn().unwrap();
        store.documents.put(&mut wtxn, CLOCK_DOCUMENT, &at_open).unwrap();
        wtxn.commit().unwrap();
    }
    f.clock.reboot(30_000);
    // 35 s were left at the crash; it lives 40 s (those 5 s longer), never less.
    f.engine = Some(f.open());
    f.clock.advance_ms(39_999);
    assert_eq!(f.tick().1, 0);
    f.clock.advance_ms(1);
    assert_eq!(f.tick().1, 1);
}

#[test]
fn a_hold_from_before_engine_time_ends_by_the_wall_clock_at_its_expiry() {
    let mut f = Fixture::new();
    f.budget("cus", 1_000);
    f.reserve("cus", 100, 10_000);
    f.close();
    // Make it a data dir of the previous release: no clock checkpoint, holds without an engine-time deadline.
    {
        let store = Store::open(&f.path, 64, false).unwrap();
        let mut wtxn = store.env.write_txn().unwrap();
        assert!(store.documents.delete(&mut wtxn, CLOCK_DOCUMENT).unwrap());
        let holds: Vec<_> = store.holds.iter(&wtxn).unwrap().map(Result::unwrap).collect();
        for (hold_id, mut hold) in holds {
            assert!(hold.deadline_mono_ms.take().is_some());
            store.holds.put(&mut wtxn, &hold_id, &hold).unwrap();
        }
        wtxn.commit().unwrap();
    }
    f.clock.advance_ms(4_000);
    f.engine = Some(f.open());
    f.clock.advance_ms(5_999);
    assert_eq!(f.tick().1, 0);
    f.clock.advance_ms(1);
    assert_eq!(f.tick().1, 1, "at expires_ms");
    // And a new hold in the upgraded data dir ends on engine time.
    f.reserve("cus", 100, 1_000);
    f.clock.step_wall_ms(HOUR_MS);
    f.reopen();
    f.clock.advance_ms(999);
    assert_eq!(f.tick().1, 0);
    f.clock.advance_ms(1);
    assert_eq!(f.tick().1, 1);
}

#[test]
fn a_fixed_period_does_not_roll_on_a_step_back_and_forth_of_its_length() {
    let f = Fixture::new();
    let start = f.clock_now();
    let update = BudgetUpdate {
        limit: Some(100),
        period: Some(PeriodRule::Fixed { anchor_ms: start, length_ms: 10_000 }),
        ..Default::default()
    };
    f.engine().wait_durable(f.engine().update_budget("cus", &update).unwrap().ticket, WAIT).unwrap();
    for step_ms in [20_000, -20_000, -3 * HOUR_MS, 3 * HOUR_MS] {
        f.clock.step_wall_ms(step_ms);
        assert_eq!(f.tick().0, 0, "step {step_ms}");
    }
    assert_eq!(f.engine().balance("cus").unwrap().period_start_ms, start);
    assert_eq!(f.engine().stats().clock_steps_total, 2, "each step taken back counts as undone, not as a step");
}

impl Fixture {
    fn clock_now(&self) -> i64 {
        use spendgate::clock::Clock;
        self.clock.now_ms()
    }
}

#[test]
fn the_breaker_s_windows_do_not_move_on_a_pending_step() {
    // The default breaker: 10x the typical hour of the trailing day. A +2-day step that the windows followed would
    // age the whole history out, and a runaway right after it would find no "typical" to compare with.
    let f = Fixture::new();
    let update = BudgetUpdate { limit: Some(1_000_000_000), period: Some(PeriodRule::Lifetime), ..Default::default() };
    f.engine().wait_durable(f.engine().update_budget("cus", &update).unwrap().ticket, WAIT).unwrap();
    for _ in 0..6 * 12 {
        let hold = f.reserve("cus", 100, 600_000);
        assert!(!f.commit(&hold.reservation_id, 100).breaker_tripped);
        f.clock.advance_ms(300_000);
    }
    f.clock.step_wall_ms(2 * DAY_MS);
    f.tick();
    assert_eq!(f.engine().stats().clock_step_pending_ms, 2 * DAY_MS);
    let mut tripped = 0;
    for _ in 0..12 {
        let hold = f.reserve("cus", 5_000, 600_000);
        if !hold.granted {
            assert_eq!(hold.reason, DenyReason::Frozen);
            break;
        }
        tripped += usize::from(f.commit(&hold.reservation_id, 5_000).breaker_tripped);
        f.clock.advance_ms(60_000);
    }
    assert_eq!(tripped, 1, "the runaway is measured against the history it really has");
    assert!(f.engine().balance("cus").unwrap().frozen);
}

//! The engine's contract, one rule per test. Runs without Python: `cargo test`.

use std::sync::Arc;
use std::time::Duration;

use spendgate::clock::ManualClock;
use spendgate::{DenyReason, Engine, EngineConfig, ErrorKind, HoldState};

const WAIT: Duration = Duration::from_secs(10);

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    clock: Arc<ManualClock>,
    engine: Option<Engine>,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with_config(|_| {})
    }

    fn with_config(tweak: impl Fn(&mut EngineConfig)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let mut config = EngineConfig::new(&path);
        config.map_size_mb = 64;
        config.reap_interval_ms = 10_000; // tests reap by hand
        tweak(&mut config);
        let engine = Engine::open_with_clock(config, clock.clone()).unwrap();
        Fixture { _dir: dir, path, clock, engine: Some(engine) }
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    fn reopen(&mut self) {
        self.engine.take().unwrap().close();
        let mut config = EngineConfig::new(&self.path);
        config.map_size_mb = 64;
        config.reap_interval_ms = 10_000;
        self.engine = Some(Engine::open_with_clock(config, self.clock.clone()).unwrap());
    }

    fn budget(&self, customer: &str, limit: i64) {
        let outcome = self.engine().set_budget(customer, limit, "").unwrap();
        self.engine().wait_durable(outcome.ticket, WAIT).unwrap();
    }

    fn reserve(&self, customer: &str, amount: i64) -> String {
        let outcome = self.engine().reserve(customer, amount, "", 0).unwrap();
        assert!(outcome.granted, "{outcome:?}");
        self.engine().wait_durable(outcome.ticket, WAIT).unwrap();
        outcome.reservation_id
    }
}

#[test]
fn a_reserve_that_fits_is_granted_and_one_that_does_not_is_denied() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let granted = f.engine().reserve("cus", 60, "", 0).unwrap();
    assert!(granted.granted);
    assert_eq!(granted.remaining, 40);
    let denied = f.engine().reserve("cus", 41, "", 0).unwrap();
    assert!(!denied.granted);
    assert_eq!(denied.reason, DenyReason::InsufficientBudget);
    assert_eq!(denied.remaining, 40);
    assert_eq!(denied.ticket, 0, "a denial writes nothing");
    let balance = f.engine().balance("cus").unwrap();
    assert_eq!((balance.limit, balance.spent, balance.reserved, balance.remaining), (100, 0, 60, 40));
}

#[test]
fn commit_posts_the_actual_amount_and_frees_the_rest_of_the_hold() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let id = f.reserve("cus", 60);
    let outcome = f.engine().commit(&id, 25).unwrap();
    assert_eq!((outcome.charged, outcome.remaining, outcome.over_reserved, outcome.excess), (25, 75, false, 0));
    let balance = f.engine().balance("cus").unwrap();
    assert_eq!((balance.spent, balance.reserved, balance.remaining, balance.active_holds), (25, 0, 75, 0));
}

#[test]
fn a_commit_over_the_hold_is_recorded_in_full_and_flagged() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let id = f.reserve("cus", 90);
    let outcome = f.engine().commit(&id, 130).unwrap();
    assert!(outcome.over_reserved);
    assert_eq!((outcome.charged, outcome.excess, outcome.remaining), (130, 30, 0));
    let balance = f.engine().balance("cus").unwrap();
    assert_eq!((balance.spent, balance.overdraft, balance.remaining), (130, 30, 0));
    assert!(!f.engine().reserve("cus", 1, "", 0).unwrap().granted);
}

#[test]
fn release_voids_the_hold_and_repeats_are_idempotent() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let id = f.reserve("cus", 70);
    let first = f.engine().release(&id).unwrap();
    assert!(first.released && !first.replayed);
    assert_eq!(first.remaining, 100);
    let again = f.engine().release(&id).unwrap();
    assert!(again.released && again.replayed);
    assert_eq!(again.state, HoldState::Released);
    let err = f.engine().commit(&id, 5).unwrap_err();
    assert_eq!(err.kind, ErrorKind::FailedPrecondition, "{err}");
}

#[test]
fn commit_is_idempotent_per_reservation_and_final() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let id = f.reserve("cus", 50);
    let first = f.engine().commit(&id, 40).unwrap();
    f.engine().wait_durable(first.ticket, WAIT).unwrap();
    let again = f.engine().commit(&id, 40).unwrap();
    assert!(again.replayed);
    assert_eq!(again.charged, 40);
    assert_eq!(f.engine().balance("cus").unwrap().spent, 40, "a replay charges nothing more");
    assert_eq!(f.engine().commit(&id, 41).unwrap_err().kind, ErrorKind::FailedPrecondition);
    assert_eq!(f.engine().release(&id).unwrap_err().kind, ErrorKind::FailedPrecondition);
}

#[test]
fn replays_still_answer_after_a_restart() {
    let mut f = Fixture::new();
    f.budget("cus", 100);
    let committed = f.reserve("cus", 50);
    let released = f.reserve("cus", 10);
    let keyed = f.engine().reserve("cus", 5, "req-1", 0).unwrap();
    f.engine().wait_durable(f.engine().commit(&committed, 30).unwrap().ticket, WAIT).unwrap();
    f.engine().wait_durable(f.engine().release(&released).unwrap().ticket, WAIT).unwrap();
    f.reopen();
    assert!(f.engine().commit(&committed, 30).unwrap().replayed);
    assert!(f.engine().release(&released).unwrap().replayed);
    let retry = f.engine().reserve("cus", 5, "req-1", 0).unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.reservation_id, keyed.reservation_id);
    let balance = f.engine().balance("cus").unwrap();
    assert_eq!((balance.spent, balance.reserved, balance.active_holds), (30, 5, 1));
}

#[test]
fn an_idempotency_key_returns_the_same_reservation_and_rejects_another_amount() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let first = f.engine().reserve("cus", 30, "req-1", 0).unwrap();
    let retry = f.engine().reserve("cus", 30, "req-1", 0).unwrap();
    assert_eq!(first.reservation_id, retry.reservation_id);
    assert!(retry.replayed && !first.replayed);
    assert_eq!(f.engine().balance("cus").unwrap().reserved, 30, "no second hold");
    let err = f.engine().reserve("cus", 31, "req-1", 0).unwrap_err();
    assert_eq!(err.kind, ErrorKind::AlreadyExists);
    assert!(err.message.contains("30 units"), "{err}");
    // Keys are per customer.
    f.budget("other", 100);
    let other = f.engine().reserve("other", 31, "req-1", 0).unwrap();
    assert!(other.granted && !other.replayed);
    // After the hold is committed and gone from memory, the key still answers.
    f.engine().wait_durable(f.engine().commit(&first.reservation_id, 30).unwrap().ticket, WAIT).unwrap();
    let late_retry = f.engine().reserve("cus", 30, "req-1", 0).unwrap();
    assert_eq!(late_retry.reservation_id, first.reservation_id);
    assert_eq!(f.engine().balance("cus").unwrap().spent, 30);
}

#[test]
fn expired_holds_are_reclaimed_and_a_late_commit_is_still_billed() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let id = f.engine().reserve("cus", 80, "", 1_000).unwrap().reservation_id;
    f.clock.advance_ms(999);
    assert_eq!(f.engine().reap_expired(), 0);
    f.clock.advance_ms(1);
    assert_eq!(f.engine().reap_expired(), 1);
    assert_eq!(f.engine().balance("cus").unwrap().remaining, 100);
    let release = f.engine().release(&id).unwrap();
    assert!(!release.released);
    assert_eq!(release.state, HoldState::Expired);
    let late = f.engine().commit(&id, 120).unwrap();
    assert!(late.hold_expired);
    assert_eq!((late.charged, late.excess), (120, 20));
    f.engine().wait_durable(late.ticket, WAIT).unwrap();
    assert!(f.engine().commit(&id, 120).unwrap().replayed);
    let balance = f.engine().balance("cus").unwrap();
    assert_eq!((balance.spent, balance.reserved, balance.overdraft), (120, 0, 20));
    f.engine().check_invariants().unwrap();
}

#[test]
fn holds_that_expired_while_the_engine_was_down_are_reclaimed_on_start() {
    let mut f = Fixture::new();
    f.budget("cus", 100);
    f.engine().reserve("cus", 80, "", 1_000).unwrap();
    let kept = f.engine().reserve("cus", 10, "", 60_000).unwrap();
    f.engine().wait_durable(kept.ticket, WAIT).unwrap();
    f.engine.take().unwrap().close();
    f.clock.advance_ms(5_000);
    let mut config = EngineConfig::new(&f.path);
    config.map_size_mb = 64;
    config.reap_interval_ms = 1; // the reaper runs at start
    f.engine = Some(Engine::open_with_clock(config, f.clock.clone()).unwrap());
    let deadline = std::time::Instant::now() + WAIT;
    while f.engine().balance("cus").unwrap().reserved != 10 {
        assert!(std::time::Instant::now() < deadline, "expired hold was not reclaimed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(f.engine().balance("cus").unwrap().active_holds, 1);
}

#[test]
fn bad_input_is_rejected_with_a_clear_message_and_changes_nothing() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let id = f.reserve("cus", 10);
    let before = f.engine().balance("cus").unwrap();
    let long = "x".repeat(129);
    let cases: Vec<(&str, Result<(), spendgate::EngineError>)> = vec![
        ("negative amount", f.engine().reserve("cus", -5, "", 0).map(drop)),
        ("zero amount", f.engine().reserve("cus", 0, "", 0).map(drop)),
        ("huge amount", f.engine().reserve("cus", (1 << 53) + 1, "", 0).map(drop)),
        ("empty customer", f.engine().reserve("", 5, "", 0).map(drop)),
        ("long customer", f.engine().reserve(&long, 5, "", 0).map(drop)),
        ("long key", f.engine().reserve("cus", 5, &long, 0).map(drop)),
        ("ttl over max", f.engine().reserve("cus", 5, "", 3_600_001).map(drop)),
        ("negative commit", f.engine().commit(&id, -1).map(drop)),
        ("malformed id", f.engine().commit("nope", 1).map(drop)),
        ("negative limit", f.engine().set_budget("cus", -1, "").map(drop)),
        ("long stripe id", f.engine().set_budget("cus", 5, &long).map(drop)),
    ];
    for (case, result) in cases {
        let err = result.expect_err(case);
        assert_eq!(err.kind, ErrorKind::InvalidArgument, "{case}: {err}");
        assert!(err.message.len() > 20, "{case}: message says what is wrong: {err}");
    }
    let unknown = f.engine().commit("rsv_00000000000000ff", 1).unwrap_err();
    assert_eq!(unknown.kind, ErrorKind::NotFound);
    let no_budget = f.engine().reserve("nobody", 1, "", 0).unwrap_err();
    assert_eq!(no_budget.kind, ErrorKind::NotFound);
    assert!(no_budget.message.contains("SetBudget"), "{no_budget}");
    assert_eq!(f.engine().balance("cus").unwrap(), before);
}

#[test]
fn the_number_of_open_holds_per_budget_is_bounded() {
    let f = Fixture::with_config(|c| c.max_holds_per_budget = 3);
    f.budget("cus", 100);
    for _ in 0..3 {
        f.reserve("cus", 1);
    }
    let denied = f.engine().reserve("cus", 1, "", 0).unwrap();
    assert_eq!(denied.reason, DenyReason::TooManyHolds);
    assert_eq!(f.engine().balance("cus").unwrap().reserved, 3);
}

#[test]
fn raising_a_limit_absorbs_an_overdraft_and_lowering_denies_until_freed() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let id = f.reserve("cus", 100);
    f.engine().commit(&id, 150).unwrap();
    f.budget("cus", 200);
    assert_eq!(f.engine().balance("cus").unwrap().remaining, 50);
    let hold = f.reserve("cus", 50);
    f.budget("cus", 150);
    assert_eq!(f.engine().balance("cus").unwrap().remaining, 0);
    assert!(!f.engine().reserve("cus", 1, "", 0).unwrap().granted);
    f.engine().release(&hold).unwrap();
    assert_eq!(f.engine().balance("cus").unwrap().remaining, 0, "150 spent of 150");
    f.engine().check_invariants().unwrap();
}

#[test]
fn a_data_dir_is_owned_by_one_engine_at_a_time() {
    let f = Fixture::new();
    let err = Engine::open(EngineConfig::new(&f.path)).err().expect("second open must fail");
    assert_eq!(err.kind, ErrorKind::FailedPrecondition);
    assert!(err.message.contains("in use"), "{err}");
}

#[test]
fn counters_after_a_restart_equal_what_lmdb_holds() {
    let mut f = Fixture::new();
    f.budget("a", 1_000);
    f.budget("b", 500);
    let a1 = f.reserve("a", 300);
    let _a2 = f.reserve("a", 200);
    let b1 = f.reserve("b", 400);
    f.engine().commit(&a1, 250).unwrap();
    f.engine().commit(&b1, 450).unwrap();
    let before: Vec<_> = ["a", "b"].iter().map(|c| f.engine().balance(c).unwrap()).collect();
    f.reopen();
    let after: Vec<_> = ["a", "b"].iter().map(|c| f.engine().balance(c).unwrap()).collect();
    assert_eq!(before, after);
    for (customer, record) in f.engine().stored_budgets().unwrap() {
        let view = f.engine().balance(&customer).unwrap();
        assert_eq!(
            (record.limit, record.spent, record.held, record.overdraft),
            (view.limit, view.spent, view.reserved, view.overdraft)
        );
    }
    f.engine().check_invariants().unwrap();
}

#[test]
fn close_releases_the_data_dir_so_the_same_process_can_reopen_it() {
    let f = Fixture::new();
    f.budget("cus", 100);
    f.engine().close();
    let err = f.engine().reserve("cus", 1, "", 0).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    let reopened = Engine::open(EngineConfig::new(&f.path)).unwrap();
    assert_eq!(reopened.balance("cus").unwrap().limit, 100);
}

#[test]
fn a_replayed_reserve_says_what_became_of_the_hold() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let first = f.engine().reserve("cus", 10, "req", 0).unwrap();
    assert_eq!(first.state, Some(HoldState::Active));
    f.engine().wait_durable(f.engine().commit(&first.reservation_id, 7).unwrap().ticket, WAIT).unwrap();
    let replay = f.engine().reserve("cus", 10, "req", 0).unwrap();
    assert_eq!((replay.replayed, replay.state), (true, Some(HoldState::Committed)));
    assert_eq!((replay.granted, replay.reason), (false, DenyReason::HoldEnded), "an ended hold holds nothing");
    let denied = f.engine().reserve("cus", 1_000, "", 0).unwrap();
    assert_eq!(denied.state, None);
}

/// A retry under the key of a hold that ended must not act as if it held anything: after a release its commit would
/// be refused (usage unbilled), after an expiry it would spend past a full hard budget.
#[test]
fn a_replay_of_a_released_or_expired_hold_is_a_denial_and_changes_nothing() {
    let f = Fixture::new();
    f.budget("cus", 1_000);
    let released = f.engine().reserve("cus", 250, "job-1", 0).unwrap();
    f.engine().wait_durable(f.engine().release(&released.reservation_id).unwrap().ticket, WAIT).unwrap();
    let expiring = f.engine().reserve("cus", 400, "job-2", 1_000).unwrap();
    f.engine().wait_durable(expiring.ticket, WAIT).unwrap();
    f.clock.advance_ms(2_000);
    f.engine().reap_expired();
    let full = f.engine().reserve("cus", 1_000, "", 0).unwrap();
    assert!(full.granted);
    for (key, amount, state) in [("job-1", 250, HoldState::Released), ("job-2", 400, HoldState::Expired)] {
        let replay = f.engine().reserve("cus", amount, key, 0).unwrap();
        assert!(!replay.granted && replay.replayed, "{replay:?}");
        assert_eq!((replay.reason, replay.state), (DenyReason::HoldEnded, Some(state)));
    }
    let balance = f.engine().balance("cus").unwrap();
    assert_eq!((balance.spent, balance.reserved, balance.active_holds), (0, 1_000, 1));
}

#[test]
fn two_data_dirs_never_issue_the_same_reservation_id_and_refuse_each_others() {
    let (a, b) = (Fixture::new(), Fixture::new());
    a.budget("cus", 100);
    b.budget("cus", 100);
    let from_a = a.reserve("cus", 10);
    let from_b = b.reserve("cus", 20);
    assert_ne!(from_a, from_b, "the same counter, different instance ids");
    assert_eq!(from_a.len(), 36);
    let err = b.engine().commit(&from_a, 10).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert!(err.message.contains("another") || err.message.contains("not by this one"), "{err}");
    assert_eq!(b.engine().release(&from_a).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(b.engine().balance("cus").unwrap().reserved, 20, "b's own hold is untouched");
    b.engine().commit(&from_b, 20).unwrap();
}

#[test]
fn a_restored_copy_gets_a_new_instance_id_and_refuses_every_reservation_id_from_before() {
    let f = Fixture::new();
    f.budget("cus", 1_000);
    let committed = f.reserve("cus", 100);
    f.engine().wait_durable(f.engine().commit(&committed, 100).unwrap().ticket, WAIT).unwrap();
    let in_flight = f.reserve("cus", 450);
    let backup_dir = f.path.join("backup");
    f.engine().backup(&backup_dir).unwrap();
    let before = f.engine().instance_id();
    let renewed = spendgate::engine::renew_identity(&backup_dir, 64, 1_700_000_000_000).unwrap();
    assert_ne!(renewed, before);
    let restored = Engine::open_with_clock(EngineConfig::new(&backup_dir), f.clock.clone()).unwrap();
    assert_eq!(restored.instance_id(), renewed);
    // The app's in-flight hold from before the restore is not someone else's new hold.
    let fresh = restored.reserve("cus", 450, "", 0).unwrap();
    assert!(fresh.granted && fresh.reservation_id != in_flight && fresh.reservation_id != committed);
    for old in [&in_flight, &committed] {
        assert_eq!(restored.commit(old, 450).unwrap_err().kind, ErrorKind::NotFound);
    }
    // The backup's outbox entry may be at Stripe already: it is marked, and keeps its identifier.
    let entries = restored.outbox_pending(10).unwrap();
    assert_eq!(entries.len(), 1);
    assert!(entries[0].restored_ms.is_some());
    assert_eq!(entries[0].identifier, format!("sg-{committed}"));
    restored.wait_durable(restored.commit(&fresh.reservation_id, 300).unwrap().ticket, WAIT).unwrap();
    let after = restored.outbox_pending(10).unwrap();
    assert_eq!(after[1].identifier, format!("sg-{}", fresh.reservation_id));
    assert!(after[1].restored_ms.is_none());
    restored.check_invariants().unwrap();
}

#[test]
fn a_backup_taken_under_load_opens_to_consistent_books() {
    let f = Fixture::with_config(|c| c.relaxed = true);
    f.budget("cus", 1_000_000);
    let engine = f.engine();
    let backup_dir = f.path.join("backup");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..2_000 {
                let r = engine.reserve("cus", 3, "", 0).unwrap();
                engine.commit(&r.reservation_id, 2).unwrap();
            }
        });
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(5));
            assert!(engine.backup(&backup_dir).unwrap() > 0);
        });
    });
    // On the fixture's clock: on the wall clock the copy's month (in 2023) has ended, and the reaper's roll-over of
    // it raced the balance read below (spent 0 against 24 outbox entries, 1 run in 30 on a loaded machine).
    let restored = Engine::open_with_clock(EngineConfig::new(&backup_dir), f.clock.clone()).unwrap();
    restored.check_invariants().unwrap();
    let b = restored.balance("cus").unwrap();
    assert_eq!(b.spent % 2, 0, "whole commits only: {b:?}");
    assert!(b.spent <= 4_000);
    assert_eq!(restored.outbox_stats().unwrap().depth as i64, b.spent / 2, "one outbox entry per commit");
    let again = engine.backup(&backup_dir).unwrap_err();
    assert_eq!(again.kind, ErrorKind::InvalidArgument, "{again}");
}

/// Any app token may commit any amount up to the maximum, so over-commits must never overflow a counter: past
/// MAX_BOOKED_UNITS a commit is refused, nothing changes, and the writer (every other customer) is untouched.
#[test]
fn over_commits_past_the_booking_bound_are_refused_and_stop_nothing_else() {
    use spendgate::limits::{MAX_AMOUNT_UNITS, MAX_BOOKED_UNITS};
    let mut f = Fixture::new();
    f.budget("attacker", MAX_AMOUNT_UNITS);
    f.budget("victim", 100);
    let per_commit = MAX_AMOUNT_UNITS;
    let fits = MAX_BOOKED_UNITS / per_commit;
    // Holds first (the budget is hard): each over-commit then posts far past its hold of 1.
    let holds: Vec<String> = (0..fits + 10).map(|_| f.reserve("attacker", 1)).collect();
    let mut refused = None;
    for (n, hold) in holds.iter().enumerate() {
        let n = n as i64;
        match f.engine().commit(hold, per_commit) {
            Ok(outcome) => f.engine().wait_durable(outcome.ticket, WAIT).unwrap(),
            Err(err) => {
                refused = Some((n, err));
                break;
            }
        }
    }
    let (n, err) = refused.expect("the bound was reached");
    assert_eq!(n, fits, "exactly the commits that fit were taken");
    assert_eq!(err.kind, ErrorKind::InvalidArgument, "{err}");
    assert!(err.message.contains("nothing was changed"), "{err}");
    let before = f.engine().balance("attacker").unwrap();
    assert_eq!(before.spent, MAX_BOOKED_UNITS);
    assert!(f.engine().failure().is_none(), "the writer is alive");
    let victim = f.reserve("victim", 10);
    f.engine().wait_durable(f.engine().commit(&victim, 10).unwrap().ticket, WAIT).unwrap();
    f.reopen();
    assert_eq!(f.engine().balance("attacker").unwrap().spent, MAX_BOOKED_UNITS);
    assert_eq!(f.engine().balance("victim").unwrap().spent, 10);
    f.engine().check_invariants().unwrap();
}

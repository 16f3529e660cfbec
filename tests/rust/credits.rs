//! Quote (a Reserve's dry run) and prepaid credits (GrantCredits): one rule per test.

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use spendgate::breaker::BreakerConfig;
use spendgate::clock::{Clock, ManualClock};
use spendgate::period::{days_from_civil, PeriodRule, DAY_MS};
use spendgate::records::EnforcementMode;
use spendgate::{BudgetUpdate, DenyReason, Engine, EngineConfig, ErrorKind};

const WAIT: Duration = Duration::from_secs(10);

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    clock: Arc<ManualClock>,
    max_holds: u64,
    engine: Option<Engine>,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with_max_holds(10_000)
    }

    fn with_max_holds(max_holds: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let clock = Arc::new(ManualClock::new(days_from_civil(2026, 11, 10) * DAY_MS));
        let mut f = Fixture { _dir: dir, path, clock, max_holds, engine: None };
        f.engine = Some(f.open());
        f
    }

    fn open(&self) -> Engine {
        let mut config = EngineConfig::new(&self.path);
        config.map_size_mb = 64;
        config.reap_interval_ms = 10_000;
        config.relaxed = true;
        config.max_holds_per_budget = self.max_holds;
        config.breaker = BreakerConfig { multiplier: 0, recent_ms: 3_600_000, window_ms: 86_400_000, min_units: 0 };
        Engine::open_with_clock(config, self.clock.clone()).unwrap()
    }

    fn reopen(&mut self) {
        self.engine.take().unwrap().close();
        self.engine = Some(self.open());
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    fn set(&self, customer: &str, update: BudgetUpdate) {
        let outcome = self.engine().update_budget(customer, &update).unwrap();
        self.engine().wait_durable(outcome.ticket, WAIT).unwrap();
    }

    fn grant(&self, customer: &str, amount: i64, key: &str) -> spendgate::GrantOutcome {
        let outcome = self.engine().grant_credits(customer, amount, key, "test").unwrap();
        self.engine().wait_durable(outcome.ticket, WAIT).unwrap();
        outcome
    }

    /// Make everything queued durable (alerts are queued behind the call that raised them).
    fn flush(&self) {
        let ticket = self.engine().set_alert_cursor(0).unwrap();
        self.engine().wait_durable(ticket, WAIT).unwrap();
    }

    fn spend(&self, customer: &str, amount: i64) {
        let hold = self.engine().reserve(customer, amount, "", 0).unwrap();
        assert!(hold.granted, "{hold:?}");
        let done = self.engine().commit(&hold.reservation_id, amount).unwrap();
        self.engine().wait_durable(done.ticket, WAIT).unwrap();
    }
}

fn limit(limit: i64) -> BudgetUpdate {
    BudgetUpdate { limit: Some(limit), ..Default::default() }
}

#[test]
fn a_grant_adds_to_the_limit_once_per_key() {
    let f = Fixture::new();
    f.set("c", limit(100));
    let first = f.grant("c", 40, "k1");
    assert_eq!((first.limit_after, first.credits_after, first.replayed), (140, 40, false));
    assert_eq!((first.balance.limit, first.balance.credits, first.balance.remaining), (140, 40, 140));
    let again = f.grant("c", 40, "k1");
    assert_eq!((again.limit_after, again.replayed, again.granted_ms), (140, true, first.granted_ms));
    assert_eq!(f.engine().balance("c").unwrap().limit, 140);
    for (customer, amount) in [("c", 41), ("d", 40)] {
        if customer == "d" {
            f.set("d", limit(1));
        }
        let err = f.engine().grant_credits(customer, amount, "k1", "").unwrap_err();
        assert_eq!(err.kind, ErrorKind::AlreadyExists, "{err:?}");
    }
    // SetBudget sets the configured limit: the credits stay on top.
    f.set("c", limit(10));
    let b = f.engine().balance("c").unwrap();
    assert_eq!((b.limit, b.credits), (50, 40));
}

#[test]
fn a_grant_past_max_amount_units_or_with_bad_input_changes_nothing() {
    let f = Fixture::new();
    f.set("c", limit(spendgate::limits::MAX_AMOUNT_UNITS - 5));
    let before = f.engine().balance("c").unwrap();
    for (customer, amount, key) in [("c", 6, "k"), ("c", 0, "k"), ("c", -1, "k"), ("c", 1, ""), ("nobody", 1, "k")] {
        let err = f.engine().grant_credits(customer, amount, key, "").unwrap_err();
        let expected = if customer == "nobody" { ErrorKind::NotFound } else { ErrorKind::InvalidArgument };
        assert_eq!(err.kind, expected, "{customer} {amount} {key:?}: {err:?}");
    }
    assert_eq!(f.engine().balance("c").unwrap(), before);
    assert_eq!(f.grant("c", 5, "k").limit_after, spendgate::limits::MAX_AMOUNT_UNITS);
    // and SetBudget cannot then push limit + credits past the bound either
    let err = f.engine().update_budget("c", &limit(spendgate::limits::MAX_AMOUNT_UNITS)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
}

#[test]
fn unused_credits_carry_over_a_roll_over_and_survive_a_restart() {
    let mut f = Fixture::new();
    f.set("c", BudgetUpdate { limit: Some(100), period: Some(PeriodRule::CALENDAR_MONTH), ..Default::default() });
    f.grant("c", 50, "k");
    f.spend("c", 120); // 100 of the limit, then 20 of the credits
    let usage = f.engine().usage("c", None).unwrap();
    assert_eq!((usage.record.units, usage.record.granted, usage.record.grants, usage.limit), (120, 50, 1, 150));
    f.clock.advance_ms(days_from_civil(2026, 12, 1) * DAY_MS - f.clock.now_ms());
    assert_eq!(f.engine().roll_due(), 1);
    f.flush();
    let b = f.engine().balance("c").unwrap();
    assert_eq!((b.limit, b.credits, b.spent, b.remaining), (130, 30, 0, 130));
    f.reopen();
    let b = f.engine().balance("c").unwrap();
    assert_eq!((b.limit, b.credits, b.remaining), (130, 30, 130));
    let closed = f.engine().closed_periods("c", 10).unwrap();
    assert_eq!((closed[0].limit, closed[0].credits, closed[0].spent), (100, 50, 120));
    let previous = f.engine().usage("c", Some(closed[0].start_ms)).unwrap();
    assert_eq!((previous.limit, previous.record.granted), (150, 50));
    // The replay after a restart comes from LMDB.
    let again = f.engine().grant_credits("c", 50, "k", "").unwrap();
    assert_eq!((again.replayed, again.limit_after, again.ticket), (true, 150, 0));
    assert!(f.engine().check_invariants().is_ok());
}

#[test]
fn a_grant_is_in_the_ledger_but_never_in_the_outbox() {
    let f = Fixture::new();
    f.set("c", limit(10));
    f.grant("c", 7, "k");
    assert!(f.engine().outbox_pending(100).unwrap().is_empty());
    assert_eq!(f.engine().stats().outbox_depth, 0);
    f.spend("c", 3);
    let pending = f.engine().outbox_pending(100).unwrap();
    assert_eq!(pending.iter().map(|e| e.amount).collect::<Vec<_>>(), vec![3]);
}

#[test]
fn concurrent_grants_add_up_exactly() {
    let f = Fixture::new();
    f.set("c", limit(0));
    let engine = f.engine();
    std::thread::scope(|scope| {
        for thread in 0..8 {
            scope.spawn(move || {
                for i in 0..50 {
                    // Every key is tried by two threads: each adds once.
                    let key = format!("k{}", (thread / 2) * 1000 + i);
                    let o = engine.grant_credits("c", 3, &key, "").unwrap();
                    engine.wait_durable(o.ticket, WAIT).unwrap();
                }
            });
        }
    });
    let b = engine.balance("c").unwrap();
    assert_eq!((b.limit, b.credits), (4 * 50 * 3, 4 * 50 * 3));
    assert_eq!(engine.usage("c", None).unwrap().record.grants, 200);
}

#[test]
fn a_quote_answers_what_the_reserve_after_it_does_and_changes_nothing() {
    let f = Fixture::with_max_holds(3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    f.set("org", limit(500));
    let mut open: Vec<String> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..400 {
        let customer = format!("c{}", round % 5);
        if rng.random_bool(0.3) || round < 5 {
            let mut update = BudgetUpdate {
                limit: Some(rng.random_range(0..300)),
                included: Some(rng.random_range(0..200)),
                mode: Some(if rng.random_bool(0.5) { EnforcementMode::Soft } else { EnforcementMode::Hard }),
                block_overage: Some(rng.random_bool(0.3)),
                ..Default::default()
            };
            if round < 5 && round % 2 == 0 {
                update.parent = Some("org".into());
            }
            f.set(&customer, update);
            if rng.random_bool(0.1) {
                let frozen = rng.random_bool(0.5);
                f.engine().freeze(&customer, frozen, "test").unwrap();
            }
        }
        if !open.is_empty() && rng.random_bool(0.4) {
            let id = open.swap_remove(rng.random_range(0..open.len()));
            f.engine().release(&id).unwrap();
        }
        let amount = rng.random_range(1..120);
        f.flush();
        let before = (f.engine().balance(&customer).unwrap(), f.engine().balance("org").unwrap(), f.engine().stats());
        let quote = f.engine().quote(&customer, amount).unwrap();
        let after = (f.engine().balance(&customer).unwrap(), f.engine().balance("org").unwrap(), f.engine().stats());
        assert_eq!(before, after, "a quote changed something");
        let reserve = f.engine().reserve(&customer, amount, "", 0).unwrap();
        let fields =
            |o: &spendgate::ReserveOutcome| (o.granted, o.reason, o.amount, o.over_limit, o.decided_by.clone());
        assert_eq!(fields(&quote), fields(&reserve), "round {round}: {quote:?} vs {reserve:?}");
        if reserve.granted {
            if rng.random_bool(0.5) {
                f.engine().commit(&reserve.reservation_id, rng.random_range(0..=amount)).unwrap();
            } else {
                open.push(reserve.reservation_id); // towards max_holds_per_budget
            }
        }
        seen.insert(reserve.reason as i32 * 2 + reserve.over_limit as i32);
    }
    // Every outcome came up: frozen, too many holds, insufficient, overage blocked, granted within and past a limit.
    for reason in
        [DenyReason::Frozen, DenyReason::TooManyHolds, DenyReason::InsufficientBudget, DenyReason::OverageBlocked]
    {
        assert!(seen.contains(&(reason as i32 * 2)), "{reason:?} never came up: {seen:?}");
    }
    assert!(seen.contains(&0) && seen.contains(&1), "{seen:?}");
}

#[test]
fn a_customers_stop_at_caps_the_limit_with_its_credits_for_a_quote_and_a_reserve_alike() {
    let f = Fixture::new();
    f.set("c", limit(100));
    f.grant("c", 50, "k");
    f.set("c", BudgetUpdate { stop_at: Some(120), ..Default::default() });
    for (amount, granted) in [(120, true), (121, false)] {
        let quoted = f.engine().quote("c", amount).unwrap();
        assert_eq!(quoted.granted, granted, "{amount}: {quoted:?}");
        let reserved = f.engine().reserve("c", amount, "", 0).unwrap();
        assert_eq!((reserved.granted, reserved.reason), (quoted.granted, quoted.reason), "{amount}");
        if reserved.granted {
            f.engine().release(&reserved.reservation_id).unwrap();
        }
    }
    // Without the stop-at, the limit with the credits admits again; the credits were never touched.
    f.set("c", BudgetUpdate { stop_at: Some(0), ..Default::default() });
    assert!(f.engine().quote("c", 150).unwrap().granted && !f.engine().quote("c", 151).unwrap().granted);
    assert_eq!(f.engine().balance("c").unwrap().credits, 50);
}

#[test]
fn a_grant_of_a_closed_period_moves_to_the_archive_and_its_key_still_replays() {
    use spendgate::archive::{archive_dir, file_name, read};
    use std::time::Instant;

    let dir = tempfile::tempdir().unwrap();
    let start_ms = days_from_civil(2026, 11, 10) * DAY_MS;
    let clock = Arc::new(ManualClock::new(start_ms));
    let open = || {
        let mut config = EngineConfig::new(dir.path());
        config.map_size_mb = 64;
        config.relaxed = true;
        config.ledger_retention_days = 0;
        config.prune_interval_ms = 50;
        config.reap_interval_ms = 5;
        Engine::open_with_clock(config, clock.clone()).unwrap()
    };
    let engine = open();
    let period = PeriodRule::Fixed { anchor_ms: start_ms, length_ms: 1_000 };
    let update = BudgetUpdate { limit: Some(100), period: Some(period), ..Default::default() };
    engine.wait_durable(engine.update_budget("c", &update).unwrap().ticket, WAIT).unwrap();
    let grant = engine.grant_credits("c", 7, "pack", "archived").unwrap();
    engine.wait_durable(grant.ticket, WAIT).unwrap();
    let hold = engine.reserve("c", 3, "", 0).unwrap();
    engine.wait_durable(engine.commit(&hold.reservation_id, 3).unwrap().ticket, WAIT).unwrap();
    let seqs: Vec<u64> = engine.outbox_pending(10).unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs.len(), 1, "a grant is never in the outbox");
    engine.wait_durable(engine.outbox_ack(&seqs).unwrap(), WAIT).unwrap();
    clock.advance_ms(1_000);
    engine.roll_due();
    let file = archive_dir(dir.path()).join(file_name(start_ms));
    let deadline = Instant::now() + WAIT;
    let archived = loop {
        let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let found = if len > 0 { read(&file, len).unwrap() } else { Vec::new() };
        if found.len() >= 2 || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let kinds: Vec<(i64, bool)> = archived.iter().map(|e| (e.amount, e.reservation_id.is_empty())).collect();
    assert_eq!(kinds, vec![(7, true), (3, false)], "the grant and the settled commit, in ledger order");
    assert_eq!(archived[0].reason, "archived");
    // The key replays from its grant record, before and after a restart; the credits carried over (7 unused).
    let replay = engine.grant_credits("c", 7, "pack", "").unwrap();
    assert!(replay.replayed && replay.reason == "archived", "{replay:?}");
    engine.close();
    let engine = open();
    assert!(engine.grant_credits("c", 7, "pack", "").unwrap().replayed);
    assert_eq!(engine.balance("c").unwrap().credits, 7);
    engine.close();
}

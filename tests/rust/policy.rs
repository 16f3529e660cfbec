//! Budgets as policy, one rule per test: orgs and members, periods and their roll-over, soft mode, the kill switch,
//! soft limits and alerts, the circuit breaker, and usage views that add up to the ledger.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use spendgate::breaker::BreakerConfig;
use spendgate::clock::ManualClock;
use spendgate::period::{days_from_civil, PeriodRule, DAY_MS};
use spendgate::records::{EnforcementMode, UsageDetail, UsagePart};
use spendgate::{BudgetUpdate, CommitArgs, DenyReason, Engine, EngineConfig, ReserveArgs};

const WAIT: Duration = Duration::from_secs(10);
/// 2026-11-10T00:00Z.
fn nov_10() -> i64 {
    days_from_civil(2026, 11, 10) * DAY_MS
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    clock: Arc<ManualClock>,
    breaker: BreakerConfig,
    relaxed: bool,
    engine: Option<Engine>,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with_breaker(BreakerConfig { multiplier: 0, recent_ms: 3_600_000, window_ms: 86_400_000, min_units: 0 })
    }

    fn with_breaker(breaker: BreakerConfig) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let clock = Arc::new(ManualClock::new(nov_10()));
        let mut f = Fixture { _dir: dir, path, clock, breaker, relaxed: false, engine: None };
        f.engine = Some(f.open());
        f
    }

    fn open(&self) -> Engine {
        let mut config = EngineConfig::new(&self.path);
        config.map_size_mb = 64;
        config.reap_interval_ms = 10_000; // tests roll and reap by hand
        config.breaker = self.breaker;
        config.relaxed = self.relaxed;
        Engine::open_with_clock(config, self.clock.clone()).unwrap()
    }

    /// No fsync: the race needs many ops, and durability is not what it tests.
    fn relaxed(&mut self) {
        self.relaxed = true;
        self.reopen();
    }

    fn reopen(&mut self) {
        self.engine.take().unwrap().close();
        self.engine = Some(self.open());
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    fn set(&self, customer: &str, update: BudgetUpdate) -> spendgate::SetBudgetOutcome {
        let outcome = self.engine().update_budget(customer, &update).unwrap();
        self.engine().wait_durable(outcome.ticket, WAIT).unwrap();
        outcome
    }

    fn budget(&self, customer: &str, limit: i64) {
        self.set(customer, BudgetUpdate { limit: Some(limit), ..Default::default() });
    }

    fn reserve(&self, customer: &str, amount: i64) -> spendgate::ReserveOutcome {
        let outcome = self.engine().reserve(customer, amount, "", 0).unwrap();
        self.engine().wait_durable(outcome.ticket, WAIT).unwrap();
        outcome
    }

    fn commit(&self, id: &str, amount: i64) -> spendgate::CommitOutcome {
        let outcome = self.engine().commit(id, amount).unwrap();
        self.engine().wait_durable(outcome.ticket, WAIT).unwrap();
        outcome
    }

    fn spend(&self, customer: &str, amount: i64) -> spendgate::CommitOutcome {
        let hold = self.reserve(customer, amount);
        assert!(hold.granted, "{hold:?}");
        self.commit(&hold.reservation_id, amount)
    }

    fn settle(&self) {
        // Alerts are queued behind the call that raised them: one more durable op flushes them.
        let ticket = self.engine().set_alert_cursor(0).unwrap();
        self.engine().wait_durable(ticket, WAIT).unwrap();
    }

    fn alerts(&self) -> Vec<(String, String)> {
        self.settle();
        let alerts = self.engine().alerts_after(0, 1_000).unwrap();
        alerts.into_iter().map(|a| (a.kind, a.customer_id)).collect()
    }
}

fn member_of(parent: &str, limit: i64) -> BudgetUpdate {
    BudgetUpdate { limit: Some(limit), parent: Some(parent.into()), ..Default::default() }
}

#[test]
fn a_new_budget_runs_on_the_calendar_month_in_utc() {
    let f = Fixture::new();
    f.budget("cus", 100);
    let b = f.engine().balance("cus").unwrap();
    assert_eq!(b.period, PeriodRule::CALENDAR_MONTH);
    assert_eq!(b.period_start_ms, days_from_civil(2026, 11, 1) * DAY_MS);
    assert_eq!(b.period_end_ms, days_from_civil(2026, 12, 1) * DAY_MS);
}

#[test]
fn a_member_reserve_must_fit_both_its_own_budget_and_its_org_s() {
    let f = Fixture::new();
    f.budget("org", 100);
    f.set("alice", member_of("org", 80));
    f.set("bob", member_of("org", 80));
    assert!(f.reserve("alice", 70).granted);
    let denied = f.reserve("bob", 40);
    assert!(!denied.granted);
    assert_eq!(
        (denied.reason, denied.decided_by.as_str(), denied.remaining),
        (DenyReason::InsufficientBudget, "org", 30)
    );
    // Bob's own budget was not touched by the refused attempt.
    let bob = f.engine().balance("bob").unwrap();
    assert_eq!((bob.reserved, bob.active_holds, bob.remaining), (0, 0, 80));
    let own = f.reserve("alice", 11);
    assert_eq!((own.granted, own.decided_by.as_str()), (false, "alice"));
    let org = f.engine().balance("org").unwrap();
    assert_eq!((org.reserved, org.active_holds, org.members), (70, 1, 2));
    f.engine().check_invariants().unwrap();
}

#[test]
fn a_member_commit_counts_at_both_levels_and_a_release_frees_both() {
    let mut f = Fixture::new();
    f.budget("org", 1_000);
    f.set("alice", member_of("org", 500));
    let hold = f.reserve("alice", 300);
    f.commit(&hold.reservation_id, 120);
    let voided = f.reserve("alice", 50);
    f.engine().wait_durable(f.engine().release(&voided.reservation_id).unwrap().ticket, WAIT).unwrap();
    let (alice, org) = (f.engine().balance("alice").unwrap(), f.engine().balance("org").unwrap());
    assert_eq!((alice.spent, alice.reserved, org.spent, org.reserved), (120, 0, 120, 0));
    assert_eq!((alice.parent.as_str(), alice.stripe_customer_id.as_str()), ("org", "org"), "seats bill to the org");
    f.reopen();
    assert_eq!(f.engine().balance("org").unwrap().spent, 120);
    f.engine().check_invariants().unwrap();
}

#[test]
fn orgs_nest_one_level_and_a_member_never_changes_its_org() {
    let f = Fixture::new();
    f.budget("org", 100);
    f.budget("other", 100);
    f.set("alice", member_of("org", 10));
    let e = f.engine();
    let deeper = e.update_budget("carol", &member_of("alice", 10)).unwrap_err();
    assert_eq!(deeper.kind, spendgate::ErrorKind::FailedPrecondition, "{deeper:?}");
    let moved = e.update_budget("alice", &BudgetUpdate { parent: Some("other".into()), ..Default::default() });
    assert_eq!(moved.unwrap_err().kind, spendgate::ErrorKind::FailedPrecondition);
    let org_into_member = e.update_budget("org", &BudgetUpdate { parent: Some("other".into()), ..Default::default() });
    assert_eq!(org_into_member.unwrap_err().kind, spendgate::ErrorKind::FailedPrecondition);
    let missing = e.update_budget("dave", &member_of("nobody", 10)).unwrap_err();
    assert_eq!(missing.kind, spendgate::ErrorKind::NotFound);
    let no_limit = e.update_budget("erin", &BudgetUpdate::default()).unwrap_err();
    assert_eq!(no_limit.kind, spendgate::ErrorKind::InvalidArgument, "{no_limit:?}");
    assert!(e.balance("dave").is_err() && e.balance("erin").is_err(), "nothing was created");
}

#[test]
fn sixteen_threads_across_members_never_overspend_either_level() {
    let f = Fixture::new();
    f.budget("org", 1_000);
    for m in 0..4 {
        f.set(&format!("m{m}"), member_of("org", 400));
    }
    let engine = f.engine();
    let granted: Vec<(usize, i64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|t| {
                scope.spawn(move || {
                    let member = format!("m{}", t % 4);
                    let mut got = 0;
                    for _ in 0..200 {
                        if engine.reserve(&member, 1, "", 0).unwrap().granted {
                            got += 1;
                        }
                    }
                    (t % 4, got)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut per_member = [0i64; 4];
    for (m, got) in granted {
        per_member[m] += got;
    }
    assert_eq!(per_member.iter().sum::<i64>(), 1_000, "the org's limit is used exactly");
    assert!(per_member.iter().all(|got| *got <= 400), "{per_member:?}");
    assert_eq!(engine.balance("org").unwrap().reserved, 1_000);
    engine.check_invariants().unwrap();
}

#[test]
fn a_period_roll_over_starts_spend_again_and_keeps_the_old_period() {
    let mut f = Fixture::new();
    let start = nov_10();
    f.set(
        "cus",
        BudgetUpdate {
            limit: Some(100),
            period: Some(PeriodRule::Fixed { anchor_ms: start, length_ms: 10_000 }),
            ..Default::default()
        },
    );
    f.spend("cus", 60);
    let open_hold = f.reserve("cus", 30);
    assert!(!f.reserve("cus", 11).granted);
    f.clock.advance_ms(10_000);
    assert_eq!(f.engine().roll_due(), 1);
    let b = f.engine().balance("cus").unwrap();
    assert_eq!((b.spent, b.reserved, b.remaining), (0, 30, 70), "holds carry over, spend starts again");
    assert_eq!((b.period_start_ms, b.period_end_ms), (start + 10_000, start + 20_000));
    // The old hold commits into the period it is committed in.
    f.commit(&open_hold.reservation_id, 25);
    let closed = f.engine().closed_periods("cus", 10).unwrap();
    assert_eq!(closed.len(), 1);
    assert_eq!(
        (closed[0].start_ms, closed[0].end_ms, closed[0].spent, closed[0].limit),
        (start, start + 10_000, 60, 100)
    );
    f.reopen();
    let b = f.engine().balance("cus").unwrap();
    assert_eq!((b.spent, b.period_start_ms), (25, start + 10_000));
    let old = f.engine().usage("cus", Some(start + 1)).unwrap();
    let new = f.engine().usage("cus", None).unwrap();
    assert_eq!((old.record.units, old.current, new.record.units, new.current), (60, false, 25, true));
    f.engine().check_invariants().unwrap();
}

#[test]
fn a_calendar_month_rolls_over_at_midnight_utc_on_the_first() {
    let f = Fixture::new();
    f.budget("cus", 100);
    f.spend("cus", 40);
    let dec_1 = days_from_civil(2026, 12, 1) * DAY_MS;
    f.clock.advance_ms(dec_1 - 1 - f.clock_now());
    assert_eq!(f.engine().roll_due(), 0);
    f.clock.advance_ms(1);
    assert_eq!(f.engine().roll_due(), 1);
    let b = f.engine().balance("cus").unwrap();
    assert_eq!((b.spent, b.period_start_ms, b.period_end_ms), (0, dec_1, days_from_civil(2027, 1, 1) * DAY_MS));
}

impl Fixture {
    fn clock_now(&self) -> i64 {
        use spendgate::clock::Clock;
        self.clock.now_ms()
    }
}

#[test]
fn a_stripe_period_that_starts_later_starts_now_and_one_that_started_earlier_only_moves_the_end() {
    let f = Fixture::new();
    f.budget("cus", 100);
    f.spend("cus", 40);
    let nov_1 = days_from_civil(2026, 11, 1) * DAY_MS;
    let sub = PeriodRule::Fixed { anchor_ms: nov_1 - 5 * DAY_MS, length_ms: 30 * DAY_MS }; // Oct 27 .. Nov 26
    let kept = f.set("cus", BudgetUpdate { period: Some(sub), ..Default::default() });
    assert!(!kept.rolled);
    assert_eq!(
        (kept.balance.spent, kept.balance.period_start_ms, kept.balance.period_end_ms),
        (40, nov_1, nov_1 + 25 * DAY_MS)
    );
    let renewed = PeriodRule::Fixed { anchor_ms: nov_10() - DAY_MS, length_ms: 30 * DAY_MS };
    let rolled = f.set("cus", BudgetUpdate { period: Some(renewed), ..Default::default() });
    assert!(rolled.rolled);
    assert_eq!((rolled.balance.spent, rolled.balance.period_start_ms), (0, nov_10() - DAY_MS));
}

#[test]
fn soft_mode_grants_past_the_limit_flags_it_and_alerts_once_per_period() {
    let f = Fixture::new();
    f.set("cus", BudgetUpdate { limit: Some(100), mode: Some(EnforcementMode::Soft), ..Default::default() });
    f.spend("cus", 90);
    let past = f.reserve("cus", 50);
    assert!(past.granted && past.over_limit, "{past:?}");
    let committed = f.commit(&past.reservation_id, 50);
    assert!(committed.over_limit);
    assert!(f.reserve("cus", 50).over_limit);
    let limit_alerts = f.alerts().into_iter().filter(|(kind, _)| kind == "limit_reached").count();
    assert_eq!(limit_alerts, 1);
    f.engine().check_invariants().unwrap();
}

#[test]
fn the_kill_switch_blocks_everything_past_the_included_quota() {
    let f = Fixture::new();
    f.set("cus", BudgetUpdate { limit: Some(1_000), included: Some(300), ..Default::default() });
    f.spend("cus", 250);
    assert!(f.reserve("cus", 100).granted, "overage is allowed up to the limit");
    f.set("cus", BudgetUpdate { block_overage: Some(true), ..Default::default() });
    let blocked = f.reserve("cus", 1);
    assert_eq!((blocked.granted, blocked.reason), (false, DenyReason::OverageBlocked));
    f.set("cus", BudgetUpdate { block_overage: Some(false), ..Default::default() });
    assert!(f.reserve("cus", 1).granted);
    f.engine().check_invariants().unwrap();
}

#[test]
fn a_stop_at_lowers_admission_in_either_mode_survives_a_reopen_and_never_raises_it() {
    let mut f = Fixture::new();
    f.set("cus", BudgetUpdate { limit: Some(1_000), mode: Some(EnforcementMode::Soft), ..Default::default() });
    f.spend("cus", 250);
    let set = f.set("cus", BudgetUpdate { stop_at: Some(300), ..Default::default() });
    assert_eq!((set.balance.limit, set.balance.stop_at, set.balance.remaining), (1_000, 300, 50));
    let denied = f.reserve("cus", 51);
    assert_eq!((denied.granted, denied.reason), (false, DenyReason::InsufficientBudget), "soft mode too");
    f.reopen();
    assert_eq!(f.engine().balance("cus").unwrap().stop_at, 300);
    assert!(!f.reserve("cus", 51).granted, "the stop-at is durable");
    assert!(f.reserve("cus", 50).granted);
    // Above the operator's limit it changes nothing; 0 removes it (back to the limit, soft mode again).
    let above = f.set("cus", BudgetUpdate { stop_at: Some(5_000), ..Default::default() });
    assert_eq!(above.balance.remaining, 700);
    f.set("cus", BudgetUpdate { stop_at: Some(0), ..Default::default() });
    assert!(f.reserve("cus", 2_000).over_limit);
    f.engine().check_invariants().unwrap();
}

#[test]
fn a_stop_at_on_an_org_stops_its_members() {
    let f = Fixture::new();
    f.budget("org", 1_000);
    f.set("m", member_of("org", 1_000));
    f.spend("m", 100);
    f.set("org", BudgetUpdate { stop_at: Some(150), ..Default::default() });
    let denied = f.reserve("m", 51);
    assert_eq!((denied.granted, denied.decided_by.as_str()), (false, "org"));
    assert!(f.reserve("m", 50).granted);
    f.engine().check_invariants().unwrap();
}

#[test]
fn a_soft_limit_alerts_once_per_crossing_and_again_next_period() {
    let f = Fixture::new();
    let start = nov_10();
    f.set(
        "cus",
        BudgetUpdate {
            limit: Some(1_000),
            soft_limit: Some(500),
            period: Some(PeriodRule::Fixed { anchor_ms: start, length_ms: 10_000 }),
            ..Default::default()
        },
    );
    f.spend("cus", 400);
    f.spend("cus", 200);
    f.spend("cus", 200);
    f.clock.advance_ms(10_000);
    f.engine().roll_due();
    f.spend("cus", 600);
    let soft: Vec<_> = f.alerts().into_iter().filter(|(kind, _)| kind == "soft_limit_crossed").collect();
    assert_eq!(soft.len(), 2, "{soft:?}");
}

#[test]
fn alerts_are_durable_in_order_and_survive_a_reopen() {
    let mut f = Fixture::new();
    f.budget("cus", 10);
    assert!(!f.reserve("cus", 11).granted);
    f.engine().wait_durable(f.engine().set_frozen("cus", true).unwrap().ticket, WAIT).unwrap();
    f.engine().wait_durable(f.engine().set_frozen("cus", false).unwrap().ticket, WAIT).unwrap();
    f.engine().raise_alert("settlement_dead_letter", "cus", "Stripe refused seq 4", &[("seq", 4)]).unwrap();
    let kinds: Vec<String> = f.alerts().into_iter().map(|(kind, _)| kind).collect();
    assert_eq!(kinds, ["limit_reached", "frozen", "unfrozen", "settlement_dead_letter"]);
    f.reopen();
    let after = f.engine().alerts_after(1, 100).unwrap();
    assert_eq!(after.iter().map(|a| a.seq).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(f.engine().alert_seq(), 4);
    assert!(f.engine().raise_alert("nonsense", "cus", "x", &[]).is_err());
    // The kinds that mark a budget are the engine's own: from outside (and for a budget that does not exist) they are
    // bad input, and the writer goes on.
    assert_eq!(
        f.engine().raise_alert("limit_reached", "nobody", "x", &[]).unwrap_err().kind,
        spendgate::ErrorKind::InvalidArgument
    );
    f.engine()
        .wait_durable(f.engine().raise_alert("settlement_dead_letter", "nobody", "x", &[]).unwrap(), WAIT)
        .unwrap();
    assert!(f.engine().failure().is_none());
}

#[test]
fn freezing_twice_for_the_same_reason_changes_nothing_and_raises_one_alert() {
    let f = Fixture::new();
    f.budget("cus", 10);
    for _ in 0..2 {
        let outcome = f.engine().freeze("cus", true, "Stripe: invoice in_1 unpaid").unwrap();
        f.engine().wait_durable(outcome.ticket, WAIT).unwrap();
        assert!(outcome.balance.frozen);
    }
    assert_eq!(f.engine().set_frozen("cus", false).unwrap().balance.frozen_reason, "");
    let kinds: Vec<String> = f.alerts().into_iter().map(|(kind, _)| kind).collect();
    assert_eq!(kinds, ["frozen", "unfrozen"]);
}

fn steady_then(f: &Fixture, hours: i64, per_hour: i64, spike: i64) -> Vec<bool> {
    let mut tripped = Vec::new();
    for _ in 0..hours {
        for _ in 0..12 {
            tripped.push(f.spend("cus", per_hour / 12).breaker_tripped);
            f.clock.advance_ms(300_000);
        }
    }
    for _ in 0..12 {
        let hold = f.reserve("cus", spike / 12);
        if !hold.granted {
            break;
        }
        tripped.push(f.commit(&hold.reservation_id, spike / 12).breaker_tripped);
        f.clock.advance_ms(60_000);
    }
    tripped
}

fn breaker() -> BreakerConfig {
    BreakerConfig { multiplier: 10, recent_ms: 3_600_000, window_ms: 24 * 3_600_000, min_units: 0 }
}

#[test]
fn the_breaker_freezes_a_runaway_and_says_why() {
    let f = Fixture::with_breaker(breaker());
    f.set("cus", BudgetUpdate { limit: Some(1_000_000_000), period: Some(PeriodRule::Lifetime), ..Default::default() });
    let tripped = steady_then(&f, 6, 1_200, 60_000);
    assert_eq!(tripped.iter().filter(|t| **t).count(), 1, "trips once");
    let b = f.engine().balance("cus").unwrap();
    assert!(b.frozen && b.frozen_reason.contains("circuit breaker"), "{b:?}");
    let denied = f.reserve("cus", 1);
    assert_eq!(denied.reason, DenyReason::Frozen);
    assert!(f.alerts().contains(&("breaker_tripped".into(), "cus".into())));
    assert_eq!(f.engine().stats().breaker_trips_total, 1);
}

#[test]
fn the_breaker_lets_steady_growth_through() {
    let f = Fixture::with_breaker(breaker());
    f.set("cus", BudgetUpdate { limit: Some(1_000_000_000), period: Some(PeriodRule::Lifetime), ..Default::default() });
    let mut per_hour = 1_200f64;
    for _ in 0..30 {
        for _ in 0..12 {
            assert!(!f.spend("cus", per_hour as i64 / 12).breaker_tripped);
            f.clock.advance_ms(300_000);
        }
        per_hour *= 1.2;
    }
    assert!(!f.engine().balance("cus").unwrap().frozen);
}

#[test]
fn a_budget_can_opt_out_of_the_breaker() {
    let f = Fixture::with_breaker(breaker());
    f.set("cus", BudgetUpdate { limit: Some(1_000_000_000), breaker_multiplier: Some(Some(0)), ..Default::default() });
    assert!(steady_then(&f, 4, 1_200, 60_000).iter().all(|t| !t));
}

fn token_usage(model: &str, input: (i64, i64), output: (i64, i64)) -> UsageDetail {
    UsageDetail {
        model: model.into(),
        parts: vec![
            UsagePart { token_type: "input".into(), tokens: input.0, units: input.1 },
            UsagePart { token_type: "output".into(), tokens: output.0, units: output.1 },
        ],
        cache_hit: false,
        fallback: false,
    }
}

#[test]
fn usage_views_add_up_to_the_ledger_by_day_model_and_dimension() {
    let mut f = Fixture::new();
    f.budget("org", 1_000_000);
    f.set("alice", member_of("org", 1_000_000));
    let e = f.engine();
    let commit = |customer: &str, usage: Option<UsageDetail>, amount: i64, feature: &str| {
        let dims: BTreeMap<String, String> = [("feature".to_string(), feature.to_string())].into();
        let args = ReserveArgs {
            customer_id: customer,
            amount: amount.max(1),
            model: "m",
            dimensions: dims,
            ..Default::default()
        };
        let hold = e.reserve_with(&args).unwrap();
        let outcome = e
            .commit_with(CommitArgs { reservation_id: &hold.reservation_id, amount, usage, ..Default::default() })
            .unwrap();
        e.wait_durable(outcome.ticket, WAIT).unwrap();
    };
    commit("alice", Some(token_usage("gpt", (1_000, 30), (200, 70))), 100, "chat");
    f.clock.advance_ms(DAY_MS);
    commit("alice", Some(token_usage("claude", (10, 1), (10, 2))), 3, "search");
    commit("alice", None, 50, "chat");
    let alice = f.engine().usage("alice", None).unwrap().record;
    assert_eq!((alice.units, alice.commits), (153, 3));
    let day = nov_10() / DAY_MS;
    assert_eq!(alice.days, [(day, 100), (day + 1, 53)].into());
    assert_eq!(alice.models["gpt"]["input"].tokens, 1_000);
    assert_eq!(alice.models["claude"]["output"].units, 2);
    assert_eq!(alice.dimensions["feature"], [("chat".to_string(), 150), ("search".to_string(), 3)].into());
    let org = f.engine().usage("org", None).unwrap().record;
    assert_eq!((org.units, org.dimensions["member"]["alice"]), (153, 153), "seats show in the org's usage");
    let bad = token_usage("gpt", (1, 1), (1, 1));
    let hold = f.reserve("alice", 10);
    let err = f.engine().commit_with(CommitArgs {
        reservation_id: &hold.reservation_id,
        amount: 3,
        usage: Some(bad),
        ..Default::default()
    });
    assert_eq!(err.unwrap_err().kind, spendgate::ErrorKind::InvalidArgument, "parts must add up to the amount");
    f.reopen();
    assert_eq!(f.engine().usage("alice", None).unwrap().record.units, 153);
}

#[test]
fn an_estimate_retry_is_matched_by_its_fingerprint_not_its_price() {
    let f = Fixture::new();
    f.budget("cus", 1_000);
    let first = ReserveArgs {
        customer_id: "cus",
        amount: 100,
        idempotency_key: "k",
        fingerprint: "gpt|1000|500",
        ..Default::default()
    };
    let granted = f.engine().reserve_with(&first).unwrap();
    let repriced = ReserveArgs { amount: 120, ..first.clone() };
    let replay = f.engine().reserve_with(&repriced).unwrap();
    assert!(replay.replayed && replay.reservation_id == granted.reservation_id && replay.amount == 100);
    let other = ReserveArgs { fingerprint: "gpt|2000|500", ..first };
    assert_eq!(f.engine().reserve_with(&other).unwrap_err().kind, spendgate::ErrorKind::AlreadyExists);
}

/// Commits race period roll-overs on an org and its members: every acknowledged unit lands in exactly one period, on
/// both levels, and each closed period's usage record equals its spend.
#[test]
fn commits_racing_roll_overs_count_in_exactly_one_period_on_both_levels() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut f = Fixture::new();
    f.relaxed();
    let period = PeriodRule::Fixed { anchor_ms: nov_10(), length_ms: 1_000 };
    f.set("org", BudgetUpdate { limit: Some(50_000), period: Some(period), ..Default::default() });
    let members = ["m0", "m1", "m2"];
    for m in members {
        f.set(
            m,
            BudgetUpdate {
                limit: Some(20_000),
                parent: Some("org".into()),
                period: Some(period),
                ..Default::default()
            },
        );
    }
    let done = AtomicBool::new(false);
    let (engine, clock) = (f.engine(), f.clock.clone());
    let acked: Vec<[i64; 3]> = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                clock.advance_ms(97);
                engine.roll_due();
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        let workers: Vec<_> = (0..6u64)
            .map(|t| {
                scope.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                    let mut spent = [0i64; 3];
                    for _ in 0..400 {
                        let m = rng.random_range(0..3);
                        let hold = engine.reserve(members[m], rng.random_range(1..=50), "", 60_000).unwrap();
                        if !hold.granted {
                            continue;
                        }
                        let actual = rng.random_range(0..=hold.amount + 10);
                        let outcome = engine.commit(&hold.reservation_id, actual).unwrap();
                        engine.wait_durable(outcome.ticket, WAIT).unwrap();
                        spent[m] += actual;
                    }
                    spent
                })
            })
            .collect();
        let acked = workers.into_iter().map(|w| w.join().unwrap()).collect();
        done.store(true, Ordering::SeqCst);
        acked
    });
    f.settle();
    let total = |m: usize| acked.iter().map(|spent| spent[m]).sum::<i64>();
    let books = |e: &Engine, customer: &str| {
        let closed = e.closed_periods(customer, 1_000).unwrap();
        for p in &closed {
            let usage = e.usage(customer, Some(p.start_ms)).unwrap();
            assert_eq!((usage.period_start_ms, usage.record.units), (p.start_ms, p.spent), "{customer} {p:?}");
        }
        let current = e.balance(customer).unwrap();
        assert_eq!(e.usage(customer, None).unwrap().record.units, current.spent, "{customer}");
        (closed.len(), closed.iter().map(|p| p.spent).sum::<i64>() + current.spent)
    };
    let mut org_total = 0;
    for (m, member) in members.iter().enumerate() {
        let (periods, spent) = books(f.engine(), member);
        assert!(periods > 3, "the race needs roll-overs: {periods}");
        assert_eq!(spent, total(m), "{member}");
        org_total += spent;
    }
    assert_eq!(books(f.engine(), "org").1, org_total);
    f.engine().check_invariants().unwrap();
    let before: Vec<_> = members.iter().chain(&["org"]).map(|c| f.engine().balance(c).unwrap()).collect();
    f.reopen();
    let after: Vec<_> = members.iter().chain(&["org"]).map(|c| f.engine().balance(c).unwrap()).collect();
    assert_eq!(before, after);
}

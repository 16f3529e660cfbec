//! One budget's counters. Admission is a compare-and-swap on `available`; no lock on the hot path.
//!
//! Identity kept at every instant by the update order below: `available == limit - spent - held`, where each field
//! is read after the others' updates in this order:
//! - taking capacity: `available` first, then `held`/`spent`;
//! - freeing capacity: `held`/`spent` first, then `available`.
//!
//! So a reader that loads `spent` then `held` never sees `spent + held` above `limit + overdraft` when it is not.
//! `available` goes below zero only through a commit larger than its hold (recorded in `overdraft`), a lowered limit,
//! or a grant past the limit in soft mode.
//!
//! `limit` here is the *effective* limit, the one admission counts against: the configured limit, capped at the
//! included quota while the block-overage kill switch is on. `spent` and `overdraft` are the current period's.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::breaker::UsageRing;
use crate::limits::MAX_BOOKED_UNITS;
use crate::period::PeriodRule;
use crate::records::{effective_limit, BudgetRecord, EnforcementMode};

/// `breaker_multiplier` when the budget has no multiplier of its own.
const NO_OVERRIDE: u64 = u64::MAX;

pub struct Budget {
    pub customer_id: Box<str>,
    limit: AtomicI64,
    spent: AtomicI64,
    held: AtomicI64,
    available: AtomicI64,
    overdraft: AtomicI64,
    active_holds: AtomicI64,
    frozen: AtomicBool,
    soft_mode: AtomicBool,
    block_overage: AtomicBool,
    configured_limit: AtomicI64,
    /// The customer's stop-at (0: none): while set, admission is hard at the effective limit in either mode.
    stop_at: AtomicI64,
    soft_limit: AtomicI64,
    /// This budget's breaker multiplier; NO_OVERRIDE: the server's.
    breaker_multiplier: AtomicU64,
    soft_alerted: AtomicBool,
    limit_alerted: AtomicBool,
    period_start_ms: AtomicI64,
    period_end_ms: AtomicI64,
    /// This period the limit was cut below what was already spent and held (so spent + held > limit is no breach).
    limit_cut: AtomicBool,
    /// The org budget this one belongs to. Set once: each hold records the parent it was reserved under.
    pub parent: OnceLock<Arc<Budget>>,
    /// Budgets whose parent this is (an org cannot itself join an org).
    pub members: AtomicU64,
    /// Commits hold it shared and a period roll-over exclusively, so that every commit counts in exactly the period
    /// its ticket orders it into (the writer attributes it the same way). Reserve never takes it.
    pub period_gate: RwLock<()>,
    /// Serializes the admin calls on this budget (never on the Reserve path) and holds what they change.
    pub admin: Mutex<BudgetAdmin>,
    /// Recent usage, for the circuit breaker (touched by commits only).
    pub ring: Mutex<UsageRing>,
}

/// The budget's settings that only admin calls change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetAdmin {
    pub stripe_customer_id: String,
    pub limit: i64,
    pub included: i64,
    pub soft_limit: i64,
    pub mode: EnforcementMode,
    pub block_overage: bool,
    pub period: PeriodRule,
    pub frozen_reason: String,
    pub breaker_multiplier: Option<u64>,
    /// The customer's own stop-at (0: none); see BudgetRecord::stop_at.
    pub stop_at: i64,
    pub created_ms: i64,
    /// Granted credits still unused (Admin.GrantCredits): on top of `limit`, drawn after it.
    pub credits: i64,
}

impl BudgetAdmin {
    /// The limit with the credits: what Balance shows as the limit.
    pub fn limit_with_credits(&self) -> i64 {
        self.limit + self.credits
    }

    pub fn effective_limit(&self) -> i64 {
        effective_limit(self.limit_with_credits(), self.block_overage, self.included, self.stop_at)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    pub limit: i64,
    pub spent: i64,
    pub held: i64,
    pub available: i64,
    pub overdraft: i64,
    pub active_holds: i64,
}

/// Why admission failed on one budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Insufficient,
    OverageBlocked,
}

impl Budget {
    pub fn from_record(customer_id: &str, record: &BudgetRecord, active_holds: i64) -> Budget {
        let limit = record.effective_limit();
        let available = limit - record.spent - record.held;
        Budget {
            customer_id: customer_id.into(),
            limit: AtomicI64::new(limit),
            spent: AtomicI64::new(record.spent),
            held: AtomicI64::new(record.held),
            available: AtomicI64::new(available),
            overdraft: AtomicI64::new(record.overdraft),
            active_holds: AtomicI64::new(active_holds),
            frozen: AtomicBool::new(record.frozen),
            soft_mode: AtomicBool::new(record.mode == EnforcementMode::Soft),
            block_overage: AtomicBool::new(record.block_overage),
            configured_limit: AtomicI64::new(record.limit + record.credits),
            stop_at: AtomicI64::new(record.stop_at),
            soft_limit: AtomicI64::new(record.soft_limit),
            breaker_multiplier: AtomicU64::new(record.breaker_multiplier.unwrap_or(NO_OVERRIDE)),
            soft_alerted: AtomicBool::new(record.soft_alerted),
            limit_alerted: AtomicBool::new(record.limit_alerted),
            period_start_ms: AtomicI64::new(record.period_start_ms),
            period_end_ms: AtomicI64::new(record.period_end_ms),
            limit_cut: AtomicBool::new(available < 0),
            parent: OnceLock::new(),
            members: AtomicU64::new(0),
            period_gate: RwLock::new(()),
            admin: Mutex::new(BudgetAdmin {
                stripe_customer_id: record.stripe_customer_id.clone(),
                limit: record.limit,
                included: record.included,
                soft_limit: record.soft_limit,
                mode: record.mode,
                block_overage: record.block_overage,
                period: record.period,
                frozen_reason: record.frozen_reason.clone(),
                breaker_multiplier: record.breaker_multiplier,
                stop_at: record.stop_at,
                created_ms: record.created_ms,
                credits: record.credits,
            }),
            ring: Mutex::new(record.ring.clone()),
        }
    }

    pub fn counters(&self) -> Counters {
        // Order matters for the racy reader guarantee in the module doc: spent before held.
        let spent = self.spent.load(SeqCst);
        let held = self.held.load(SeqCst);
        Counters {
            limit: self.limit.load(SeqCst),
            spent,
            held,
            available: self.available.load(SeqCst),
            overdraft: self.overdraft.load(SeqCst),
            active_holds: self.active_holds.load(SeqCst),
        }
    }

    /// What Reserve reports as remaining: never below zero.
    pub fn remaining(&self) -> i64 {
        self.available.load(SeqCst).max(0)
    }

    /// Take `amount` from `available` if it fits whole. The admission decision.
    pub fn try_take(&self, amount: i64) -> bool {
        debug_assert!(amount > 0);
        self.available
            .fetch_update(SeqCst, SeqCst, |available| (available >= amount).then(|| available - amount))
            .is_ok()
    }

    /// Admission under this budget's policy: Ok(false) taken within the limit, Ok(true) taken past it (soft mode),
    /// Err when refused. The kill switch and the customer's stop-at refuse in either mode: soft mode is the
    /// operator's promise not to break a conversation, a stop-at is the customer's explicit wish that it does. One
    /// compare-and-swap on `available`, decided by `judge`, the same rule a Quote applies without taking anything.
    pub fn admit(&self, amount: i64) -> Result<bool, Refusal> {
        debug_assert!(amount > 0);
        let mut verdict = Err(Refusal::Insufficient);
        let _ = self.available.fetch_update(SeqCst, SeqCst, |available| {
            verdict = self.judge(available, amount);
            verdict.is_ok().then(|| available - amount)
        });
        verdict
    }

    /// What `admit` would answer now, taking nothing: the dry run of a Quote.
    pub fn would_admit(&self, amount: i64) -> Result<bool, Refusal> {
        self.judge(self.available.load(SeqCst), amount)
    }

    /// The admission rule, for a budget with `available` units left.
    fn judge(&self, available: i64, amount: i64) -> Result<bool, Refusal> {
        if available >= amount {
            return Ok(false);
        }
        let blocking = self.block_overage.load(SeqCst);
        let stop_at = self.stop_at.load(SeqCst);
        let soft = self.soft_mode.load(SeqCst) && stop_at == 0;
        if soft && !blocking {
            return Ok(true);
        }
        if !blocking {
            return Err(Refusal::Insufficient);
        }
        // Blocked: would the amount have fitted under the configured limit (and the stop-at), without the kill switch?
        let configured = self.configured_limit.load(SeqCst);
        let ceiling = if stop_at > 0 { configured.min(stop_at) } else { configured };
        let headroom = ceiling - self.limit.load(SeqCst) + available;
        if soft || headroom >= amount {
            Err(Refusal::OverageBlocked)
        } else {
            Err(Refusal::Insufficient)
        }
    }

    /// Undo an `admit` whose op could not be enqueued (or whose other level refused). Nothing was persisted.
    pub fn untake(&self, amount: i64) {
        self.available.fetch_add(amount, SeqCst);
    }

    /// After `admit`: the hold now counts in `held`.
    pub fn add_hold(&self, amount: i64) {
        self.held.fetch_add(amount, SeqCst);
    }

    /// Count one more open hold if fewer than `max` are open.
    pub fn try_open_hold(&self, max: i64) -> bool {
        self.active_holds.fetch_update(SeqCst, SeqCst, |open| (open < max).then_some(open + 1)).is_ok()
    }

    /// Whether `try_open_hold(max)` would succeed now (a Quote's dry run).
    pub fn has_hold_room(&self, max: i64) -> bool {
        self.active_holds.load(SeqCst) < max
    }

    /// Count one more open hold without a bound: an org counts its members' holds, bounded per member.
    pub fn open_hold(&self) {
        self.active_holds.fetch_add(1, SeqCst);
    }

    pub fn close_hold(&self) {
        let before = self.active_holds.fetch_sub(1, SeqCst);
        assert!(before > 0, "closed more holds than were open on {}", self.customer_id);
    }

    /// Void a hold of `amount`: frees capacity (call after the op has its ticket).
    pub fn free_hold(&self, amount: i64) {
        let before = self.held.fetch_sub(amount, SeqCst);
        assert!(before >= amount, "held went negative on {}", self.customer_id);
        self.available.fetch_add(amount, SeqCst);
    }

    /// Post `amount` against a hold of `held_amount` (0 when the hold had already expired).
    /// Returns the excess: how far this commit pushed spent + held past the limit.
    /// When `amount <= held_amount` this frees capacity: call it after the op has its ticket. Otherwise it takes
    /// capacity: call it before the op takes its ticket.
    pub fn post(&self, held_amount: i64, amount: i64) -> i64 {
        debug_assert!(held_amount >= 0 && amount >= 0);
        if amount <= held_amount {
            let before = self.held.fetch_sub(held_amount, SeqCst);
            assert!(before >= held_amount, "held went negative on {}", self.customer_id);
            self.spent.fetch_add(amount, SeqCst);
            self.available.fetch_add(held_amount - amount, SeqCst);
            return 0;
        }
        let extra = amount - held_amount;
        let before = self.available.fetch_sub(extra, SeqCst);
        let excess = (-(before - extra)).max(0) - (-before).max(0);
        assert!((0..=extra).contains(&excess));
        self.overdraft.fetch_add(excess, SeqCst);
        let held_before = self.held.fetch_sub(held_amount, SeqCst);
        assert!(held_before >= held_amount, "held went negative on {}", self.customer_id);
        self.spent.fetch_add(amount, SeqCst);
        excess
    }

    /// Change the effective limit. Raising frees capacity (call after the op has its ticket); lowering takes it
    /// (before).
    pub fn shift_limit(&self, new_limit: i64) {
        let old_limit = self.limit.swap(new_limit, SeqCst);
        let before = self.available.fetch_add(new_limit - old_limit, SeqCst);
        if new_limit < old_limit && before + new_limit - old_limit < 0 {
            self.limit_cut.store(true, SeqCst);
        }
    }

    pub fn limit_was_cut(&self) -> bool {
        self.limit_cut.load(SeqCst)
    }

    /// Publish the admin settings that the hot paths read from atomics. Call with the admin lock held.
    pub fn publish_policy(&self, admin: &BudgetAdmin) {
        self.configured_limit.store(admin.limit_with_credits(), SeqCst);
        self.stop_at.store(admin.stop_at, SeqCst);
        self.block_overage.store(admin.block_overage, SeqCst);
        self.soft_mode.store(admin.mode == EnforcementMode::Soft, SeqCst);
        self.soft_limit.store(admin.soft_limit, SeqCst);
        self.breaker_multiplier.store(admin.breaker_multiplier.unwrap_or(NO_OVERRIDE), SeqCst);
    }

    /// The breaker multiplier for this budget: its own, or `server_default`.
    pub fn breaker_multiplier(&self, server_default: u64) -> u64 {
        match self.breaker_multiplier.load(SeqCst) {
            NO_OVERRIDE => server_default,
            own => own,
        }
    }

    /// Start a new period: spent and overdraft start again from zero, holds carry over, and the effective limit
    /// becomes `new_limit` (lower by the credits the closed period used up, which are at most what it spent). Frees
    /// capacity (call after the op has its ticket), with the period gate held exclusively. Returns (spent,
    /// overdraft) of the closed period.
    pub fn start_period(&self, start_ms: i64, end_ms: i64, new_limit: i64) -> (i64, i64) {
        let spent = self.spent.swap(0, SeqCst);
        let overdraft = self.overdraft.swap(0, SeqCst);
        let old_limit = self.limit.swap(new_limit, SeqCst);
        let limit_drop = old_limit - new_limit;
        assert!((0..=spent).contains(&limit_drop), "a roll-over took capacity on {}", self.customer_id);
        self.available.fetch_add(spent - limit_drop, SeqCst);
        self.limit_cut.store(false, SeqCst);
        self.period_start_ms.store(start_ms, SeqCst);
        self.period_end_ms.store(end_ms, SeqCst);
        self.soft_alerted.store(false, SeqCst);
        self.limit_alerted.store(false, SeqCst);
        (spent, overdraft)
    }

    pub fn set_period_end(&self, end_ms: i64) {
        self.period_end_ms.store(end_ms, SeqCst);
    }

    pub fn period(&self) -> (i64, i64) {
        (self.period_start_ms.load(SeqCst), self.period_end_ms.load(SeqCst))
    }

    /// True the first time this period that spent reached the soft limit (one alert per crossing).
    pub fn soft_limit_crossed(&self) -> bool {
        let soft_limit = self.soft_limit.load(SeqCst);
        soft_limit > 0 && self.spent.load(SeqCst) >= soft_limit && !self.soft_alerted.swap(true, SeqCst)
    }

    /// Re-arm the soft-limit alert when the threshold moved above what is spent. Admin lock held.
    pub fn rearm_soft_limit(&self) {
        let soft_limit = self.soft_limit.load(SeqCst);
        if soft_limit == 0 || self.spent.load(SeqCst) < soft_limit {
            self.soft_alerted.store(false, SeqCst);
        }
    }

    /// True the first time this period that the limit stopped a Reserve (or was passed in soft mode).
    pub fn limit_reached(&self) -> bool {
        !self.limit_alerted.swap(true, SeqCst)
    }

    /// Re-arm the limit alert (the limit was raised). Admin lock held.
    pub fn rearm_limit(&self) {
        self.limit_alerted.store(false, SeqCst);
    }

    pub fn soft_limit(&self) -> i64 {
        self.soft_limit.load(SeqCst)
    }

    pub fn soft_alerted(&self) -> bool {
        self.soft_alerted.load(SeqCst)
    }

    pub fn limit_alerted(&self) -> bool {
        self.limit_alerted.load(SeqCst)
    }

    pub fn frozen(&self) -> bool {
        self.frozen.load(SeqCst)
    }

    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, SeqCst);
    }

    pub fn soft_mode(&self) -> bool {
        self.soft_mode.load(SeqCst)
    }

    pub fn limit(&self) -> i64 {
        self.limit.load(SeqCst)
    }

    pub fn spent(&self) -> i64 {
        self.spent.load(SeqCst)
    }

    /// Why booking `amount` more (spent when `held` is false, held when true) would pass MAX_BOOKED_UNITS, or None.
    pub fn booking_refused(&self, amount: i64, held: bool) -> Option<String> {
        let (what, now) = if held { ("held", self.held.load(SeqCst)) } else { ("spent", self.spent.load(SeqCst)) };
        (now > MAX_BOOKED_UNITS - amount).then(|| {
            format!(
                "{amount} more units would take budget {:?}'s {what} ({now}) past {MAX_BOOKED_UNITS}, the most one \
                 budget may book in a period: nothing was changed; no real usage comes near this, so check the \
                 amounts this app sends",
                self.customer_id
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::period::NEVER_MS;

    pub fn record(limit: i64) -> BudgetRecord {
        BudgetRecord::new(limit, "cus".into(), 0, PeriodRule::Lifetime, 0, NEVER_MS)
    }

    fn budget(limit: i64) -> Budget {
        Budget::from_record("c", &record(limit), 0)
    }

    fn assert_identity(b: &Budget) {
        let c = b.counters();
        assert_eq!(c.available, c.limit - c.spent - c.held, "{c:?}");
    }

    #[test]
    fn a_take_fits_whole_or_not_at_all() {
        let b = budget(10);
        assert!(b.try_take(7));
        b.add_hold(7);
        assert!(!b.try_take(4));
        assert!(b.try_take(3));
        b.add_hold(3);
        assert_eq!(b.remaining(), 0);
        assert_identity(&b);
    }

    #[test]
    fn commit_under_the_hold_frees_the_rest() {
        let b = budget(10);
        assert!(b.try_take(8));
        b.add_hold(8);
        assert_eq!(b.post(8, 5), 0);
        let c = b.counters();
        assert_eq!((c.spent, c.held, c.available, c.overdraft), (5, 0, 5, 0));
    }

    #[test]
    fn commit_over_the_hold_takes_what_fits_and_records_the_rest_as_overdraft() {
        let b = budget(10);
        assert!(b.try_take(6));
        b.add_hold(6);
        // 4 more fit, 3 do not.
        assert_eq!(b.post(6, 13), 3);
        let c = b.counters();
        assert_eq!((c.spent, c.held, c.available, c.overdraft), (13, 0, -3, 3));
        assert_eq!(b.remaining(), 0);
        assert!(!b.try_take(1));
        assert_identity(&b);
        // A raise absorbs the deficit first.
        b.shift_limit(20);
        assert_eq!(b.remaining(), 7);
        assert_identity(&b);
    }

    #[test]
    fn soft_mode_grants_past_the_limit_and_says_so() {
        let mut r = record(10);
        r.mode = EnforcementMode::Soft;
        let b = Budget::from_record("c", &r, 0);
        assert_eq!(b.admit(8), Ok(false));
        b.add_hold(8);
        assert_eq!(b.admit(8), Ok(true));
        b.add_hold(8);
        assert_eq!(b.counters().available, -6);
        assert_identity(&b);
    }

    #[test]
    fn the_kill_switch_refuses_overage_in_either_mode() {
        for mode in [EnforcementMode::Hard, EnforcementMode::Soft] {
            let mut r = record(100);
            r.included = 30;
            r.block_overage = true;
            r.mode = mode;
            let b = Budget::from_record("c", &r, 0);
            assert_eq!(b.counters().limit, 30);
            assert_eq!(b.admit(30), Ok(false));
            b.add_hold(30);
            assert_eq!(b.admit(1), Err(Refusal::OverageBlocked), "{mode:?}");
            if mode == EnforcementMode::Hard {
                // 71 would not fit under the limit of 100 either: that is plain insufficiency.
                assert_eq!(b.admit(71), Err(Refusal::Insufficient));
            }
        }
    }

    #[test]
    fn a_stop_at_lowers_admission_in_either_mode_and_never_raises_it() {
        for mode in [EnforcementMode::Hard, EnforcementMode::Soft] {
            let mut r = record(100);
            r.stop_at = 40;
            r.mode = mode;
            let b = Budget::from_record("c", &r, 0);
            assert_eq!(b.counters().limit, 40);
            assert_eq!(b.admit(40), Ok(false));
            b.add_hold(40);
            assert_eq!(b.admit(1), Err(Refusal::Insufficient), "{mode:?}");
            assert_identity(&b);
        }
        let mut r = record(100);
        r.stop_at = 500; // above the operator's limit: no effect
        assert_eq!(Budget::from_record("c", &r, 0).counters().limit, 100);
        r.stop_at = 0;
        assert_eq!(Budget::from_record("c", &r, 0).counters().limit, 100);
    }

    #[test]
    fn a_stop_at_under_the_kill_switch_reports_which_refused() {
        let mut r = record(100);
        r.included = 50;
        r.block_overage = true;
        r.stop_at = 60;
        let b = Budget::from_record("c", &r, 0);
        assert_eq!(b.counters().limit, 50);
        assert_eq!(b.admit(50), Ok(false));
        b.add_hold(50);
        assert_eq!(b.admit(10), Err(Refusal::OverageBlocked)); // fits the stop-at of 60, not the quota
        assert_eq!(b.admit(11), Err(Refusal::Insufficient)); // past the stop-at too
    }

    #[test]
    fn a_new_period_frees_what_was_spent_and_keeps_the_holds() {
        let b = budget(10);
        assert!(b.try_take(4));
        b.add_hold(4);
        assert!(b.try_take(5));
        b.add_hold(5);
        b.post(5, 5);
        assert_eq!(b.start_period(100, 200, 10), (5, 0));
        let c = b.counters();
        assert_eq!((c.spent, c.held, c.available), (0, 4, 6));
        assert_eq!(b.period(), (100, 200));
        assert_identity(&b);
    }
}

//! One budget's counters. Admission is a compare-and-swap on `available`; no lock on the hot path.
//!
//! Identity kept at every instant by the update order below: `available == limit - spent - held`, where each field
//! is read after the others' updates in this order:
//! - taking capacity: `available` first, then `held`/`spent`;
//! - freeing capacity: `held`/`spent` first, then `available`.
//! So a reader that loads `spent` then `held` never sees `spent + held` above `limit + overdraft` when it is not.
//! `available` goes below zero only through a commit larger than its hold (recorded in `overdraft`) or a lowered limit.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::SeqCst};
use std::sync::Mutex;

use crate::records::BudgetRecord;

pub struct Budget {
    pub customer_id: Box<str>,
    limit: AtomicI64,
    spent: AtomicI64,
    held: AtomicI64,
    available: AtomicI64,
    overdraft: AtomicI64,
    active_holds: AtomicI64,
    frozen: AtomicBool,
    /// Serializes SetBudget on this budget (an admin call, never on the Reserve path) and guards the Stripe id.
    pub admin: Mutex<BudgetAdmin>,
}

pub struct BudgetAdmin {
    pub stripe_customer_id: String,
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

impl Budget {
    pub fn from_record(customer_id: &str, record: &BudgetRecord, active_holds: i64) -> Budget {
        let available = record.limit - record.spent - record.held;
        Budget {
            customer_id: customer_id.into(),
            limit: AtomicI64::new(record.limit),
            spent: AtomicI64::new(record.spent),
            held: AtomicI64::new(record.held),
            available: AtomicI64::new(available),
            overdraft: AtomicI64::new(record.overdraft),
            active_holds: AtomicI64::new(active_holds),
            frozen: AtomicBool::new(record.frozen),
            admin: Mutex::new(BudgetAdmin { stripe_customer_id: record.stripe_customer_id.clone() }),
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

    /// Undo a `try_take` whose op could not be enqueued. Nothing was persisted, so nothing else changes.
    pub fn untake(&self, amount: i64) {
        self.available.fetch_add(amount, SeqCst);
    }

    /// After `try_take`: the hold now counts in `held`.
    pub fn add_hold(&self, amount: i64) {
        self.held.fetch_add(amount, SeqCst);
    }

    /// Count one more open hold if fewer than `max` are open.
    pub fn try_open_hold(&self, max: i64) -> bool {
        self.active_holds.fetch_update(SeqCst, SeqCst, |open| (open < max).then_some(open + 1)).is_ok()
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

    /// Change the limit. Raising frees capacity (call after the op has its ticket); lowering takes it (before).
    pub fn shift_limit(&self, new_limit: i64) {
        let old_limit = self.limit.swap(new_limit, SeqCst);
        self.available.fetch_add(new_limit - old_limit, SeqCst);
    }

    pub fn frozen(&self) -> bool {
        self.frozen.load(SeqCst)
    }

    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, SeqCst);
    }

    pub fn limit(&self) -> i64 {
        self.limit.load(SeqCst)
    }

    pub fn spent(&self) -> i64 {
        self.spent.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: i64) -> Budget {
        let record = BudgetRecord {
            limit,
            spent: 0,
            held: 0,
            overdraft: 0,
            stripe_customer_id: "cus".into(),
            created_ms: 0,
            updated_ms: 0,
            frozen: false,
        };
        Budget::from_record("c", &record, 0)
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
}

//! Budget settings and everything that changes a budget outside the hot paths: creating and updating budgets (limits,
//! included quota, soft limit, enforcement mode, the block-overage kill switch, the org a budget belongs to, its
//! period), freezing, rolling periods over, and the circuit breaker.
//!
//! Every change here runs under the budget's admin lock, so admin calls on one budget are serialized; the Reserve
//! path never takes it.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;

use super::{validate_amount, validate_id, SetBudgetOutcome, Shared};
use crate::alerts::{AlertKind, PendingAlert};
use crate::breaker::{MAX_BREAKER_MULTIPLIER, MIN_BREAKER_MULTIPLIER};
use crate::budget::{Budget, BudgetAdmin};
use crate::error::EngineError;
use crate::hold::truncate_for_message;
use crate::limits::MAX_AMOUNT_UNITS;
use crate::period::PeriodRule;
use crate::records::{carried_credits, BudgetRecord, EnforcementMode};
use crate::writer::{Op, PolicyState};

/// A change to a budget: None leaves a setting as it is (or, when creating, at its default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetUpdate {
    /// Required to create a budget.
    pub limit: Option<i64>,
    /// Default on creation: the org's Stripe customer for a member, else the customer id.
    pub stripe_customer_id: Option<String>,
    pub included: Option<i64>,
    /// 0 removes the soft limit.
    pub soft_limit: Option<i64>,
    pub mode: Option<EnforcementMode>,
    pub block_overage: Option<bool>,
    /// The org budget to belong to. Set once: a budget cannot leave or change its org.
    pub parent: Option<String>,
    /// A new rule; a period that starts later than the current one starts now (what was spent stays with the old).
    pub period: Option<PeriodRule>,
    /// Some(None): back to the server's multiplier; Some(Some(0)): off for this budget.
    pub breaker_multiplier: Option<Option<u64>>,
    /// The customer's own stop-at; 0 removes it. It can only lower what Reserve admits (see BudgetRecord::stop_at).
    pub stop_at: Option<i64>,
}

impl BudgetUpdate {
    fn validate(&self) -> Result<(), EngineError> {
        if let Some(limit) = self.limit {
            validate_amount("limit", limit, 0)?;
        }
        if let Some(included) = self.included {
            validate_amount("included", included, 0)?;
        }
        if let Some(soft_limit) = self.soft_limit {
            validate_amount("soft_limit", soft_limit, 0)?;
        }
        if let Some(stop_at) = self.stop_at {
            validate_amount("stop_at", stop_at, 0)?;
        }
        if let Some(stripe) = &self.stripe_customer_id {
            validate_id("stripe_customer_id", stripe)?;
        }
        if let Some(parent) = &self.parent {
            validate_id("parent_id", parent)?;
        }
        if let Some(rule) = &self.period {
            rule.validate()?;
        }
        if let Some(Some(multiplier)) = self.breaker_multiplier {
            if multiplier != 0 && !(MIN_BREAKER_MULTIPLIER..=MAX_BREAKER_MULTIPLIER).contains(&multiplier) {
                return Err(EngineError::invalid(format!(
                    "breaker_multiplier is {multiplier}; use 0 (off for this budget) or \
                     {MIN_BREAKER_MULTIPLIER}..={MAX_BREAKER_MULTIPLIER}"
                )));
            }
        }
        Ok(())
    }

    fn apply_to(&self, admin: &mut BudgetAdmin) {
        if let Some(limit) = self.limit {
            admin.limit = limit;
        }
        if let Some(stripe) = &self.stripe_customer_id {
            admin.stripe_customer_id = stripe.clone();
        }
        if let Some(included) = self.included {
            admin.included = included;
        }
        if let Some(soft_limit) = self.soft_limit {
            admin.soft_limit = soft_limit;
        }
        if let Some(mode) = self.mode {
            admin.mode = mode;
        }
        if let Some(block_overage) = self.block_overage {
            admin.block_overage = block_overage;
        }
        if let Some(period) = self.period {
            admin.period = period;
        }
        if let Some(multiplier) = self.breaker_multiplier {
            admin.breaker_multiplier = multiplier;
        }
        if let Some(stop_at) = self.stop_at {
            admin.stop_at = stop_at;
        }
    }
}

impl Shared {
    pub(super) fn update_budget(
        &self,
        customer_id: &str,
        update: &BudgetUpdate,
    ) -> Result<SetBudgetOutcome, EngineError> {
        self.check_open()?;
        validate_id("customer_id", customer_id)?;
        update.validate()?;
        if update.parent.as_deref() == Some(customer_id) {
            return Err(EngineError::invalid(format!(
                "budget {:?} cannot be its own org; pass the org's customer_id as parent_id",
                truncate_for_message(customer_id)
            )));
        }
        // Linking a member to an org is serialized, so that two calls cannot make a chain (a -> b -> c).
        let _hierarchy = update.parent.as_ref().map(|_| self.hierarchy.lock().expect("hierarchy lock"));
        loop {
            if let Ok(budget) = self.budget(customer_id) {
                return self.change_budget(&budget, update);
            }
            if let Some(outcome) = self.create_budget(customer_id, update)? {
                return Ok(outcome);
            }
            // Lost a race with another creator: update the budget it made.
        }
    }

    /// The org a budget may join: it exists and is not itself a member of one.
    fn org_for(&self, parent_id: &str) -> Result<Arc<Budget>, EngineError> {
        let parent = self.budget(parent_id).map_err(|_| {
            EngineError::not_found(format!(
                "no org budget {:?}; create it with Admin.SetBudget first",
                truncate_for_message(parent_id)
            ))
        })?;
        if let Some(grandparent) = parent.parent.get() {
            return Err(EngineError::precondition(format!(
                "budget {:?} is itself a member of {:?}; an org cannot be a member (budgets nest one level deep)",
                parent.customer_id, grandparent.customer_id
            )));
        }
        Ok(parent)
    }

    fn create_budget(&self, customer_id: &str, update: &BudgetUpdate) -> Result<Option<SetBudgetOutcome>, EngineError> {
        let limit = update.limit.ok_or_else(|| {
            EngineError::invalid(format!(
                "budget {:?} does not exist yet: pass a limit to create it",
                truncate_for_message(customer_id)
            ))
        })?;
        self.check_map_room(crate::capacity::BUDGET_WORST_CASE_BYTES)?;
        let parent = update.parent.as_deref().map(|id| self.org_for(id)).transpose()?;
        let Entry::Vacant(entry) = self.budgets.entry(customer_id.into()) else { return Ok(None) };
        if self.budget_count.load(SeqCst) >= self.config.max_budgets {
            return Err(EngineError::exhausted(format!(
                "there are already {} budgets (max_budgets); raise max_budgets or remove unused budgets",
                self.config.max_budgets
            )));
        }
        self.acquire_queue_slot()?;
        let now_ms = self.clock.now_ms();
        let period = update.period.unwrap_or(self.config.default_period);
        let (period_start_ms, period_end_ms) = period.containing(now_ms);
        let stripe_customer_id = match (&update.stripe_customer_id, &parent) {
            (Some(stripe), _) => stripe.clone(),
            (None, Some(parent)) => parent.admin.lock().expect("budget admin lock").stripe_customer_id.clone(),
            (None, None) => customer_id.to_string(),
        };
        let mut record = BudgetRecord::new(limit, stripe_customer_id, now_ms, period, period_start_ms, period_end_ms);
        record.included = update.included.unwrap_or(0);
        record.soft_limit = update.soft_limit.unwrap_or(0);
        record.mode = update.mode.unwrap_or_default();
        record.block_overage = update.block_overage.unwrap_or(false);
        record.parent = parent.as_ref().map(|p| p.customer_id.to_string());
        record.breaker_multiplier = update.breaker_multiplier.flatten();
        record.stop_at = update.stop_at.unwrap_or(0);
        let budget = Arc::new(Budget::from_record(customer_id, &record, 0));
        if let Some(parent) = &parent {
            parent.members.fetch_add(1, SeqCst);
            assert!(budget.parent.set(parent.clone()).is_ok(), "a new budget has no org yet");
        }
        let admin = budget.admin.lock().expect("budget admin lock").clone();
        // The ticket comes before the budget is visible, so every op on it is serialized after its creation.
        let ticket = self.take_ticket();
        self.send(
            ticket,
            Op::SetPolicy {
                customer_id: customer_id.to_string(),
                policy: policy_state(&budget, &admin, false, false),
                now_ms,
            },
        );
        entry.insert(budget.clone());
        self.budget_count.fetch_add(1, SeqCst);
        self.next_roll_ms.fetch_min(period_end_ms, SeqCst);
        Ok(Some(SetBudgetOutcome { balance: budget.view(), created: true, rolled: false, ticket }))
    }

    fn change_budget(&self, budget: &Arc<Budget>, update: &BudgetUpdate) -> Result<SetBudgetOutcome, EngineError> {
        let mut admin = budget.admin.lock().expect("budget admin lock");
        self.check_parent_change(budget, update)?;
        let mut next = admin.clone();
        update.apply_to(&mut next);
        if next.limit_with_credits() > MAX_AMOUNT_UNITS {
            return Err(EngineError::invalid(format!(
                "limit {} with the budget's {} unused credits would be {}, past {MAX_AMOUNT_UNITS} (MAX_AMOUNT_UNITS): \
                 nothing was changed; pass a lower limit",
                next.limit,
                next.credits,
                next.limit_with_credits()
            )));
        }
        let now_ms = self.clock.now_ms();
        let mut rolled = false;
        if let Some(rule) = update.period {
            let (start_ms, end_ms) = rule.containing(now_ms);
            if start_ms > budget.period().0 {
                self.start_period(budget, &mut admin, start_ms, end_ms, now_ms)?;
                next.credits = admin.credits; // the roll used some up
                rolled = true;
            } else {
                // It started no later than the current period: keep what is spent, take the new end.
                budget.set_period_end(end_ms);
                self.next_roll_ms.fetch_min(end_ms, SeqCst);
            }
        }
        self.acquire_queue_slot()?;
        if let Some(parent_id) = &update.parent {
            if budget.parent.get().is_none() {
                let parent = self.org_for(parent_id)?;
                parent.members.fetch_add(1, SeqCst);
                assert!(budget.parent.set(parent).is_ok(), "linked under the hierarchy lock");
            }
        }
        let (old_limit, new_limit) = (admin.effective_limit(), next.effective_limit());
        let rearm_limit = new_limit > old_limit;
        let rearm_soft = next.soft_limit != admin.soft_limit;
        let op = |budget: &Budget| Op::SetPolicy {
            customer_id: budget.customer_id.to_string(),
            policy: policy_state(budget, &next, rearm_soft, rearm_limit),
            now_ms,
        };
        // Raising frees capacity: ticket first, then publish. Lowering takes it: publish first.
        let ticket = if new_limit >= old_limit {
            let ticket = self.take_ticket();
            self.send(ticket, op(budget));
            budget.shift_limit(new_limit);
            ticket
        } else {
            budget.shift_limit(new_limit);
            let ticket = self.take_ticket();
            self.send(ticket, op(budget));
            ticket
        };
        budget.publish_policy(&next);
        if rearm_limit {
            budget.rearm_limit();
        }
        if rearm_soft {
            budget.rearm_soft_limit();
        }
        *admin = next;
        drop(admin);
        Ok(SetBudgetOutcome { balance: budget.view(), created: false, rolled, ticket })
    }

    fn check_parent_change(&self, budget: &Budget, update: &BudgetUpdate) -> Result<(), EngineError> {
        let Some(parent_id) = &update.parent else { return Ok(()) };
        match budget.parent.get() {
            Some(current) if current.customer_id.as_ref() == parent_id => Ok(()),
            Some(current) => Err(EngineError::precondition(format!(
                "budget {:?} belongs to org {:?}; a budget cannot change its org (its holds and history are counted \
                 there): create a new budget for the new org",
                budget.customer_id, current.customer_id
            ))),
            None if budget.members.load(SeqCst) > 0 => Err(EngineError::precondition(format!(
                "budget {:?} is an org with members; an org cannot become a member (budgets nest one level deep)",
                budget.customer_id
            ))),
            None => self.org_for(parent_id).map(drop),
        }
    }

    /// Close the budget's current period and start [start_ms, end_ms), carrying the unused credits over. The caller
    /// holds the budget's admin lock and passes what it guards.
    fn start_period(
        &self,
        budget: &Budget,
        admin: &mut BudgetAdmin,
        start_ms: i64,
        end_ms: i64,
        now_ms: i64,
    ) -> Result<(), EngineError> {
        assert!(start_ms > budget.period().0, "a new period starts after the current one");
        self.acquire_queue_slot()?;
        // Exclusive: no commit is between counting its amount and taking its ticket.
        let _gate = budget.period_gate.write().expect("period gate");
        let credits_after = carried_credits(admin.limit, admin.credits, budget.spent());
        // Frees capacity (what was spent, less the credits it used up): ticket first, then publish.
        let ticket = self.take_ticket();
        let customer_id = budget.customer_id.to_string();
        self.send(ticket, Op::Roll { customer_id, start_ms, end_ms, now_ms, credits_after });
        admin.credits = credits_after;
        budget.start_period(start_ms, end_ms, admin.effective_limit());
        budget.publish_policy(admin);
        self.periods_rolled_total.fetch_add(1, SeqCst);
        self.next_roll_ms.fetch_min(end_ms, SeqCst);
        Ok(())
    }

    /// Start the next period of every budget whose period has ended. Returns how many rolled over.
    pub(super) fn roll_due(&self) -> u64 {
        let now_ms = self.clock.now_ms();
        if now_ms < self.next_roll_ms.load(SeqCst) || self.check_open().is_err() {
            return 0;
        }
        // Reset first, then lower it again while scanning: a budget created or changed meanwhile lowers it too.
        self.next_roll_ms.store(i64::MAX, SeqCst);
        let budgets: Vec<Arc<Budget>> = self.budgets.iter().map(|entry| entry.value().clone()).collect();
        let mut rolled = 0;
        for budget in budgets {
            if budget.period().1 <= now_ms {
                let mut admin = budget.admin.lock().expect("budget admin lock");
                let (start_ms, end_ms) = admin.period.containing(now_ms);
                if budget.period().1 <= now_ms
                    && self.start_period(&budget, &mut admin, start_ms, end_ms, now_ms).is_ok()
                {
                    rolled += 1;
                }
            }
            self.next_roll_ms.fetch_min(budget.period().1, SeqCst);
        }
        rolled
    }

    /// Freeze or unfreeze `budget`, raising `alert` (frozen or unfrozen by default) when it changes anything.
    pub(super) fn freeze(&self, budget: &Budget, frozen: bool, reason: &str) -> Result<SetBudgetOutcome, EngineError> {
        let kind = if frozen { AlertKind::Frozen } else { AlertKind::Unfrozen };
        self.freeze_with(budget, frozen, reason, kind)
    }

    fn freeze_with(
        &self,
        budget: &Budget,
        frozen: bool,
        reason: &str,
        kind: AlertKind,
    ) -> Result<SetBudgetOutcome, EngineError> {
        let mut admin = budget.admin.lock().expect("budget admin lock");
        if budget.frozen() == frozen && (!frozen || admin.frozen_reason == reason) {
            drop(admin); // view() takes the admin lock
            return Ok(SetBudgetOutcome { balance: budget.view(), created: false, rolled: false, ticket: 0 });
        }
        let now_ms = self.clock.now_ms();
        let op = Op::Freeze { customer_id: budget.customer_id.to_string(), frozen, reason: reason.to_string(), now_ms };
        let ticket = self.submit(op)?;
        budget.set_frozen(frozen);
        admin.frozen_reason = if frozen { reason.to_string() } else { String::new() };
        if !frozen {
            budget.ring.lock().expect("usage ring lock").fine.clear(); // the spike that froze it is forgiven
        }
        drop(admin);
        let verb = if frozen { "frozen" } else { "unfrozen" };
        let message = format!("budget {:?} {verb}: {reason}", budget.customer_id);
        self.raise(PendingAlert::new(kind, &budget.customer_id, now_ms, message, &[]));
        Ok(SetBudgetOutcome { balance: budget.view(), created: false, rolled: false, ticket })
    }

    /// Count a commit in the budget's recent usage; freeze the budget if it ran away. True when it tripped now.
    pub(super) fn check_breaker(&self, budget: &Budget, amount: i64, now_ms: i64) -> bool {
        let config = self.config.breaker;
        let multiplier = budget.breaker_multiplier(config.multiplier);
        let trip = {
            let mut ring = budget.ring.lock().expect("usage ring lock");
            ring.add(&config, now_ms, amount);
            ring.check(&config, multiplier, now_ms)
        };
        let Some(trip) = trip else { return false };
        if budget.frozen() {
            return false;
        }
        let reason = format!(
            "circuit breaker: {} units in the last {} s, over {} ({}x the typical {} an hour, or breaker_min_units); \
             unfreeze with Admin.FreezeBudget once it is understood",
            trip.recent_units,
            config.recent_ms / 1000,
            trip.threshold_units,
            multiplier,
            trip.typical_units
        );
        match self.freeze_with(budget, true, &reason, AlertKind::BreakerTripped) {
            Ok(_) => {
                self.breaker_trips_total.fetch_add(1, SeqCst);
                true
            }
            Err(_) => false, // the queue is full: the next commit checks again
        }
    }
}

fn policy_state(
    budget: &Budget,
    admin: &BudgetAdmin,
    rearm_soft_alert: bool,
    rearm_limit_alert: bool,
) -> Box<PolicyState> {
    let (period_start_ms, period_end_ms) = budget.period();
    Box::new(PolicyState {
        limit: admin.limit,
        stripe_customer_id: admin.stripe_customer_id.clone(),
        included: admin.included,
        soft_limit: admin.soft_limit,
        mode: admin.mode,
        block_overage: admin.block_overage,
        parent: budget.parent.get().map(|p| p.customer_id.to_string()),
        period: admin.period,
        period_start_ms,
        period_end_ms,
        breaker_multiplier: admin.breaker_multiplier,
        stop_at: admin.stop_at,
        rearm_soft_alert,
        rearm_limit_alert,
    })
}

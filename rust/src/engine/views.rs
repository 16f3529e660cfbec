//! What the engine shows: a budget's balance and settings, its usage in a period, its closed periods, and the
//! budgets in id order.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use super::{validate_id, Engine};
use crate::budget::Budget;
use crate::error::EngineError;
use crate::limits::MAX_LIST_BUDGETS;
use crate::period::PeriodRule;
use crate::records::{EnforcementMode, PeriodRecord, UsageRecord};

/// Closed periods one call lists, and how far back a usage query looks for the period containing a time.
pub const MAX_PERIODS_LISTED: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceView {
    pub customer_id: String,
    /// The configured limit plus the unused granted credits (the kill switch may cap what Reserve admits at the
    /// included quota).
    pub limit: i64,
    pub spent: i64,
    pub reserved: i64,
    pub remaining: i64,
    pub active_holds: i64,
    pub stripe_customer_id: String,
    pub overdraft: i64,
    pub frozen: bool,
    pub frozen_reason: String,
    pub included: i64,
    pub soft_limit: i64,
    pub mode: EnforcementMode,
    pub block_overage: bool,
    /// The org this budget belongs to ("" for none), and, for an org, how many members it has.
    pub parent: String,
    pub members: u64,
    pub period: PeriodRule,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    pub breaker_multiplier: Option<u64>,
    /// Granted credits in `limit` this period (granted in it or carried into it).
    pub credits: i64,
    /// The customer's own stop-at (0: none): Reserve admits at most up to it.
    pub stop_at: i64,
}

/// A budget's usage in one period: the writer's record (exactly the ledger's entries of that period), with the
/// period's bounds and the settings it ran under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageView {
    pub customer_id: String,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    /// True for the period running now.
    pub current: bool,
    pub limit: i64,
    pub included: i64,
    /// The unused credits in `limit`: now, or when a closed period closed.
    pub credits: i64,
    pub record: UsageRecord,
}

impl Budget {
    pub(super) fn view(&self) -> BalanceView {
        let counters = self.counters();
        let admin = self.admin.lock().expect("budget admin lock").clone();
        let (period_start_ms, period_end_ms) = self.period();
        BalanceView {
            customer_id: self.customer_id.to_string(),
            limit: admin.limit_with_credits(),
            spent: counters.spent,
            reserved: counters.held,
            // From the same snapshot as spent and reserved, so that a reply always adds up. (The admission counter
            // itself may differ for the instant a change is half applied by another thread.)
            remaining: (counters.limit - counters.spent - counters.held).max(0),
            active_holds: counters.active_holds,
            stripe_customer_id: admin.stripe_customer_id,
            overdraft: counters.overdraft,
            frozen: self.frozen(),
            frozen_reason: admin.frozen_reason,
            included: admin.included,
            soft_limit: admin.soft_limit,
            mode: admin.mode,
            block_overage: admin.block_overage,
            parent: self.parent.get().map(|p| p.customer_id.to_string()).unwrap_or_default(),
            members: self.members.load(SeqCst),
            period: admin.period,
            period_start_ms,
            period_end_ms,
            breaker_multiplier: admin.breaker_multiplier,
            credits: admin.credits,
            stop_at: admin.stop_at,
        }
    }
}

impl Engine {
    pub fn balance(&self, customer_id: &str) -> Result<BalanceView, EngineError> {
        validate_id("customer_id", customer_id)?;
        Ok(self.shared.budget(customer_id)?.view())
    }

    pub fn list_budgets(&self, prefix: &str, limit: usize) -> Result<Vec<BalanceView>, EngineError> {
        if limit > MAX_LIST_BUDGETS {
            return Err(EngineError::invalid(format!("limit is {limit}; list at most {MAX_LIST_BUDGETS} at a time")));
        }
        let mut found: Vec<Arc<Budget>> = self
            .shared
            .budgets
            .iter()
            .filter(|entry| entry.key().starts_with(prefix))
            .map(|entry| entry.value().clone())
            .collect();
        found.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
        Ok(found.into_iter().take(limit).map(|budget| budget.view()).collect())
    }

    /// The usage of the period containing `at_ms` (None: the current period). Durable commits only: a commit is in
    /// it once its reply could leave.
    pub fn usage(&self, customer_id: &str, at_ms: Option<i64>) -> Result<UsageView, EngineError> {
        let PeriodOf { start_ms, end_ms, current, limit, included, credits } = self.period_of(customer_id, at_ms)?;
        let record = self.shared.with_store(|store| store.get_usage(customer_id, start_ms))?.unwrap_or_else(|| {
            UsageRecord { customer_id: customer_id.to_string(), period_start_ms: start_ms, ..Default::default() }
        });
        Ok(UsageView {
            customer_id: customer_id.to_string(),
            period_start_ms: start_ms,
            period_end_ms: end_ms,
            current,
            limit,
            included,
            credits,
            record,
        })
    }

    /// (start, end, current) of the budget's period containing `at_ms` (None: the current one).
    pub(super) fn period_bounds(&self, customer_id: &str, at_ms: Option<i64>) -> Result<(i64, i64, bool), EngineError> {
        let period = self.period_of(customer_id, at_ms)?;
        Ok((period.start_ms, period.end_ms, period.current))
    }

    /// The period containing `at_ms` (None: the current one).
    fn period_of(&self, customer_id: &str, at_ms: Option<i64>) -> Result<PeriodOf, EngineError> {
        validate_id("customer_id", customer_id)?;
        let view = self.shared.budget(customer_id)?.view();
        let current = at_ms.is_none_or(|at| at >= view.period_start_ms);
        if current {
            return Ok(PeriodOf {
                start_ms: view.period_start_ms,
                end_ms: view.period_end_ms,
                current: true,
                limit: view.limit,
                included: view.included,
                credits: view.credits,
            });
        }
        let at = at_ms.expect("a past period has a time");
        let closed = self.closed_periods(customer_id, MAX_PERIODS_LISTED)?;
        let period =
            closed.into_iter().find(|p| p.start_ms <= at && at < p.end_ms.max(p.closed_ms)).ok_or_else(|| {
                EngineError::not_found(format!("budget {customer_id:?} has no period containing {at} ms"))
            })?;
        Ok(PeriodOf {
            start_ms: period.start_ms,
            end_ms: period.end_ms,
            current: false,
            limit: period.limit + period.credits,
            included: period.included,
            credits: period.credits,
        })
    }

    /// The budget's closed periods, newest first.
    pub fn closed_periods(&self, customer_id: &str, limit: usize) -> Result<Vec<PeriodRecord>, EngineError> {
        validate_id("customer_id", customer_id)?;
        if limit == 0 || limit > MAX_PERIODS_LISTED {
            return Err(EngineError::invalid(format!("limit is {limit}; pass 1..={MAX_PERIODS_LISTED}")));
        }
        self.shared.budget(customer_id)?;
        self.shared.with_store(|store| store.closed_periods(customer_id, limit))
    }
}

/// A budget's period as the views read it: bounds, and the limit (credits included), quota and credits in force.
struct PeriodOf {
    start_ms: i64,
    end_ms: i64,
    current: bool,
    limit: i64,
    included: i64,
    credits: i64,
}

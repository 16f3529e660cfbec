//! Prepaid credits: Admin.GrantCredits adds credits to a budget's limit, relative and idempotent per key, so that
//! two top-ups never race each other as two absolute SetBudget limits would.
//!
//! - A grant raises the limit Reserve admits against by its amount at once (`limit + credits`). Spend draws the
//!   configured limit first, then the credits.
//! - Credits never expire: at a period's roll-over, the unused part carries into the next period
//!   (`records::carried_credits`); what was used is gone. With a lifetime period (prepaid plans) there is no roll-over:
//!   the budget burns down `limit + credits`.
//! - SetBudget's limit is the configured limit, without credits: it never takes granted credits away.
//! - Idempotency keys are global: a replay (same key, customer and amount) answers what the grant did, with
//!   `replayed`; the same key with another customer or amount is ALREADY_EXISTS, as for Reserve.
//! - Each grant is a ledger entry of kind `grant` (never in the outbox: a grant is not billed) and counts in the
//!   period's usage record (`granted`, `grants`), never in its usage.

use dashmap::mapref::entry::Entry;

use super::{validate_amount, validate_id, BalanceView, Shared};
use crate::error::{EngineError, ErrorKind};
use crate::hold::truncate_for_message;
use crate::limits::{MAX_AMOUNT_UNITS, MAX_REASON_BYTES};
use crate::records::GrantRecord;
use crate::writer::{GrantOp, Op};

/// A grant not yet durable: what a replay answers until LMDB has it (then the writer drops it).
#[derive(Debug, Clone)]
pub(crate) struct GrantMemo {
    pub customer_id: String,
    pub amount: i64,
    pub reason: String,
    pub ts_ms: i64,
    pub limit_after: i64,
    pub credits_after: i64,
    pub ticket: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantOutcome {
    pub customer_id: String,
    pub amount: i64,
    /// The reason the grant was made with (a replay's is the first call's).
    pub reason: String,
    pub granted_ms: i64,
    /// The budget's limit (with credits) and its unused credits right after the grant.
    pub limit_after: i64,
    pub credits_after: i64,
    /// This call repeated an earlier grant under the same key: nothing was added.
    pub replayed: bool,
    /// The budget now.
    pub balance: BalanceView,
    /// Durability ticket to wait for (a replay's is the first call's, 0 once durable).
    pub ticket: u64,
}

impl Shared {
    pub(super) fn grant_credits(
        &self,
        customer_id: &str,
        amount: i64,
        key: &str,
        reason: &str,
    ) -> Result<GrantOutcome, EngineError> {
        self.check_open()?;
        validate_id("customer_id", customer_id)?;
        validate_amount("amount", amount, 1)?;
        validate_id("idempotency_key", key)?;
        if reason.len() > MAX_REASON_BYTES {
            return Err(EngineError::invalid(format!(
                "reason is {} bytes; give at most {MAX_REASON_BYTES} (MAX_REASON_BYTES)",
                reason.len()
            )));
        }
        let budget = self.budget(customer_id)?;
        // The key's shard lock serializes every call with this key, whatever the customer.
        match self.grants.entry(key.to_string()) {
            Entry::Occupied(entry) => {
                let memo = entry.get().clone();
                drop(entry);
                replay_grant(key, customer_id, amount, memo, budget.view())
            }
            Entry::Vacant(entry) => {
                if let Some(record) = self.with_store(|store| store.get_grant(key))? {
                    drop(entry);
                    return replay_grant(key, customer_id, amount, memo_of(record), budget.view());
                }
                self.check_map_room(crate::capacity::GRANT_WORST_CASE_BYTES)?;
                let mut admin = budget.admin.lock().expect("budget admin lock");
                let limit_after = admin.limit_with_credits().checked_add(amount).unwrap_or(i64::MAX);
                if limit_after > MAX_AMOUNT_UNITS {
                    return Err(EngineError::invalid(format!(
                        "granting {amount} would take budget {:?}'s limit ({} with credits) to {limit_after}, past \
                         {MAX_AMOUNT_UNITS} (MAX_AMOUNT_UNITS): nothing was changed; grant less",
                        truncate_for_message(customer_id),
                        admin.limit_with_credits()
                    )));
                }
                self.acquire_queue_slot()?;
                let old_limit = admin.effective_limit();
                let mut next = admin.clone();
                next.credits += amount;
                let new_limit = next.effective_limit();
                let rearm_limit_alert = new_limit > old_limit;
                let now_ms = self.clock.now_ms();
                // The admin lock keeps the period from rolling over between counting the grant and its ticket.
                let op = GrantOp {
                    customer_id: customer_id.to_string(),
                    key: key.to_string(),
                    amount,
                    reason: reason.to_string(),
                    now_ms,
                    period_start_ms: budget.period().0,
                    limit_after,
                    credits_after: next.credits,
                    rearm_limit_alert,
                };
                // Raises the limit (frees capacity): ticket first, then publish.
                let ticket = self.take_ticket();
                self.send(ticket, Op::Grant(Box::new(op)));
                budget.shift_limit(new_limit);
                budget.publish_policy(&next);
                if rearm_limit_alert {
                    budget.rearm_limit();
                }
                let credits_after = next.credits;
                *admin = next;
                drop(admin);
                let memo = GrantMemo {
                    customer_id: customer_id.to_string(),
                    amount,
                    reason: reason.to_string(),
                    ts_ms: now_ms,
                    limit_after,
                    credits_after,
                    ticket,
                };
                entry.insert(memo);
                Ok(GrantOutcome {
                    customer_id: customer_id.to_string(),
                    amount,
                    reason: reason.to_string(),
                    granted_ms: now_ms,
                    limit_after,
                    credits_after,
                    replayed: false,
                    balance: budget.view(),
                    ticket,
                })
            }
        }
    }

    /// Called by the writer once a grant is durable: LMDB answers its replays from now on.
    pub(crate) fn forget_grant(&self, ticket: u64, key: &str) {
        self.grants.remove_if(key, |_, memo| memo.ticket == ticket);
    }
}

fn memo_of(record: GrantRecord) -> GrantMemo {
    GrantMemo {
        customer_id: record.customer_id,
        amount: record.amount,
        reason: record.reason,
        ts_ms: record.ts_ms,
        limit_after: record.limit_after,
        credits_after: record.credits_after,
        ticket: 0,
    }
}

fn replay_grant(
    key: &str,
    customer_id: &str,
    amount: i64,
    memo: GrantMemo,
    balance: BalanceView,
) -> Result<GrantOutcome, EngineError> {
    if memo.customer_id != customer_id || memo.amount != amount {
        return Err(EngineError::new(
            ErrorKind::AlreadyExists,
            format!(
                "idempotency_key {:?} was already used to grant {} credits to {:?}; a retry must send the same \
                 customer and amount, a new grant needs a new key",
                truncate_for_message(key),
                memo.amount,
                truncate_for_message(&memo.customer_id)
            ),
        ));
    }
    Ok(GrantOutcome {
        customer_id: memo.customer_id,
        amount: memo.amount,
        reason: memo.reason,
        granted_ms: memo.ts_ms,
        limit_after: memo.limit_after,
        credits_after: memo.credits_after,
        replayed: true,
        balance,
        ticket: memo.ticket,
    })
}

//! The one writer thread: applies ops to LMDB strictly in ticket order, many per transaction (group commit), and
//! publishes the highest durable ticket after each commit.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use heed::RwTxn;

use crate::engine::Shared;
use crate::error::EngineError;
use crate::hold::format_reservation_id;
use crate::limits::{MAX_BATCH_OPS, MAX_PRUNE_PER_TXN};
use crate::records::{BudgetRecord, DeadLetter, HoldRecord, HoldStatus, LedgerEntry, OutboxEntry};
use crate::store::{idempotency_key, Store};

/// How long the writer sleeps for new ops before it looks at housekeeping again.
const IDLE_WAIT_MS: u64 = 50;

#[derive(Debug, Clone)]
pub enum Op {
    SetBudget {
        customer_id: String,
        limit: i64,
        stripe_customer_id: Option<String>,
        now_ms: i64,
    },
    Reserve {
        hold_id: u64,
        record: HoldRecord,
    },
    Commit {
        hold_id: u64,
        amount: i64,
        excess: i64,
        late: bool,
        now_ms: i64,
    },
    Release {
        hold_id: u64,
        now_ms: i64,
    },
    Expire {
        hold_id: u64,
        now_ms: i64,
    },
    /// Delete holds resolved before `before_ms`, with their idempotency keys.
    Prune {
        before_ms: i64,
    },
    Freeze {
        customer_id: String,
        frozen: bool,
        now_ms: i64,
    },
    /// Fix the identifier these outbox entries are sent under, before the first send.
    OutboxClaim {
        seqs: Vec<u64>,
        identifier: String,
        now_ms: i64,
    },
    /// Stripe accepted these: drop them from the outbox, mark their ledger entries settled.
    OutboxAck {
        seqs: Vec<u64>,
        now_ms: i64,
    },
    OutboxDeadLetter {
        seqs: Vec<u64>,
        reason: String,
        now_ms: i64,
    },
    DeadLetterRequeue {
        seq: u64,
        now_ms: i64,
    },
    /// Stop after everything before it is durable.
    Shutdown,
}

pub struct Ticketed {
    pub ticket: u64,
    pub op: Op,
}

pub struct Writer {
    shared: Arc<Shared>,
    store: Store,
    rx: Receiver<Ticketed>,
    /// Ops that arrived ahead of a lower ticket still on its way.
    pending: BTreeMap<u64, Op>,
    next_ticket: u64,
    next_ledger_seq: u64,
    prune_cursor: u64,
}

impl Writer {
    pub fn new(shared: Arc<Shared>, store: Store, rx: Receiver<Ticketed>, next_ledger_seq: u64) -> Writer {
        let next_ticket = shared.durable_ticket.load(SeqCst) + 1;
        Writer { shared, store, rx, pending: BTreeMap::new(), next_ticket, next_ledger_seq, prune_cursor: 0 }
    }

    pub fn run(mut self) {
        loop {
            match self.step() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(err) => {
                    self.shared.fail(format!("the LMDB writer stopped: {err}"));
                    break;
                }
            }
        }
        self.shared.writer_stopped();
    }

    /// One batch. Returns false once a Shutdown op is durable.
    fn step(&mut self) -> Result<bool, EngineError> {
        if !self.fill()? {
            return Ok(true);
        }
        let batch = self.take_contiguous();
        if batch.is_empty() {
            return Ok(true);
        }
        let last_ticket = batch.last().map(|(ticket, _)| *ticket).expect("batch is not empty");
        let env = self.store.env.clone();
        let mut wtxn = env.write_txn()?;
        let mut shutdown = false;
        for (_, op) in &batch {
            shutdown |= matches!(op, Op::Shutdown);
            self.apply(&mut wtxn, op)?;
        }
        wtxn.commit()?;
        self.shared.publish_durable(last_ticket, batch.len(), self.store.map_usage_bytes());
        for (ticket, op) in &batch {
            self.shared.forget_resolved(*ticket, op);
        }
        Ok(!shutdown)
    }

    /// Wait for the next op, then take whatever else is already queued. Returns false when idle.
    fn fill(&mut self) -> Result<bool, EngineError> {
        if !self.pending.contains_key(&self.next_ticket) {
            match self.rx.recv_timeout(Duration::from_millis(IDLE_WAIT_MS)) {
                Ok(item) => self.insert(item),
                Err(RecvTimeoutError::Timeout) => return Ok(false),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(EngineError::internal("the engine dropped the write queue without a Shutdown op"))
                }
            }
        }
        while self.pending.len() < MAX_BATCH_OPS {
            match self.rx.try_recv() {
                Ok(item) => self.insert(item),
                Err(_) => break,
            }
        }
        Ok(true)
    }

    fn insert(&mut self, item: Ticketed) {
        assert!(item.ticket >= self.next_ticket, "ticket {} arrived twice", item.ticket);
        let previous = self.pending.insert(item.ticket, item.op);
        assert!(previous.is_none(), "ticket {} arrived twice", item.ticket);
    }

    fn take_contiguous(&mut self) -> Vec<(u64, Op)> {
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH_OPS {
            let Some(op) = self.pending.remove(&self.next_ticket) else { break };
            batch.push((self.next_ticket, op));
            self.next_ticket += 1;
        }
        batch
    }

    fn apply(&mut self, wtxn: &mut RwTxn, op: &Op) -> Result<(), EngineError> {
        match op {
            Op::SetBudget { customer_id, limit, stripe_customer_id, now_ms } => {
                self.apply_set_budget(wtxn, customer_id, *limit, stripe_customer_id.as_deref(), *now_ms)
            }
            Op::Reserve { hold_id, record } => self.apply_reserve(wtxn, *hold_id, record),
            Op::Commit { hold_id, amount, excess, late, now_ms } => {
                self.apply_commit(wtxn, *hold_id, *amount, *excess, *late, *now_ms)
            }
            Op::Release { hold_id, now_ms } => self.apply_void(wtxn, *hold_id, HoldStatus::Released, *now_ms),
            Op::Expire { hold_id, now_ms } => self.apply_void(wtxn, *hold_id, HoldStatus::Expired, *now_ms),
            Op::Prune { before_ms } => self.apply_prune(wtxn, *before_ms),
            Op::Freeze { customer_id, frozen, now_ms } => {
                let mut budget = self.budget(wtxn, customer_id)?;
                budget.frozen = *frozen;
                budget.updated_ms = *now_ms;
                Ok(self.store.budgets.put(wtxn, customer_id, &budget)?)
            }
            Op::OutboxClaim { seqs, identifier, now_ms } => self.apply_claim(wtxn, seqs, identifier, *now_ms),
            Op::OutboxAck { seqs, now_ms } => self.apply_ack(wtxn, seqs, *now_ms),
            Op::OutboxDeadLetter { seqs, reason, now_ms } => self.apply_dead_letter(wtxn, seqs, reason, *now_ms),
            Op::DeadLetterRequeue { seq, now_ms } => self.apply_requeue(wtxn, *seq, *now_ms),
            Op::Shutdown => Ok(()),
        }
    }

    fn budget(&self, wtxn: &RwTxn, customer_id: &str) -> Result<BudgetRecord, EngineError> {
        self.store.budgets.get(wtxn, customer_id)?.ok_or_else(|| {
            EngineError::internal(format!("invariant: an op names budget {customer_id:?}, which LMDB does not hold"))
        })
    }

    fn hold(&self, wtxn: &RwTxn, hold_id: u64) -> Result<HoldRecord, EngineError> {
        self.store.holds.get(wtxn, &hold_id)?.ok_or_else(|| {
            EngineError::internal(format!("invariant: an op names hold {hold_id}, which LMDB does not hold"))
        })
    }

    fn apply_set_budget(
        &self,
        wtxn: &mut RwTxn,
        customer_id: &str,
        limit: i64,
        stripe_customer_id: Option<&str>,
        now_ms: i64,
    ) -> Result<(), EngineError> {
        let mut record = self.store.budgets.get(wtxn, customer_id)?.unwrap_or_else(|| BudgetRecord {
            limit,
            spent: 0,
            held: 0,
            overdraft: 0,
            stripe_customer_id: customer_id.to_string(),
            created_ms: now_ms,
            updated_ms: now_ms,
            frozen: false,
        });
        record.limit = limit;
        record.updated_ms = now_ms;
        if let Some(stripe_customer_id) = stripe_customer_id {
            record.stripe_customer_id = stripe_customer_id.to_string();
        }
        self.store.budgets.put(wtxn, customer_id, &record)?;
        Ok(())
    }

    fn apply_reserve(&self, wtxn: &mut RwTxn, hold_id: u64, record: &HoldRecord) -> Result<(), EngineError> {
        assert_eq!(record.status, HoldStatus::Active);
        let mut budget = self.budget(wtxn, &record.customer_id)?;
        budget.held = checked(budget.held.checked_add(record.amount), "held")?;
        self.store.budgets.put(wtxn, &record.customer_id, &budget)?;
        if self.store.holds.get(wtxn, &hold_id)?.is_some() {
            return Err(EngineError::internal(format!("invariant: hold {hold_id} was reserved twice")));
        }
        self.store.holds.put(wtxn, &hold_id, record)?;
        if let Some(key) = &record.idempotency_key {
            self.store.idempotency.put(wtxn, &idempotency_key(&record.customer_id, key), &hold_id)?;
        }
        self.store.put_next_hold_id(wtxn, hold_id + 1)
    }

    fn apply_commit(
        &mut self,
        wtxn: &mut RwTxn,
        hold_id: u64,
        amount: i64,
        excess: i64,
        late: bool,
        now_ms: i64,
    ) -> Result<(), EngineError> {
        let mut hold = self.hold(wtxn, hold_id)?;
        let expected = if late { HoldStatus::Expired } else { HoldStatus::Active };
        if hold.status != expected {
            return Err(EngineError::internal(format!(
                "invariant: commit of hold {hold_id} found it {:?}, expected {expected:?}",
                hold.status
            )));
        }
        let mut budget = self.budget(wtxn, &hold.customer_id)?;
        let reserved = if late { 0 } else { hold.amount };
        budget.held = checked(budget.held.checked_sub(reserved), "held")?;
        budget.spent = checked(budget.spent.checked_add(amount), "spent")?;
        budget.overdraft = checked(budget.overdraft.checked_add(excess), "overdraft")?;
        assert!(budget.held >= 0, "held went negative in LMDB for {}", hold.customer_id);
        self.store.budgets.put(wtxn, &hold.customer_id, &budget)?;

        let seq = self.next_ledger_seq;
        self.next_ledger_seq += 1;
        let reservation_id = format_reservation_id(hold_id);
        let entry = LedgerEntry {
            seq,
            reservation_id: reservation_id.clone(),
            customer_id: hold.customer_id.clone(),
            stripe_customer_id: budget.stripe_customer_id.clone(),
            amount,
            reserved,
            excess,
            ts_ms: now_ms,
            settled_ms: None,
        };
        self.store.ledger.put(wtxn, &seq, &entry)?;
        let outbox = OutboxEntry {
            seq,
            identifier: format!("sg-{reservation_id}"),
            customer_id: entry.customer_id,
            stripe_customer_id: entry.stripe_customer_id,
            amount,
            ts_ms: now_ms,
            sent_as: None,
            first_attempt_ms: None,
            attempts: 0,
        };
        self.store.outbox.put(wtxn, &seq, &outbox)?;
        self.shared.outbox_grew(1);

        hold.status = HoldStatus::Committed;
        hold.committed_amount = Some(amount);
        hold.excess = excess;
        hold.late = late;
        hold.resolved_ms = Some(now_ms);
        self.store.holds.put(wtxn, &hold_id, &hold)?;
        Ok(())
    }

    fn apply_void(&self, wtxn: &mut RwTxn, hold_id: u64, status: HoldStatus, now_ms: i64) -> Result<(), EngineError> {
        let mut hold = self.hold(wtxn, hold_id)?;
        if hold.status != HoldStatus::Active {
            return Err(EngineError::internal(format!(
                "invariant: {status:?} of hold {hold_id} found it {:?}, expected Active",
                hold.status
            )));
        }
        let mut budget = self.budget(wtxn, &hold.customer_id)?;
        budget.held = checked(budget.held.checked_sub(hold.amount), "held")?;
        assert!(budget.held >= 0, "held went negative in LMDB for {}", hold.customer_id);
        self.store.budgets.put(wtxn, &hold.customer_id, &budget)?;
        hold.status = status;
        hold.resolved_ms = Some(now_ms);
        self.store.holds.put(wtxn, &hold_id, &hold)?;
        Ok(())
    }

    /// Walk at most MAX_PRUNE_PER_TXN holds from where the last prune stopped, wrapping around.
    fn apply_prune(&mut self, wtxn: &mut RwTxn, before_ms: i64) -> Result<(), EngineError> {
        let mut doomed = Vec::new();
        let mut seen = 0usize;
        let mut last_seen = None;
        for item in self.store.holds.range(wtxn, &(self.prune_cursor..))? {
            let (hold_id, hold) = item?;
            seen += 1;
            last_seen = Some(hold_id);
            if hold.status != HoldStatus::Active && hold.resolved_ms.is_some_and(|at| at < before_ms) {
                doomed.push((hold_id, hold));
            }
            if seen >= MAX_PRUNE_PER_TXN {
                break;
            }
        }
        self.prune_cursor = match last_seen {
            Some(hold_id) if seen >= MAX_PRUNE_PER_TXN => hold_id + 1,
            _ => 0,
        };
        for (hold_id, hold) in doomed {
            self.store.holds.delete(wtxn, &hold_id)?;
            if let Some(key) = &hold.idempotency_key {
                let composite = idempotency_key(&hold.customer_id, key);
                if self.store.idempotency.get(wtxn, &composite)? == Some(hold_id) {
                    self.store.idempotency.delete(wtxn, &composite)?;
                }
            }
        }
        Ok(())
    }
}

impl Writer {
    fn apply_claim(&self, wtxn: &mut RwTxn, seqs: &[u64], identifier: &str, now_ms: i64) -> Result<(), EngineError> {
        for seq in seqs {
            // Gone means acknowledged or dead-lettered meanwhile: nothing left to claim.
            let Some(mut entry) = self.store.outbox.get(wtxn, seq)? else { continue };
            entry.sent_as.get_or_insert_with(|| identifier.to_string());
            entry.first_attempt_ms.get_or_insert(now_ms);
            entry.attempts = entry.attempts.saturating_add(1);
            self.store.outbox.put(wtxn, seq, &entry)?;
        }
        Ok(())
    }

    fn apply_ack(&self, wtxn: &mut RwTxn, seqs: &[u64], now_ms: i64) -> Result<(), EngineError> {
        for seq in seqs {
            if !self.store.outbox.delete(wtxn, seq)? {
                continue; // acknowledged twice: the second is a no-op
            }
            self.shared.outbox_shrank(1);
            if let Some(mut entry) = self.store.ledger.get(wtxn, seq)? {
                entry.settled_ms = Some(now_ms);
                self.store.ledger.put(wtxn, seq, &entry)?;
            }
        }
        Ok(())
    }

    fn apply_dead_letter(&self, wtxn: &mut RwTxn, seqs: &[u64], reason: &str, now_ms: i64) -> Result<(), EngineError> {
        for seq in seqs {
            let Some(entry) = self.store.outbox.get(wtxn, seq)? else { continue };
            let requeues = self.store.dead_letters.get(wtxn, seq)?.map_or(0, |old| old.requeues);
            let letter = DeadLetter { entry, reason: reason.to_string(), dead_ms: now_ms, requeues };
            self.store.dead_letters.put(wtxn, seq, &letter)?;
            self.store.outbox.delete(wtxn, seq)?;
            self.shared.outbox_shrank(1);
        }
        Ok(())
    }

    fn apply_requeue(&self, wtxn: &mut RwTxn, seq: u64, _now_ms: i64) -> Result<(), EngineError> {
        let Some(mut letter) = self.store.dead_letters.get(wtxn, &seq)? else { return Ok(()) };
        letter.requeues += 1;
        let mut entry = letter.entry.clone();
        // Stripe keeps the identifier of an event it refused: a resend needs a new one.
        let base = entry.identifier.rsplit_once("-requeue").map_or(entry.identifier.as_str(), |(base, _)| base);
        entry.identifier = format!("{base}-requeue{}", letter.requeues);
        entry.sent_as = None;
        entry.first_attempt_ms = None;
        entry.attempts = 0;
        self.store.outbox.put(wtxn, &seq, &entry)?;
        self.store.dead_letters.delete(wtxn, &seq)?;
        self.shared.outbox_grew(1);
        Ok(())
    }
}

fn checked(value: Option<i64>, field: &str) -> Result<i64, EngineError> {
    value.ok_or_else(|| EngineError::internal(format!("invariant: {field} overflowed i64 in LMDB")))
}

//! The one writer thread: applies ops to LMDB strictly in ticket order, many per transaction (group commit), and
//! publishes the highest durable ticket after each commit.
//!
//! Within one transaction, budget and usage records are read once, changed in memory by every op of the batch, and
//! written once before the commit (`BatchCache`): a batch of a thousand commits on one hot budget serializes its
//! record once, not a thousand times.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use heed::RwTxn;

use crate::alerts::{AlertKind, PendingAlert, MAX_ALERTS_KEPT};
use crate::archive::META_ARCHIVE_LEN_PREFIX;
use crate::capacity::{mib, next_map_size_bytes, MapUsage, DISK_CHECK_INTERVAL_MS};
use crate::engine::Shared;
use crate::error::EngineError;
use crate::limits::{MAX_ARCHIVE_PER_TXN, MAX_ARCHIVE_SCAN_PER_TXN, MAX_BATCH_OPS, MAX_PRUNE_PER_TXN};
use crate::period::PeriodRule;
use crate::records::{
    AlertRecord, BudgetRecord, DeadLetter, Dimensions, EnforcementMode, GrantRecord, HoldRecord, HoldStatus,
    LedgerEntry, LedgerKind, OutboxEntry, PeriodRecord, UsageDetail, UsageRecord,
};
use crate::store::{idempotency_key, period_key, Store, META_ALERT_CURSOR};
use crate::usage::MEMBER_DIMENSION;

/// How long the writer sleeps for new ops before it looks at housekeeping again.
const IDLE_WAIT_MS: u64 = 50;
/// Alerts pruned per op past MAX_ALERTS_KEPT, so pruning never stalls a batch.
const MAX_ALERT_PRUNE_PER_OP: usize = 64;
/// Attempts to resize the map after MAP_FULL (each waits up to the store's RESIZE_WAIT_MS for readers to finish).
const MAX_RESIZE_ATTEMPTS: u32 = 15;

/// How far the writer may grow the map (EngineConfig's map_max_mb and disk_reserve_mb).
#[derive(Debug, Clone, Copy)]
pub struct MapLimits {
    pub map_max_mb: u64,
    pub disk_reserve_mb: u64,
}

/// A budget's settings as an admin call left them: the writer copies them into the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyState {
    pub limit: i64,
    pub stripe_customer_id: String,
    pub included: i64,
    pub soft_limit: i64,
    pub mode: EnforcementMode,
    pub block_overage: bool,
    pub parent: Option<String>,
    pub period: PeriodRule,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    pub breaker_multiplier: Option<u64>,
    pub stop_at: i64,
    /// Re-arm this period's soft-limit or limit alert (the threshold moved above what is spent).
    pub rearm_soft_alert: bool,
    pub rearm_limit_alert: bool,
}

#[derive(Debug, Clone)]
pub enum Op {
    /// Create a budget or change its settings (never its counters, never its period start: see Roll).
    SetPolicy {
        customer_id: String,
        policy: Box<PolicyState>,
        now_ms: i64,
    },
    Reserve {
        hold_id: u64,
        record: Box<HoldRecord>,
    },
    Commit(Box<CommitOp>),
    Release {
        hold_id: u64,
        now_ms: i64,
    },
    Expire {
        hold_id: u64,
        now_ms: i64,
    },
    /// Delete holds resolved before `before_ms`, with their idempotency keys; move settled ledger entries of closed
    /// periods made before `archive_before_ms` to the archive.
    Prune {
        before_ms: i64,
        archive_before_ms: i64,
    },
    Freeze {
        customer_id: String,
        frozen: bool,
        reason: String,
        now_ms: i64,
    },
    /// Close the budget's current period (kept in `periods`) and start [start_ms, end_ms) with nothing spent.
    Roll {
        customer_id: String,
        start_ms: i64,
        end_ms: i64,
        now_ms: i64,
        /// The unused credits the new period starts with (records::carried_credits, as the engine computed it).
        credits_after: i64,
    },
    Alert(Box<PendingAlert>),
    /// The alert webhook delivered every alert up to `seq`.
    AlertCursor {
        seq: u64,
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
        fate_unknown: bool,
        now_ms: i64,
    },
    DeadLetterRequeue {
        seq: u64,
        now_ms: i64,
    },
    /// Replace a document of the layers above (see Store::documents).
    PutDocument {
        name: String,
        body: String,
    },
    /// Stop after everything before it is durable.
    Shutdown,
    /// Add credits to a budget's limit: a grant ledger entry (no outbox entry: a grant is never billed), the
    /// period's usage record, and the grant by its key.
    Grant(Box<GrantOp>),
}

#[derive(Debug, Clone)]
pub struct GrantOp {
    pub customer_id: String,
    pub key: String,
    pub amount: i64,
    pub reason: String,
    pub now_ms: i64,
    /// The period the engine counted it in, checked against LMDB's.
    pub period_start_ms: i64,
    pub limit_after: i64,
    pub credits_after: i64,
    /// The effective limit went up: re-arm this period's limit alert.
    pub rearm_limit_alert: bool,
}

#[derive(Debug, Clone)]
pub struct CommitOp {
    pub hold_id: u64,
    pub amount: i64,
    pub excess: i64,
    pub parent_excess: i64,
    pub late: bool,
    pub now_ms: i64,
    /// The periods the engine counted the amount in, checked against LMDB's.
    pub period_start_ms: i64,
    pub parent_period_start_ms: i64,
    pub usage: Option<UsageDetail>,
    /// The Reserve's dimensions merged with the Commit's.
    pub dimensions: Dimensions,
}

pub struct Ticketed {
    pub ticket: u64,
    pub op: Op,
}

/// Records read and changed by this transaction's ops, written once before it commits.
#[derive(Default)]
struct BatchCache {
    budgets: HashMap<String, BudgetRecord>,
    usage: HashMap<String, UsageRecord>,
}

pub struct Writer {
    shared: Arc<Shared>,
    store: Store,
    rx: Receiver<Ticketed>,
    /// Ops that arrived ahead of a lower ticket still on its way.
    pending: BTreeMap<u64, Op>,
    next_ticket: u64,
    next_ledger_seq: u64,
    next_alert_seq: u64,
    prune_cursor: u64,
    /// The ledger seq the next archiving pass starts from.
    archive_cursor: u64,
    cache: BatchCache,
    /// Outbox entries added minus removed by the batch being written, published to the engine once it commits (a
    /// batch that hits MAP_FULL is written again, and must not count twice).
    outbox_delta: i64,
    map_limits: MapLimits,
    map_usage: MapUsage,
    disk_checked_at: Instant,
}

impl Writer {
    pub fn new(
        shared: Arc<Shared>,
        store: Store,
        rx: Receiver<Ticketed>,
        next_ledger_seq: u64,
        next_alert_seq: u64,
        map_limits: MapLimits,
        map_usage: MapUsage,
    ) -> Writer {
        let next_ticket = shared.durable_ticket.load(SeqCst) + 1;
        Writer {
            outbox_delta: 0,
            map_limits,
            map_usage,
            disk_checked_at: Instant::now(),
            shared,
            store,
            rx,
            pending: BTreeMap::new(),
            next_ticket,
            next_ledger_seq,
            next_alert_seq,
            prune_cursor: 0,
            archive_cursor: 0,
            cache: BatchCache::default(),
        }
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
        let shutdown = batch.iter().any(|(_, op)| matches!(op, Op::Shutdown));
        self.write_growing(&batch)?;
        self.measure_map(false)?;
        self.shared.publish_durable(last_ticket, batch.len(), self.map_usage, self.next_alert_seq - 1);
        for (ticket, op) in &batch {
            self.shared.forget_resolved(*ticket, op);
        }
        if !shutdown {
            self.grow_map(0)?; // ahead of need, while nobody waits on a batch
        }
        Ok(!shutdown)
    }

    /// Write the batch; on MAP_FULL, grow the map and write it again from the same state. Only a disk that cannot
    /// hold the data (the admission checks keep room for all granted work) stops the writer.
    fn write_growing(&mut self, batch: &[(u64, Op)]) -> Result<(), EngineError> {
        let counters = (self.next_ledger_seq, self.next_alert_seq, self.prune_cursor, self.archive_cursor);
        loop {
            match self.write_batch(batch) {
                Ok(()) => break,
                Err(err) if err.is_map_full() => {
                    (self.next_ledger_seq, self.next_alert_seq, self.prune_cursor, self.archive_cursor) = counters;
                    self.cache = BatchCache::default();
                    self.outbox_delta = 0;
                    let at_least = self.map_usage.size_bytes.saturating_mul(2);
                    if !self.grow_map(at_least)? {
                        return Err(self.disk_full_error());
                    }
                }
                Err(err) => return Err(err),
            }
        }
        match std::mem::take(&mut self.outbox_delta) {
            grew @ 1.. => self.shared.outbox_grew(grew.unsigned_abs()),
            shrank @ ..=-1 => self.shared.outbox_shrank(shrank.unsigned_abs()),
            0 => {}
        }
        Ok(())
    }

    fn write_batch(&mut self, batch: &[(u64, Op)]) -> Result<(), EngineError> {
        let env = self.store.env.clone();
        let mut wtxn = env.write_txn()?;
        let next_ledger_seq = self.next_ledger_seq;
        for (_, op) in batch {
            self.apply(&mut wtxn, op)?;
        }
        if self.next_ledger_seq != next_ledger_seq {
            self.store.put_next_ledger_seq(&mut wtxn, self.next_ledger_seq)?;
        }
        self.flush(&mut wtxn)?;
        wtxn.commit()?;
        Ok(())
    }

    /// Refresh the map's size and use (cheap), and the disk's free space (at most every DISK_CHECK_INTERVAL_MS
    /// unless `force`).
    fn measure_map(&mut self, force: bool) -> Result<(), EngineError> {
        let stale = self.disk_checked_at.elapsed() >= Duration::from_millis(DISK_CHECK_INTERVAL_MS);
        if force || stale {
            self.map_usage = self.store.map_usage(self.map_limits.map_max_mb, self.map_limits.disk_reserve_mb)?;
            self.disk_checked_at = Instant::now();
        } else {
            let (size_bytes, high_water_bytes) = self.store.map_usage_bytes();
            self.map_usage.size_bytes = size_bytes;
            self.map_usage.high_water_bytes = high_water_bytes;
            self.map_usage.used_bytes = self.store.data_bytes()?;
            self.map_usage.capacity_bytes = self.map_usage.capacity_bytes.max(high_water_bytes);
        }
        Ok(())
    }

    /// Grow the map when it is crowded, or to at least `at_least_bytes`. False: it cannot grow (at capacity).
    /// Growing ahead of need (`at_least_bytes` 0) uses the measurement `step` just took: counting the data pages
    /// walks LMDB's free list, once a batch is enough.
    fn grow_map(&mut self, at_least_bytes: u64) -> Result<bool, EngineError> {
        if at_least_bytes > 0 {
            self.measure_map(true)?;
        }
        let MapUsage { size_bytes, high_water_bytes, capacity_bytes, .. } = self.map_usage;
        let Some(target) = next_map_size_bytes(size_bytes, high_water_bytes, capacity_bytes, at_least_bytes) else {
            return Ok(false);
        };
        for _ in 0..MAX_RESIZE_ATTEMPTS {
            if self.store.resize_map(target)? {
                self.measure_map(false)?;
                assert!(self.map_usage.size_bytes >= target, "the map did not grow to {target} bytes");
                return Ok(true);
            }
            if at_least_bytes == 0 {
                return Ok(false); // growing ahead of need: try again after the next batch
            }
        }
        Err(EngineError::unavailable(format!(
            "the LMDB map must grow to {} MiB but a read transaction of this process stayed open for {} attempts",
            mib(target),
            MAX_RESIZE_ATTEMPTS
        )))
    }

    fn disk_full_error(&self) -> EngineError {
        EngineError::unavailable(format!(
            "the disk is full: the data needs more than {} MiB (map_max_mb, or the disk's free space past \
             disk_reserve_mb) and the writer cannot make granted work durable. Free disk space or raise map_max_mb, \
             then restart",
            mib(self.map_usage.capacity_bytes)
        ))
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
            Op::SetPolicy { customer_id, policy, now_ms } => self.apply_set_policy(wtxn, customer_id, policy, *now_ms),
            Op::Reserve { hold_id, record } => self.apply_reserve(wtxn, *hold_id, record),
            Op::Commit(commit) => self.apply_commit(wtxn, commit),
            Op::Release { hold_id, now_ms } => self.apply_void(wtxn, *hold_id, HoldStatus::Released, *now_ms),
            Op::Expire { hold_id, now_ms } => self.apply_void(wtxn, *hold_id, HoldStatus::Expired, *now_ms),
            Op::Prune { before_ms, archive_before_ms } => {
                self.apply_prune(wtxn, *before_ms)?;
                self.apply_archive(wtxn, *archive_before_ms)?;
                // A pass that stopped at its bound goes on in the next one right away, so that pruning and archiving
                // keep up with any commit rate instead of one bounded pass per prune interval.
                self.shared.set_prune_backlog(self.prune_cursor != 0 || self.archive_cursor != 0);
                Ok(())
            }
            Op::Freeze { customer_id, frozen, reason, now_ms } => {
                let budget = self.budget_mut(wtxn, customer_id)?;
                budget.frozen = *frozen;
                budget.frozen_reason = if *frozen { reason.clone() } else { String::new() };
                if !*frozen {
                    budget.ring.fine.clear(); // the spike that froze it is forgiven (as in memory)
                }
                budget.updated_ms = *now_ms;
                Ok(())
            }
            Op::Roll { customer_id, start_ms, end_ms, now_ms, credits_after } => {
                self.apply_roll(wtxn, customer_id, *start_ms, *end_ms, *now_ms, *credits_after)
            }
            Op::Alert(alert) => self.apply_alert(wtxn, alert),
            Op::AlertCursor { seq } => {
                let stored = self.store.meta.get(wtxn, META_ALERT_CURSOR)?.unwrap_or(0);
                Ok(self.store.meta.put(wtxn, META_ALERT_CURSOR, &stored.max(*seq))?)
            }
            Op::OutboxClaim { seqs, identifier, now_ms } => self.apply_claim(wtxn, seqs, identifier, *now_ms),
            Op::OutboxAck { seqs, now_ms } => self.apply_ack(wtxn, seqs, *now_ms),
            Op::OutboxDeadLetter { seqs, reason, fate_unknown, now_ms } => {
                self.apply_dead_letter(wtxn, seqs, reason, *fate_unknown, *now_ms)
            }
            Op::DeadLetterRequeue { seq, now_ms } => self.apply_requeue(wtxn, *seq, *now_ms),
            Op::PutDocument { name, body } => Ok(self.store.documents.put(wtxn, name, body)?),
            Op::Shutdown => Ok(()),
            Op::Grant(grant) => self.apply_grant(wtxn, grant),
        }
    }

    /// The budget's record as this transaction has it so far.
    fn budget_mut(&mut self, wtxn: &RwTxn, customer_id: &str) -> Result<&mut BudgetRecord, EngineError> {
        if !self.cache.budgets.contains_key(customer_id) {
            let record = self.store.budgets.get(wtxn, customer_id)?.ok_or_else(|| {
                EngineError::internal(format!(
                    "invariant: an op names budget {customer_id:?}, which LMDB does not hold"
                ))
            })?;
            self.cache.budgets.insert(customer_id.to_string(), record);
        }
        Ok(self.cache.budgets.get_mut(customer_id).expect("just cached"))
    }

    fn usage_mut(&mut self, wtxn: &RwTxn, customer_id: &str, start_ms: i64) -> Result<&mut UsageRecord, EngineError> {
        let key = period_key(customer_id, start_ms);
        if !self.cache.usage.contains_key(&key) {
            let record = self.store.usage.get(wtxn, &key)?.unwrap_or_else(|| UsageRecord {
                customer_id: customer_id.to_string(),
                period_start_ms: start_ms,
                ..UsageRecord::default()
            });
            self.cache.usage.insert(key.clone(), record);
        }
        Ok(self.cache.usage.get_mut(&key).expect("just cached"))
    }

    fn flush(&mut self, wtxn: &mut RwTxn) -> Result<(), EngineError> {
        for (customer_id, record) in self.cache.budgets.drain() {
            assert!(record.held >= 0, "held went negative in LMDB for {customer_id}");
            self.store.budgets.put(wtxn, &customer_id, &record)?;
        }
        for (key, record) in self.cache.usage.drain() {
            self.store.usage.put(wtxn, &key, &record)?;
        }
        Ok(())
    }

    fn hold(&self, wtxn: &RwTxn, hold_id: u64) -> Result<HoldRecord, EngineError> {
        self.store.holds.get(wtxn, &hold_id)?.ok_or_else(|| {
            EngineError::internal(format!("invariant: an op names hold {hold_id}, which LMDB does not hold"))
        })
    }

    fn apply_set_policy(
        &mut self,
        wtxn: &RwTxn,
        customer_id: &str,
        policy: &PolicyState,
        now_ms: i64,
    ) -> Result<(), EngineError> {
        let known =
            self.cache.budgets.contains_key(customer_id) || self.store.budgets.get(wtxn, customer_id)?.is_some();
        if !known {
            let record = BudgetRecord::new(
                policy.limit,
                policy.stripe_customer_id.clone(),
                now_ms,
                policy.period,
                policy.period_start_ms,
                policy.period_end_ms,
            );
            self.cache.budgets.insert(customer_id.to_string(), record);
        }
        let record = self.budget_mut(wtxn, customer_id)?;
        if record.period_start_ms != policy.period_start_ms {
            return Err(EngineError::internal(format!(
                "invariant: a policy change moved the period start of {customer_id:?} ({} -> {}) without a Roll",
                record.period_start_ms, policy.period_start_ms
            )));
        }
        record.limit = policy.limit;
        record.stripe_customer_id = policy.stripe_customer_id.clone();
        record.included = policy.included;
        record.soft_limit = policy.soft_limit;
        record.mode = policy.mode;
        record.block_overage = policy.block_overage;
        record.parent = policy.parent.clone();
        record.period = policy.period;
        record.period_end_ms = policy.period_end_ms;
        record.breaker_multiplier = policy.breaker_multiplier;
        record.stop_at = policy.stop_at;
        record.soft_alerted &= !policy.rearm_soft_alert;
        record.limit_alerted &= !policy.rearm_limit_alert;
        record.updated_ms = now_ms;
        Ok(())
    }

    fn apply_reserve(&mut self, wtxn: &mut RwTxn, hold_id: u64, record: &HoldRecord) -> Result<(), EngineError> {
        assert_eq!(record.status, HoldStatus::Active);
        for customer_id in std::iter::once(&record.customer_id).chain(record.parent.as_ref()) {
            let budget = self.budget_mut(wtxn, customer_id)?;
            budget.held = checked(budget.held.checked_add(record.amount), "held")?;
        }
        if self.store.holds.get(wtxn, &hold_id)?.is_some() {
            return Err(EngineError::internal(format!("invariant: hold {hold_id} was reserved twice")));
        }
        self.store.holds.put(wtxn, &hold_id, record)?;
        if let Some(key) = &record.idempotency_key {
            self.store.idempotency.put(wtxn, &idempotency_key(&record.customer_id, key), &hold_id)?;
        }
        self.store.put_next_hold_id(wtxn, hold_id + 1)
    }

    /// Post a commit on one level (the member, or its org). Returns the stripe customer id of that level.
    fn post(
        &mut self,
        wtxn: &RwTxn,
        customer_id: &str,
        reserved: i64,
        commit: &CommitOp,
        excess: i64,
        period_start_ms: i64,
    ) -> Result<String, EngineError> {
        let breaker = self.shared.breaker_config();
        let budget = self.budget_mut(wtxn, customer_id)?;
        if budget.period_start_ms != period_start_ms {
            return Err(EngineError::internal(format!(
                "invariant: the engine counted a commit of {customer_id:?} in the period from {period_start_ms}, \
                 LMDB is in the one from {}",
                budget.period_start_ms
            )));
        }
        budget.held = checked(budget.held.checked_sub(reserved), "held")?;
        budget.spent = checked(budget.spent.checked_add(commit.amount), "spent")?;
        budget.overdraft = checked(budget.overdraft.checked_add(excess), "overdraft")?;
        budget.ring.add(&breaker, commit.now_ms, commit.amount);
        assert!(budget.held >= 0, "held went negative in LMDB for {customer_id}");
        Ok(budget.stripe_customer_id.clone())
    }

    fn apply_commit(&mut self, wtxn: &mut RwTxn, commit: &CommitOp) -> Result<(), EngineError> {
        let hold_id = commit.hold_id;
        let mut hold = self.hold(wtxn, hold_id)?;
        let expected = if commit.late { HoldStatus::Expired } else { HoldStatus::Active };
        if hold.status != expected {
            return Err(EngineError::internal(format!(
                "invariant: commit of hold {hold_id} found it {:?}, expected {expected:?}",
                hold.status
            )));
        }
        let reserved = if commit.late { 0 } else { hold.amount };
        let stripe_customer_id =
            self.post(wtxn, &hold.customer_id, reserved, commit, commit.excess, commit.period_start_ms)?;
        if let Some(parent) = hold.parent.clone() {
            self.post(wtxn, &parent, reserved, commit, commit.parent_excess, commit.parent_period_start_ms)?;
            let mut dimensions = commit.dimensions.clone();
            dimensions.insert(MEMBER_DIMENSION.to_string(), hold.customer_id.clone());
            self.usage_mut(wtxn, &parent, commit.parent_period_start_ms)?.add(
                commit.now_ms,
                commit.amount,
                commit.usage.as_ref(),
                &dimensions,
            );
        }
        self.usage_mut(wtxn, &hold.customer_id, commit.period_start_ms)?.add(
            commit.now_ms,
            commit.amount,
            commit.usage.as_ref(),
            &commit.dimensions,
        );
        self.append_ledger(wtxn, &hold, commit, reserved, stripe_customer_id)?;
        hold.status = HoldStatus::Committed;
        hold.committed_amount = Some(commit.amount);
        hold.excess = commit.excess;
        hold.late = commit.late;
        hold.resolved_ms = Some(commit.now_ms);
        self.store.holds.put(wtxn, &hold_id, &hold)?;
        Ok(())
    }

    /// The ledger entry and its outbox entry, in the same transaction: nothing committed is missing from either.
    fn append_ledger(
        &mut self,
        wtxn: &mut RwTxn,
        hold: &HoldRecord,
        commit: &CommitOp,
        reserved: i64,
        stripe_customer_id: String,
    ) -> Result<(), EngineError> {
        let seq = self.next_ledger_seq;
        self.next_ledger_seq += 1;
        let reservation_id = self.shared.identity.issued_reservation_id(commit.hold_id);
        let entry = LedgerEntry {
            seq,
            reservation_id: reservation_id.clone(),
            customer_id: hold.customer_id.clone(),
            stripe_customer_id,
            amount: commit.amount,
            reserved,
            excess: commit.excess,
            ts_ms: commit.now_ms,
            settled_ms: None,
            period_start_ms: commit.period_start_ms,
            parent: hold.parent.clone(),
            usage: commit.usage.clone(),
            dimensions: commit.dimensions.clone(),
            parent_period_start_ms: hold.parent.as_ref().map(|_| commit.parent_period_start_ms),
            sent_as: None,
            identifier: None,
            kind: LedgerKind::Commit,
            grant_key: String::new(),
            reason: String::new(),
        };
        self.store.ledger.put(wtxn, &seq, &entry)?;
        let outbox = OutboxEntry {
            seq,
            identifier: format!("sg-{reservation_id}"),
            customer_id: entry.customer_id,
            stripe_customer_id: entry.stripe_customer_id,
            amount: commit.amount,
            ts_ms: commit.now_ms,
            sent_as: None,
            first_attempt_ms: None,
            attempts: 0,
            requeues: 0,
            restored_ms: None,
            usage: entry.usage,
        };
        self.store.outbox.put(wtxn, &seq, &outbox)?;
        self.outbox_delta += 1;
        Ok(())
    }

    fn apply_void(
        &mut self,
        wtxn: &mut RwTxn,
        hold_id: u64,
        status: HoldStatus,
        now_ms: i64,
    ) -> Result<(), EngineError> {
        let mut hold = self.hold(wtxn, hold_id)?;
        if hold.status != HoldStatus::Active {
            return Err(EngineError::internal(format!(
                "invariant: {status:?} of hold {hold_id} found it {:?}, expected Active",
                hold.status
            )));
        }
        for customer_id in std::iter::once(hold.customer_id.clone()).chain(hold.parent.clone()) {
            let budget = self.budget_mut(wtxn, &customer_id)?;
            budget.held = checked(budget.held.checked_sub(hold.amount), "held")?;
            assert!(budget.held >= 0, "held went negative in LMDB for {customer_id}");
        }
        hold.status = status;
        hold.resolved_ms = Some(now_ms);
        self.store.holds.put(wtxn, &hold_id, &hold)?;
        Ok(())
    }

    fn apply_roll(
        &mut self,
        wtxn: &mut RwTxn,
        customer_id: &str,
        start_ms: i64,
        end_ms: i64,
        now_ms: i64,
        credits_after: i64,
    ) -> Result<(), EngineError> {
        let budget = self.budget_mut(wtxn, customer_id)?;
        if start_ms <= budget.period_start_ms {
            return Err(EngineError::internal(format!(
                "invariant: a roll of {customer_id:?} to {start_ms} does not move past the period from {}",
                budget.period_start_ms
            )));
        }
        let closed = PeriodRecord {
            customer_id: customer_id.to_string(),
            start_ms: budget.period_start_ms,
            end_ms: budget.period_end_ms,
            closed_ms: now_ms,
            limit: budget.limit,
            included: budget.included,
            spent: budget.spent,
            overdraft: budget.overdraft,
            credits: budget.credits,
        };
        let carried = crate::records::carried_credits(budget.limit, budget.credits, budget.spent);
        if carried != credits_after {
            return Err(EngineError::internal(format!(
                "invariant: the engine carried {credits_after} credits of {customer_id:?} into the period from \
                 {start_ms}, LMDB's record carries {carried}"
            )));
        }
        budget.credits = credits_after;
        budget.spent = 0;
        budget.overdraft = 0;
        budget.period_start_ms = start_ms;
        budget.period_end_ms = end_ms;
        budget.soft_alerted = false;
        budget.limit_alerted = false;
        budget.updated_ms = now_ms;
        self.store.periods.put(wtxn, &period_key(customer_id, closed.start_ms), &closed)?;
        Ok(())
    }

    fn apply_alert(&mut self, wtxn: &mut RwTxn, alert: &PendingAlert) -> Result<(), EngineError> {
        // A budget-level alert marks its budget, so that it is raised once per period across restarts.
        match alert.kind {
            AlertKind::SoftLimitCrossed => self.budget_mut(wtxn, &alert.customer_id)?.soft_alerted = true,
            AlertKind::LimitReached => self.budget_mut(wtxn, &alert.customer_id)?.limit_alerted = true,
            _ => {}
        }
        let seq = self.next_alert_seq;
        self.next_alert_seq += 1;
        let record = AlertRecord {
            seq,
            kind: alert.kind.as_str().to_string(),
            customer_id: alert.customer_id.clone(),
            ts_ms: alert.ts_ms,
            message: alert.message.clone(),
            values: alert.values.clone(),
            instance_id: self.shared.identity.instance_id,
        };
        self.store.alerts.put(wtxn, &seq, &record)?;
        let mut excess = self.store.alerts.len(wtxn)?.saturating_sub(MAX_ALERTS_KEPT);
        let mut pruned = 0;
        while excess > 0 && pruned < MAX_ALERT_PRUNE_PER_OP {
            let Some((oldest, _)) = self.store.alerts.first(wtxn)? else { break };
            self.store.alerts.delete(wtxn, &oldest)?;
            excess -= 1;
            pruned += 1;
        }
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
    fn apply_grant(&mut self, wtxn: &mut RwTxn, grant: &GrantOp) -> Result<(), EngineError> {
        let customer_id = grant.customer_id.as_str();
        let budget = self.budget_mut(wtxn, customer_id)?;
        if budget.period_start_ms != grant.period_start_ms {
            return Err(EngineError::internal(format!(
                "invariant: the engine counted a grant to {customer_id:?} in the period from {}, LMDB is in the one \
                 from {}",
                grant.period_start_ms, budget.period_start_ms
            )));
        }
        budget.credits = checked(budget.credits.checked_add(grant.amount), "credits")?;
        if budget.credits != grant.credits_after {
            return Err(EngineError::internal(format!(
                "invariant: a grant left {customer_id:?} with {} credits in LMDB, {} in the engine",
                budget.credits, grant.credits_after
            )));
        }
        budget.limit_alerted &= !grant.rearm_limit_alert;
        budget.updated_ms = grant.now_ms;
        let stripe_customer_id = budget.stripe_customer_id.clone();
        let parent = budget.parent.clone();
        let usage = self.usage_mut(wtxn, customer_id, grant.period_start_ms)?;
        usage.granted = checked(usage.granted.checked_add(grant.amount), "granted")?;
        usage.grants += 1;
        if self.store.grants.get(wtxn, &grant.key)?.is_some() {
            return Err(EngineError::internal(format!("invariant: grant key {:?} was applied twice", grant.key)));
        }
        let seq = self.next_ledger_seq;
        self.next_ledger_seq += 1;
        let entry = LedgerEntry {
            seq,
            reservation_id: String::new(),
            customer_id: customer_id.to_string(),
            stripe_customer_id,
            amount: grant.amount,
            reserved: 0,
            excess: 0,
            ts_ms: grant.now_ms,
            settled_ms: None,
            period_start_ms: grant.period_start_ms,
            parent,
            usage: None,
            dimensions: Dimensions::new(),
            parent_period_start_ms: None,
            sent_as: None,
            identifier: None,
            kind: LedgerKind::Grant,
            grant_key: grant.key.clone(),
            reason: grant.reason.clone(),
        };
        self.store.ledger.put(wtxn, &seq, &entry)?;
        let record = GrantRecord {
            customer_id: customer_id.to_string(),
            amount: grant.amount,
            reason: grant.reason.clone(),
            ts_ms: grant.now_ms,
            seq,
            period_start_ms: grant.period_start_ms,
            limit_after: grant.limit_after,
            credits_after: grant.credits_after,
        };
        Ok(self.store.grants.put(wtxn, &grant.key, &record)?)
    }

    /// Move settled entries (and credit grants, which are never settled: nothing is sent for them) of closed periods
    /// made before `before_ms` to the archive (crate::archive), looking at most MAX_ARCHIVE_SCAN_PER_TXN entries from
    /// where the last pass stopped. A grant's replays read its GrantRecord, never its ledger entry. The ledger is in commit order, so a
    /// pass stops at the first entry not old enough and the next starts from the beginning again.
    fn apply_archive(&mut self, wtxn: &mut RwTxn, before_ms: i64) -> Result<(), EngineError> {
        let mut by_file: BTreeMap<String, Vec<LedgerEntry>> = BTreeMap::new();
        let (mut seen, mut taken, mut next_cursor) = (0usize, 0usize, 0u64);
        let candidates: Vec<LedgerEntry> = self
            .store
            .ledger
            .range(wtxn, &(self.archive_cursor..))?
            .take(MAX_ARCHIVE_SCAN_PER_TXN)
            .map(|item| item.map(|(_, entry)| entry))
            .collect::<Result<_, _>>()?;
        for entry in candidates {
            seen += 1;
            if entry.ts_ms >= before_ms {
                next_cursor = 0;
                break;
            }
            next_cursor = entry.seq + 1;
            let done = entry.settled_ms.is_some() || entry.kind == LedgerKind::Grant;
            if done && self.period_closed(wtxn, &entry)? {
                by_file.entry(crate::archive::file_name(entry.period_start_ms)).or_default().push(entry);
                taken += 1;
                if taken >= MAX_ARCHIVE_PER_TXN {
                    break;
                }
            }
        }
        if seen < MAX_ARCHIVE_SCAN_PER_TXN && taken < MAX_ARCHIVE_PER_TXN && next_cursor != 0 {
            next_cursor = 0; // reached the end of the ledger
        }
        self.archive_cursor = next_cursor;
        for (name, entries) in by_file {
            let key = format!("{META_ARCHIVE_LEN_PREFIX}{name}");
            let committed_len = self.store.meta.get(wtxn, &key)?.unwrap_or(0);
            let new_len = crate::archive::append(self.store.dir(), &name, committed_len, &entries)?;
            self.store.meta.put(wtxn, &key, &new_len)?;
            for entry in &entries {
                let deleted = self.store.ledger.delete(wtxn, &entry.seq)?;
                assert!(deleted, "archived ledger entry {} was not in LMDB", entry.seq);
            }
        }
        Ok(())
    }

    /// Whether the entry's budget has moved past the period the entry counted in (a deleted budget has).
    fn period_closed(&mut self, wtxn: &RwTxn, entry: &LedgerEntry) -> Result<bool, EngineError> {
        let current_start_ms = match self.cache.budgets.get(&entry.customer_id) {
            Some(budget) => Some(budget.period_start_ms),
            None => self.store.budgets.get(wtxn, &entry.customer_id)?.map(|budget| budget.period_start_ms),
        };
        Ok(current_start_ms.is_none_or(|start_ms| start_ms > entry.period_start_ms))
    }

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

    fn apply_ack(&mut self, wtxn: &mut RwTxn, seqs: &[u64], now_ms: i64) -> Result<(), EngineError> {
        for seq in seqs {
            let Some(sent) = self.store.outbox.get(wtxn, seq)? else {
                continue; // acknowledged twice: the second is a no-op
            };
            self.store.outbox.delete(wtxn, seq)?;
            self.outbox_delta -= 1;
            if let Some(mut entry) = self.store.ledger.get(wtxn, seq)? {
                // Kept for the audit trail (Engine::list_ledger): which meter events settled it.
                entry.settled_ms = Some(now_ms);
                entry.sent_as = sent.sent_as;
                entry.identifier = (sent.identifier != entry.base_identifier()).then_some(sent.identifier);
                self.store.ledger.put(wtxn, seq, &entry)?;
            }
        }
        Ok(())
    }

    fn apply_dead_letter(
        &mut self,
        wtxn: &mut RwTxn,
        seqs: &[u64],
        reason: &str,
        fate_unknown: bool,
        now_ms: i64,
    ) -> Result<(), EngineError> {
        for seq in seqs {
            let Some(entry) = self.store.outbox.get(wtxn, seq)? else { continue };
            // The count lives on the entry: the dead letter it was requeued from is gone.
            let requeues = entry.requeues;
            let fate_unknown = fate_unknown || entry.restored_ms.is_some();
            let letter = DeadLetter { entry, reason: reason.to_string(), dead_ms: now_ms, requeues, fate_unknown };
            self.store.dead_letters.put(wtxn, seq, &letter)?;
            self.store.outbox.delete(wtxn, seq)?;
            self.outbox_delta -= 1;
        }
        Ok(())
    }

    fn apply_requeue(&mut self, wtxn: &mut RwTxn, seq: u64, _now_ms: i64) -> Result<(), EngineError> {
        let Some(letter) = self.store.dead_letters.get(wtxn, &seq)? else { return Ok(()) };
        let mut entry = letter.entry;
        entry.requeues = letter.requeues.max(entry.requeues).saturating_add(1);
        // Stripe keeps the identifier of an event it refused: a resend needs a new one, never an earlier one.
        let base = entry.identifier.rsplit_once("-requeue").map_or(entry.identifier.as_str(), |(base, _)| base);
        entry.identifier = format!("{base}-requeue{}", entry.requeues);
        entry.restored_ms = None; // requeued knowingly: its fate was settled by the operator
        entry.sent_as = None;
        entry.first_attempt_ms = None;
        entry.attempts = 0;
        self.store.outbox.put(wtxn, &seq, &entry)?;
        self.store.dead_letters.delete(wtxn, &seq)?;
        self.outbox_delta += 1;
        Ok(())
    }
}

fn checked(value: Option<i64>, field: &str) -> Result<i64, EngineError> {
    value.ok_or_else(|| EngineError::internal(format!("invariant: {field} overflowed i64 in LMDB")))
}

//! The engine: budgets, holds and their life cycle. Every state change follows the ordering rule in lib.rs.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::budget::Budget;
use crate::clock::{Clock, SystemClock};
use crate::error::EngineError;
use crate::hold::{
    format_reservation_id, parse_reservation_id, truncate_for_message, DenyReason, HoldSlot, HoldState, Resolution,
};
use crate::limits::*;
use crate::records::{BudgetRecord, DeadLetter, HoldRecord, HoldStatus, OutboxEntry};
use crate::store::{idempotency_key, Store};
use crate::writer::{Op, Ticketed, Writer};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    pub map_size_mb: u64,
    /// false: fsync every transaction (survives power loss). true: no fsync (survives kill -9, not power loss).
    pub relaxed: bool,
    pub default_ttl_ms: u64,
    pub max_ttl_ms: u64,
    pub max_holds_per_budget: u64,
    pub max_active_holds: u64,
    pub max_budgets: u64,
    /// Ops queued for the writer but not yet durable; past it, calls get RESOURCE_EXHAUSTED.
    pub write_queue_capacity: u64,
    pub reap_interval_ms: u64,
    /// How long a resolved hold (and its idempotency key) stays answerable for idempotent retries.
    pub resolved_retention_ms: u64,
    pub prune_interval_ms: u64,
    /// Committed usage waiting for settlement. At the bound new reservations are refused (commits of existing holds
    /// still go in), so an outage at Stripe can never fill the disk unnoticed.
    pub max_outbox_entries: u64,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.into(),
            map_size_mb: 1024,
            relaxed: false,
            default_ttl_ms: 60_000,
            max_ttl_ms: 3_600_000,
            max_holds_per_budget: 10_000,
            max_active_holds: 1_000_000,
            max_budgets: 1_000_000,
            write_queue_capacity: 65_536,
            reap_interval_ms: 100,
            resolved_retention_ms: 7 * 86_400_000,
            prune_interval_ms: 60_000,
            max_outbox_entries: 10_000_000,
        }
    }

    fn validate(&self) -> Result<(), EngineError> {
        let positive = [
            ("default_ttl_ms", self.default_ttl_ms),
            ("max_ttl_ms", self.max_ttl_ms),
            ("max_holds_per_budget", self.max_holds_per_budget),
            ("max_active_holds", self.max_active_holds),
            ("max_budgets", self.max_budgets),
            ("write_queue_capacity", self.write_queue_capacity),
            ("reap_interval_ms", self.reap_interval_ms),
            ("resolved_retention_ms", self.resolved_retention_ms),
            ("prune_interval_ms", self.prune_interval_ms),
            ("max_outbox_entries", self.max_outbox_entries),
        ];
        for (name, value) in positive {
            if value == 0 || value > i64::MAX as u64 {
                return Err(EngineError::invalid(format!("{name} is {value}; it must be at least 1")));
            }
        }
        if self.max_ttl_ms > MAX_TTL_MS_CEILING {
            return Err(EngineError::invalid(format!(
                "max_ttl_ms is {}; it must be at most {MAX_TTL_MS_CEILING} (7 days)",
                self.max_ttl_ms
            )));
        }
        if self.default_ttl_ms > self.max_ttl_ms {
            return Err(EngineError::invalid(format!(
                "default_ttl_ms ({}) is above max_ttl_ms ({}); lower it or raise max_ttl_ms",
                self.default_ttl_ms, self.max_ttl_ms
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveOutcome {
    pub granted: bool,
    pub reservation_id: String,
    pub remaining: i64,
    pub reason: DenyReason,
    pub expires_at_ms: i64,
    pub replayed: bool,
    pub amount: i64,
    /// The hold's state now: Active for a fresh grant; for a replay, whatever became of the hold since. None when
    /// denied.
    pub state: Option<HoldState>,
    /// Durability ticket; 0 when nothing needs waiting for.
    pub ticket: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    pub charged: i64,
    pub remaining: i64,
    pub over_reserved: bool,
    pub excess: i64,
    pub replayed: bool,
    pub hold_expired: bool,
    pub ticket: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseOutcome {
    pub released: bool,
    pub remaining: i64,
    pub state: HoldState,
    pub replayed: bool,
    pub ticket: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceView {
    pub customer_id: String,
    pub limit: i64,
    pub spent: i64,
    pub reserved: i64,
    pub remaining: i64,
    pub active_holds: i64,
    pub stripe_customer_id: String,
    pub overdraft: i64,
    pub frozen: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetBudgetOutcome {
    pub balance: BalanceView,
    pub created: bool,
    pub ticket: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStats {
    pub budgets: u64,
    pub active_holds: u64,
    pub queue_depth: u64,
    pub durable_ticket: u64,
    pub map_size_bytes: u64,
    pub map_used_bytes: u64,
    pub expired_total: u64,
    pub batches_total: u64,
    pub ops_total: u64,
    pub outbox_depth: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStats {
    pub depth: u64,
    pub oldest_ts_ms: Option<i64>,
    pub dead_letters: u64,
    pub max_entries: u64,
}

/// State shared by the calling threads, the writer and the reaper.
pub struct Shared {
    config: EngineConfig,
    clock: Arc<dyn Clock>,
    /// `None` once closed, so that the LMDB environment really closes and the data dir can be reopened.
    store: std::sync::RwLock<Option<Store>>,
    budgets: DashMap<Box<str>, Arc<Budget>>,
    holds: DashMap<u64, HoldSlot>,
    /// Composite idempotency key -> hold id, for holds still in memory. LMDB answers for the rest.
    idempotency: DashMap<String, u64>,
    tx: Sender<Ticketed>,
    next_hold_id: AtomicU64,
    last_ticket: AtomicU64,
    pub durable_ticket: AtomicU64,
    queue_depth: AtomicU64,
    active_holds: AtomicU64,
    budget_count: AtomicU64,
    durable_lock: Mutex<()>,
    durable_cv: Condvar,
    notify_tx: UnixStream,
    failure: Mutex<Option<String>>,
    failed: AtomicBool,
    closing: AtomicBool,
    writer_done: AtomicBool,
    map_full: AtomicBool,
    map_size_bytes: AtomicU64,
    map_used_bytes: AtomicU64,
    expired_total: AtomicU64,
    batches_total: AtomicU64,
    ops_total: AtomicU64,
    outbox_depth: AtomicU64,
}

pub struct Engine {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    reaper: Mutex<Option<JoinHandle<()>>>,
    notify_rx: UnixStream,
    /// Held until close: one process owns the environment.
    lock_file: Mutex<Option<File>>,
}

impl Engine {
    pub fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        Self::open_with_clock(config, Arc::new(SystemClock))
    }

    pub fn open_with_clock(config: EngineConfig, clock: Arc<dyn Clock>) -> Result<Engine, EngineError> {
        config.validate()?;
        let lock_file = lock_data_dir(&config.data_dir)?;
        let store = Store::open(&config.data_dir, config.map_size_mb, config.relaxed)?;
        let recovered = store.recover()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (notify_tx, notify_rx) =
            UnixStream::pair().map_err(|err| EngineError::internal(format!("socketpair: {err}")))?;
        notify_tx.set_nonblocking(true).map_err(|err| EngineError::internal(format!("notify pipe: {err}")))?;
        notify_rx.set_nonblocking(true).map_err(|err| EngineError::internal(format!("notify pipe: {err}")))?;
        let (map_size_bytes, map_used_bytes) = store.map_usage_bytes();
        let shared = Arc::new(Shared {
            clock,
            store: std::sync::RwLock::new(Some(store.clone())),
            budgets: DashMap::new(),
            holds: DashMap::new(),
            idempotency: DashMap::new(),
            tx,
            next_hold_id: AtomicU64::new(recovered.next_hold_id),
            last_ticket: AtomicU64::new(0),
            durable_ticket: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            active_holds: AtomicU64::new(0),
            budget_count: AtomicU64::new(0),
            durable_lock: Mutex::new(()),
            durable_cv: Condvar::new(),
            notify_tx,
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            writer_done: AtomicBool::new(false),
            map_full: AtomicBool::new(false),
            map_size_bytes: AtomicU64::new(map_size_bytes),
            map_used_bytes: AtomicU64::new(map_used_bytes),
            expired_total: AtomicU64::new(0),
            batches_total: AtomicU64::new(0),
            ops_total: AtomicU64::new(0),
            outbox_depth: AtomicU64::new(recovered.outbox_depth),
            config,
        });
        shared.rebuild(recovered.budgets, recovered.active_holds)?;
        shared.update_map_usage((map_size_bytes, map_used_bytes));
        let writer = Writer::new(shared.clone(), store, rx, recovered.next_ledger_seq);
        let writer = std::thread::Builder::new()
            .name("spendgate-writer".into())
            .spawn(move || writer.run())
            .map_err(|err| EngineError::internal(format!("cannot start the writer thread: {err}")))?;
        let reaper_shared = shared.clone();
        let reaper = std::thread::Builder::new()
            .name("spendgate-reaper".into())
            .spawn(move || reaper_shared.reap_loop())
            .map_err(|err| EngineError::internal(format!("cannot start the reaper thread: {err}")))?;
        Ok(Engine {
            shared,
            writer: Mutex::new(Some(writer)),
            reaper: Mutex::new(Some(reaper)),
            notify_rx,
            lock_file: Mutex::new(Some(lock_file)),
        })
    }

    pub fn reserve(
        &self,
        customer_id: &str,
        amount: i64,
        key: &str,
        ttl_ms: u64,
    ) -> Result<ReserveOutcome, EngineError> {
        self.shared.reserve(customer_id, amount, key, ttl_ms)
    }

    pub fn commit(&self, reservation_id: &str, amount: i64) -> Result<CommitOutcome, EngineError> {
        self.shared.commit(reservation_id, amount)
    }

    pub fn release(&self, reservation_id: &str) -> Result<ReleaseOutcome, EngineError> {
        self.shared.release(reservation_id)
    }

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

    pub fn set_budget(
        &self,
        customer_id: &str,
        limit: i64,
        stripe_customer_id: &str,
    ) -> Result<SetBudgetOutcome, EngineError> {
        self.shared.set_budget(customer_id, limit, stripe_customer_id)
    }

    /// Freeze (deny every Reserve) or unfreeze a budget. Commits of existing holds still post.
    pub fn set_frozen(&self, customer_id: &str, frozen: bool) -> Result<SetBudgetOutcome, EngineError> {
        validate_id("customer_id", customer_id)?;
        let budget = self.shared.budget(customer_id)?;
        let now_ms = self.shared.clock.now_ms();
        let ticket = self.shared.submit(Op::Freeze { customer_id: customer_id.to_string(), frozen, now_ms })?;
        budget.set_frozen(frozen);
        Ok(SetBudgetOutcome { balance: budget.view(), created: false, ticket })
    }

    /// The oldest `limit` committed usages not yet accepted by Stripe, in ledger order (durable ones only).
    pub fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, EngineError> {
        check_batch("limit", limit)?;
        self.shared.with_store(|store| store.outbox_head(limit))
    }

    /// Fix, durably and before the first send, the identifier under which these entries go to Stripe. An entry that
    /// already has one keeps it, so a resend after a crash repeats exactly the same event.
    pub fn outbox_claim(&self, seqs: &[u64], identifier: &str) -> Result<u64, EngineError> {
        check_batch("seqs", seqs.len())?;
        validate_id("identifier", identifier)?;
        let now_ms = self.shared.clock.now_ms();
        self.shared.submit(Op::OutboxClaim { seqs: seqs.to_vec(), identifier: identifier.to_string(), now_ms })
    }

    /// Stripe accepted these entries: drop them from the outbox and mark their ledger entries settled.
    pub fn outbox_ack(&self, seqs: &[u64]) -> Result<u64, EngineError> {
        check_batch("seqs", seqs.len())?;
        let now_ms = self.shared.clock.now_ms();
        self.shared.submit(Op::OutboxAck { seqs: seqs.to_vec(), now_ms })
    }

    /// Stripe refused these for good: move them to the dead letters with the reason.
    pub fn outbox_dead_letter(&self, seqs: &[u64], reason: &str) -> Result<u64, EngineError> {
        check_batch("seqs", seqs.len())?;
        if reason.is_empty() || reason.len() > MAX_REASON_BYTES {
            return Err(EngineError::invalid(format!(
                "reason is {} bytes; give a reason of 1..={MAX_REASON_BYTES} bytes",
                reason.len()
            )));
        }
        let now_ms = self.shared.clock.now_ms();
        self.shared.submit(Op::OutboxDeadLetter { seqs: seqs.to_vec(), reason: reason.to_string(), now_ms })
    }

    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, EngineError> {
        check_batch("limit", limit)?;
        self.shared.with_store(|store| store.dead_letter_head(limit))
    }

    /// Put a dead letter back in the outbox under a fresh identifier (Stripe keeps the identifiers it refused).
    pub fn dead_letter_requeue(&self, seq: u64) -> Result<u64, EngineError> {
        let known = self.shared.with_store(|store| {
            let rtxn = store.read_txn()?;
            Ok(store.dead_letters.get(&rtxn, &seq)?.is_some())
        })?;
        if !known {
            return Err(EngineError::not_found(format!(
                "no dead letter with seq {seq}; list them with dead_letters()"
            )));
        }
        let now_ms = self.shared.clock.now_ms();
        self.shared.submit(Op::DeadLetterRequeue { seq, now_ms })
    }

    pub fn outbox_stats(&self) -> Result<OutboxStats, EngineError> {
        let (depth, oldest_ts_ms, dead_letters) = self.shared.with_store(|store| store.outbox_stats())?;
        Ok(OutboxStats { depth, oldest_ts_ms, dead_letters, max_entries: self.shared.config.max_outbox_entries })
    }

    /// Write a consistent, compacted copy of the environment to `dest_dir/data.mdb` while the engine keeps serving
    /// (LMDB copies from one read transaction: a durable state, never a torn one). `dest_dir` must be new or empty.
    /// Returns the copy's size in bytes. Restore by pointing `--data-dir` at a copy of `dest_dir`.
    pub fn backup(&self, dest_dir: &std::path::Path) -> Result<u64, EngineError> {
        let occupied = std::fs::read_dir(dest_dir).map(|mut entries| entries.next().is_some()).unwrap_or(false);
        if occupied {
            return Err(EngineError::invalid(format!(
                "backup destination {} is not empty; pass a new or empty directory",
                dest_dir.display()
            )));
        }
        std::fs::create_dir_all(dest_dir).map_err(|err| {
            EngineError::invalid(format!("cannot create backup directory {}: {err}", dest_dir.display()))
        })?;
        let path = dest_dir.join("data.mdb");
        let file =
            self.shared.with_store(|store| Ok(store.env.copy_to_path(&path, heed::CompactionOption::Enabled)?))?;
        file.sync_all().map_err(|err| EngineError::internal(format!("fsync of {}: {err}", path.display())))?;
        let size_bytes =
            file.metadata().map_err(|err| EngineError::internal(format!("{}: {err}", path.display())))?.len();
        Ok(size_bytes)
    }

    pub fn durable_ticket(&self) -> u64 {
        self.shared.durable_ticket.load(SeqCst)
    }

    /// Block until `ticket` is durable. Errors when the writer failed or stopped first, or on timeout.
    pub fn wait_durable(&self, ticket: u64, timeout: Duration) -> Result<(), EngineError> {
        self.shared.wait_durable(ticket, timeout)
    }

    pub fn notify_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.notify_rx.as_raw_fd()
    }

    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().expect("failure lock").clone()
    }

    pub fn reap_expired(&self) -> u64 {
        self.shared.reap_expired()
    }

    pub fn stats(&self) -> EngineStats {
        let s = &self.shared;
        EngineStats {
            budgets: s.budget_count.load(SeqCst),
            active_holds: s.active_holds.load(SeqCst),
            queue_depth: s.queue_depth.load(SeqCst),
            durable_ticket: s.durable_ticket.load(SeqCst),
            map_size_bytes: s.map_size_bytes.load(SeqCst),
            map_used_bytes: s.map_used_bytes.load(SeqCst),
            expired_total: s.expired_total.load(SeqCst),
            batches_total: s.batches_total.load(SeqCst),
            ops_total: s.ops_total.load(SeqCst),
            outbox_depth: s.outbox_depth.load(SeqCst),
        }
    }

    /// Make everything queued durable and stop the threads. Idempotent.
    pub fn close(&self) {
        let s = &self.shared;
        if s.closing.swap(true, SeqCst) {
            return;
        }
        if let Some(reaper) = self.reaper.lock().expect("reaper lock").take() {
            reaper.thread().unpark();
            let _ = reaper.join();
        }
        // Shutdown bypasses the queue bound: it must always get through.
        let ticket = s.last_ticket.fetch_add(1, SeqCst) + 1;
        s.queue_depth.fetch_add(1, SeqCst);
        let _ = s.tx.send(Ticketed { ticket, op: Op::Shutdown });
        if let Some(writer) = self.writer.lock().expect("writer lock").take() {
            let _ = writer.join();
        }
        // The writer's copy of the environment went with its thread; dropping ours closes LMDB, and only then may
        // another Engine (in this process or another) take the data dir.
        self.shared.store.write().expect("store lock").take();
        self.lock_file.lock().expect("lock file lock").take();
    }

    /// Verify the books: every budget's `held` equals the sum of its active holds, and the counters add up.
    /// For tests and `spendgate doctor`; takes a consistent view only when the engine is quiet.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.shared.check_invariants()
    }

    /// The counters LMDB holds now, for comparing memory with disk.
    pub fn stored_budgets(&self) -> Result<Vec<(String, BudgetRecord)>, EngineError> {
        Ok(self.shared.with_store(|store| store.recover())?.budgets)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock_data_dir(dir: &std::path::Path) -> Result<File, EngineError> {
    std::fs::create_dir_all(dir).map_err(|err| {
        EngineError::invalid(format!("cannot create data dir {}: {err}; pass a writable --data-dir", dir.display()))
    })?;
    let path = dir.join("spendgate.lock");
    let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(|err| {
        EngineError::invalid(format!("cannot open {}: {err}; pass a writable --data-dir", path.display()))
    })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(EngineError::precondition(format!(
            "data dir {} is in use by another spendgate process; one process owns a data dir (stop the other one \
             or pick another --data-dir)",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(err)) => {
            Err(EngineError::internal(format!("cannot lock {}: {err}", path.display())))
        }
    }
}

fn check_batch(field: &str, count: usize) -> Result<(), EngineError> {
    if count == 0 || count > MAX_OUTBOX_BATCH {
        return Err(EngineError::invalid(format!("{field} has {count} items; pass 1..={MAX_OUTBOX_BATCH}")));
    }
    Ok(())
}

fn validate_id(field: &str, value: &str) -> Result<(), EngineError> {
    if value.is_empty() {
        return Err(EngineError::invalid(format!(
            "{field} is empty; pass a non-empty id of at most {MAX_ID_BYTES} bytes"
        )));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(EngineError::invalid(format!(
            "{field} is {} bytes; the limit is {MAX_ID_BYTES} bytes (MAX_ID_BYTES): use a shorter id",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(EngineError::invalid(format!("{field} contains a NUL character; remove it")));
    }
    Ok(())
}

fn validate_amount(field: &str, value: i64, min: i64) -> Result<(), EngineError> {
    if value < min {
        let rule = if min == 0 { ">= 0" } else { "> 0" };
        return Err(EngineError::invalid(format!("{field} is {value}; it must be {rule}")));
    }
    if value > MAX_AMOUNT_UNITS {
        return Err(EngineError::invalid(format!(
            "{field} is {value}; the largest allowed is {MAX_AMOUNT_UNITS} (2^53, MAX_AMOUNT_UNITS)"
        )));
    }
    Ok(())
}

fn denied(reason: DenyReason, remaining: i64, amount: i64) -> ReserveOutcome {
    ReserveOutcome {
        granted: false,
        reservation_id: String::new(),
        remaining,
        reason,
        expires_at_ms: 0,
        replayed: false,
        amount,
        state: None,
        ticket: 0,
    }
}

impl Budget {
    fn view(&self) -> BalanceView {
        let counters = self.counters();
        let stripe_customer_id = self.admin.lock().expect("budget admin lock").stripe_customer_id.clone();
        BalanceView {
            customer_id: self.customer_id.to_string(),
            limit: counters.limit,
            spent: counters.spent,
            reserved: counters.held,
            // From the same snapshot as spent and reserved, so that a reply always adds up. (The admission counter
            // itself may differ for the instant a change is half applied by another thread.)
            remaining: (counters.limit - counters.spent - counters.held).max(0),
            active_holds: counters.active_holds,
            stripe_customer_id,
            overdraft: counters.overdraft,
            frozen: self.frozen(),
        }
    }
}

impl Shared {
    fn rebuild(&self, budgets: Vec<(String, BudgetRecord)>, active: Vec<(u64, HoldRecord)>) -> Result<(), EngineError> {
        let mut per_budget: std::collections::HashMap<&str, (i64, i64)> = Default::default();
        for (_, hold) in &active {
            let entry = per_budget.entry(hold.customer_id.as_str()).or_default();
            entry.0 += hold.amount;
            entry.1 += 1;
        }
        for (customer_id, record) in &budgets {
            let (held, count) = per_budget.get(customer_id.as_str()).copied().unwrap_or_default();
            if held != record.held {
                return Err(EngineError::internal(format!(
                    "the data dir is inconsistent: budget {customer_id:?} records held={} but its active holds sum \
                     to {held}; restore from a backup",
                    record.held
                )));
            }
            let budget = Arc::new(Budget::from_record(customer_id, record, count));
            self.budgets.insert(customer_id.as_str().into(), budget);
        }
        self.budget_count.store(budgets.len() as u64, SeqCst);
        for (hold_id, hold) in active {
            let budget = self.budget(&hold.customer_id).map_err(|_| {
                EngineError::internal(format!("the data dir is inconsistent: hold {hold_id} names a missing budget"))
            })?;
            let idem_key = hold.idempotency_key.as_ref().map(|key| idempotency_key(&hold.customer_id, key));
            if let Some(key) = &idem_key {
                self.idempotency.insert(key.clone(), hold_id);
            }
            let slot = HoldSlot {
                budget,
                amount: hold.amount,
                expires_ms: hold.expires_ms,
                idem_key: idem_key.map(String::into_boxed_str),
                resolution: None,
                ticket: 0,
            };
            self.holds.insert(hold_id, slot);
            self.active_holds.fetch_add(1, SeqCst);
        }
        Ok(())
    }

    fn budget(&self, customer_id: &str) -> Result<Arc<Budget>, EngineError> {
        self.budgets.get(customer_id).map(|entry| entry.value().clone()).ok_or_else(|| {
            EngineError::not_found(format!(
                "no budget for customer_id {:?}; create it with Admin.SetBudget (spendgate budget set)",
                truncate_for_message(customer_id)
            ))
        })
    }

    fn with_store<T>(&self, read: impl FnOnce(&Store) -> Result<T, EngineError>) -> Result<T, EngineError> {
        match self.store.read().expect("store lock").as_ref() {
            Some(store) => read(store),
            None => Err(EngineError::unavailable("the engine is closed; retry against a running sidecar")),
        }
    }

    fn check_open(&self) -> Result<(), EngineError> {
        if self.failed.load(SeqCst) {
            let why = self.failure.lock().expect("failure lock").clone().unwrap_or_default();
            return Err(EngineError::unavailable(format!(
                "{why}; restart spendgate (LMDB holds every acknowledged change)"
            )));
        }
        if self.closing.load(SeqCst) {
            return Err(EngineError::unavailable("the engine is shutting down; retry against a running sidecar"));
        }
        Ok(())
    }

    /// Claim room in the write queue. Call before taking a ticket, so that every ticket taken is sent.
    fn acquire_queue_slot(&self) -> Result<(), EngineError> {
        let capacity = self.config.write_queue_capacity;
        let claimed = self.queue_depth.fetch_update(SeqCst, SeqCst, |depth| (depth < capacity).then_some(depth + 1));
        claimed.map(drop).map_err(|_| {
            EngineError::exhausted(format!(
                "the write queue is full ({capacity} ops waiting for the disk, write_queue_capacity); retry with backoff"
            ))
        })
    }

    fn take_ticket(&self) -> u64 {
        self.last_ticket.fetch_add(1, SeqCst) + 1
    }

    fn send(&self, ticket: u64, op: Op) {
        // Fails only when the writer is gone, which has already set `failed`; waiters get that error.
        let _ = self.tx.send(Ticketed { ticket, op });
    }

    fn reserve(&self, customer_id: &str, amount: i64, key: &str, ttl_ms: u64) -> Result<ReserveOutcome, EngineError> {
        self.check_open()?;
        validate_id("customer_id", customer_id)?;
        validate_amount("amount", amount, 1)?;
        if !key.is_empty() {
            validate_id("idempotency_key", key)?;
        }
        let ttl_ms = self.resolve_ttl_ms(ttl_ms)?;
        let budget = self.budget(customer_id)?;
        if key.is_empty() {
            return self.reserve_new(&budget, amount, ttl_ms, None);
        }
        let composite = idempotency_key(customer_id, key);
        match self.idempotency.entry(composite) {
            Entry::Occupied(entry) => {
                let hold_id = *entry.get();
                drop(entry);
                self.replay_reserve(hold_id, amount, key)
            }
            Entry::Vacant(entry) => {
                // Under the shard lock, so no concurrent retry can slip a second hold in between.
                if let Some(hold_id) = self.with_store(|store| store.get_idempotency(entry.key()))? {
                    drop(entry);
                    return self.replay_reserve(hold_id, amount, key);
                }
                let outcome = self.reserve_new(&budget, amount, ttl_ms, Some((entry.key().as_str(), key)))?;
                if outcome.granted {
                    entry.insert(parse_reservation_id(&outcome.reservation_id)?);
                }
                Ok(outcome)
            }
        }
    }

    fn resolve_ttl_ms(&self, ttl_ms: u64) -> Result<u64, EngineError> {
        if ttl_ms == 0 {
            return Ok(self.config.default_ttl_ms);
        }
        if ttl_ms > self.config.max_ttl_ms {
            return Err(EngineError::invalid(format!(
                "ttl_ms is {ttl_ms}; the server allows at most {} (max_ttl_ms); pass 0 for the default of {}",
                self.config.max_ttl_ms, self.config.default_ttl_ms
            )));
        }
        Ok(ttl_ms)
    }

    fn reserve_new(
        &self,
        budget: &Arc<Budget>,
        amount: i64,
        ttl_ms: u64,
        key: Option<(&str, &str)>,
    ) -> Result<ReserveOutcome, EngineError> {
        if self.map_full.load(SeqCst) {
            return Err(self.map_full_error());
        }
        if self.outbox_depth.load(SeqCst) >= self.config.max_outbox_entries {
            return Err(EngineError::exhausted(format!(
                "{} committed usages are waiting for settlement to Stripe (max_outbox_entries): new reservations are \
                 refused until the settler catches up; check Stripe connectivity and the dead letters",
                self.config.max_outbox_entries
            )));
        }
        if budget.frozen() {
            return Ok(denied(DenyReason::Frozen, budget.remaining(), amount));
        }
        if !budget.try_open_hold(self.config.max_holds_per_budget as i64) {
            return Ok(denied(DenyReason::TooManyHolds, budget.remaining(), amount));
        }
        if !self.try_open_global_hold() {
            budget.close_hold();
            return Ok(denied(DenyReason::TooManyHolds, budget.remaining(), amount));
        }
        if !budget.try_take(amount) {
            self.close_hold(budget);
            return Ok(denied(DenyReason::InsufficientBudget, budget.remaining(), amount));
        }
        if let Err(err) = self.acquire_queue_slot() {
            budget.untake(amount);
            self.close_hold(budget);
            return Err(err);
        }
        budget.add_hold(amount);
        let hold_id = self.next_hold_id.fetch_add(1, SeqCst);
        let now_ms = self.clock.now_ms();
        let expires_ms = now_ms + ttl_ms as i64;
        let record = HoldRecord {
            customer_id: budget.customer_id.to_string(),
            amount,
            status: HoldStatus::Active,
            created_ms: now_ms,
            expires_ms,
            idempotency_key: key.map(|(_, raw)| raw.to_string()),
            committed_amount: None,
            excess: 0,
            late: false,
            resolved_ms: None,
        };
        // Took capacity: the ticket comes after the compare-and-swap. The slot goes in after the ticket, so any op
        // that finds this hold gets a later ticket than its Reserve.
        let ticket = self.take_ticket();
        let slot = HoldSlot {
            budget: budget.clone(),
            amount,
            expires_ms,
            idem_key: key.map(|(composite, _)| composite.into()),
            resolution: None,
            ticket,
        };
        let previous = self.holds.insert(hold_id, slot);
        assert!(previous.is_none(), "hold id {hold_id} was handed out twice");
        self.send(ticket, Op::Reserve { hold_id, record });
        Ok(ReserveOutcome {
            granted: true,
            reservation_id: format_reservation_id(hold_id),
            remaining: budget.remaining(),
            reason: DenyReason::None,
            expires_at_ms: expires_ms,
            replayed: false,
            amount,
            state: Some(HoldState::Active),
            ticket,
        })
    }

    fn try_open_global_hold(&self) -> bool {
        let max = self.config.max_active_holds;
        self.active_holds.fetch_update(SeqCst, SeqCst, |open| (open < max).then_some(open + 1)).is_ok()
    }

    fn close_hold(&self, budget: &Budget) {
        budget.close_hold();
        let before = self.active_holds.fetch_sub(1, SeqCst);
        assert!(before > 0, "closed more holds than were open");
    }

    fn replay_reserve(&self, hold_id: u64, amount: i64, key: &str) -> Result<ReserveOutcome, EngineError> {
        let (original, expires_ms, remaining, state, ticket) = match self.holds.get(&hold_id) {
            Some(slot) => {
                let state = slot.resolution.map_or(HoldState::Active, Resolution::state);
                (slot.amount, slot.expires_ms, slot.budget.remaining(), state, slot.ticket)
            }
            None => {
                let record = self.with_store(|store| store.get_hold(hold_id))?.ok_or_else(|| {
                    EngineError::internal(format!("idempotency key {key:?} points at hold {hold_id}, which is gone"))
                })?;
                let remaining = self.budget(&record.customer_id)?.remaining();
                let state = stored_resolution(&record)?.state();
                (record.amount, record.expires_ms, remaining, state, 0)
            }
        };
        if original != amount {
            return Err(EngineError::new(
                crate::ErrorKind::AlreadyExists,
                format!(
                    "idempotency_key {:?} was already used for a reservation of {original} units; a retry must send \
                     the same amount, a new reservation needs a new key",
                    truncate_for_message(key)
                ),
            ));
        }
        Ok(ReserveOutcome {
            granted: true,
            reservation_id: format_reservation_id(hold_id),
            remaining,
            reason: DenyReason::None,
            expires_at_ms: expires_ms,
            replayed: true,
            amount,
            state: Some(state),
            ticket,
        })
    }

    fn commit(&self, reservation_id: &str, amount: i64) -> Result<CommitOutcome, EngineError> {
        self.check_open()?;
        let hold_id = parse_reservation_id(reservation_id)?;
        validate_amount("amount", amount, 0)?;
        match self.holds.entry(hold_id) {
            Entry::Occupied(mut entry) => {
                let slot = entry.get_mut();
                match slot.resolution {
                    None => self.commit_active(slot, hold_id, amount),
                    Some(Resolution::Expired) => self.commit_late(slot, hold_id, amount),
                    Some(resolution) => replay_commit(
                        reservation_id,
                        resolution,
                        slot.amount,
                        amount,
                        slot.budget.remaining(),
                        slot.ticket,
                    ),
                }
            }
            Entry::Vacant(entry) => {
                let record = self.stored_hold(reservation_id, hold_id)?;
                let budget = self.budget(&record.customer_id)?;
                match record.status {
                    HoldStatus::Expired => {
                        let mut slot = HoldSlot {
                            budget,
                            amount: record.amount,
                            expires_ms: record.expires_ms,
                            idem_key: None,
                            resolution: Some(Resolution::Expired),
                            ticket: 0,
                        };
                        let outcome = self.commit_late(&mut slot, hold_id, amount)?;
                        entry.insert(slot);
                        Ok(outcome)
                    }
                    _ => replay_commit(
                        reservation_id,
                        stored_resolution(&record)?,
                        record.amount,
                        amount,
                        budget.remaining(),
                        0,
                    ),
                }
            }
        }
    }

    fn stored_hold(&self, reservation_id: &str, hold_id: u64) -> Result<HoldRecord, EngineError> {
        self.with_store(|store| store.get_hold(hold_id))?.ok_or_else(|| {
            EngineError::not_found(format!(
                "no reservation {reservation_id}: it never existed here, or it was resolved more than \
                 resolved_retention_ms ago"
            ))
        })
    }

    fn commit_active(&self, slot: &mut HoldSlot, hold_id: u64, amount: i64) -> Result<CommitOutcome, EngineError> {
        self.acquire_queue_slot()?;
        let budget = slot.budget.clone();
        let held = slot.amount;
        let (ticket, excess) = if amount <= held {
            // Frees capacity: ticket first, then publish.
            let ticket = self.take_ticket();
            let now_ms = self.clock.now_ms();
            self.send(ticket, Op::Commit { hold_id, amount, excess: 0, late: false, now_ms });
            let excess = budget.post(held, amount);
            assert_eq!(excess, 0);
            (ticket, 0)
        } else {
            // Takes capacity: publish first, then the ticket.
            let excess = budget.post(held, amount);
            let ticket = self.take_ticket();
            let now_ms = self.clock.now_ms();
            self.send(ticket, Op::Commit { hold_id, amount, excess, late: false, now_ms });
            (ticket, excess)
        };
        self.close_hold(&budget);
        slot.resolution = Some(Resolution::Committed { amount, excess, late: false });
        slot.ticket = ticket;
        Ok(CommitOutcome {
            charged: amount,
            remaining: budget.remaining(),
            over_reserved: amount > held,
            excess,
            replayed: false,
            hold_expired: false,
            ticket,
        })
    }

    /// The hold expired before this Commit: the LLM call happened anyway, so record the usage in full.
    fn commit_late(&self, slot: &mut HoldSlot, hold_id: u64, amount: i64) -> Result<CommitOutcome, EngineError> {
        self.acquire_queue_slot()?;
        let budget = slot.budget.clone();
        let excess = budget.post(0, amount);
        let ticket = self.take_ticket();
        let now_ms = self.clock.now_ms();
        self.send(ticket, Op::Commit { hold_id, amount, excess, late: true, now_ms });
        slot.resolution = Some(Resolution::Committed { amount, excess, late: true });
        slot.ticket = ticket;
        Ok(CommitOutcome {
            charged: amount,
            remaining: budget.remaining(),
            over_reserved: amount > slot.amount,
            excess,
            replayed: false,
            hold_expired: true,
            ticket,
        })
    }

    fn release(&self, reservation_id: &str) -> Result<ReleaseOutcome, EngineError> {
        self.check_open()?;
        let hold_id = parse_reservation_id(reservation_id)?;
        match self.holds.entry(hold_id) {
            Entry::Occupied(mut entry) => {
                let slot = entry.get_mut();
                match slot.resolution {
                    None => self.release_active(slot, hold_id),
                    Some(resolution) => {
                        replay_release(reservation_id, resolution, slot.budget.remaining(), slot.ticket)
                    }
                }
            }
            Entry::Vacant(_) => {
                let record = self.stored_hold(reservation_id, hold_id)?;
                let remaining = self.budget(&record.customer_id)?.remaining();
                replay_release(reservation_id, stored_resolution(&record)?, remaining, 0)
            }
        }
    }

    fn release_active(&self, slot: &mut HoldSlot, hold_id: u64) -> Result<ReleaseOutcome, EngineError> {
        self.acquire_queue_slot()?;
        let ticket = self.take_ticket();
        self.send(ticket, Op::Release { hold_id, now_ms: self.clock.now_ms() });
        slot.budget.free_hold(slot.amount);
        self.close_hold(&slot.budget);
        slot.resolution = Some(Resolution::Released);
        slot.ticket = ticket;
        Ok(ReleaseOutcome {
            released: true,
            remaining: slot.budget.remaining(),
            state: HoldState::Released,
            replayed: false,
            ticket,
        })
    }

    fn reap_expired(&self) -> u64 {
        if self.check_open().is_err() {
            return 0;
        }
        let now_ms = self.clock.now_ms();
        // Collect first: mutating while a DashMap iterator holds a shard lock would deadlock.
        let due: Vec<u64> = self
            .holds
            .iter()
            .filter(|entry| entry.resolution.is_none() && entry.expires_ms <= now_ms)
            .map(|entry| *entry.key())
            .collect();
        let mut expired = 0;
        for hold_id in due {
            let Some(mut slot) = self.holds.get_mut(&hold_id) else { continue };
            if slot.resolution.is_some() {
                continue;
            }
            if self.acquire_queue_slot().is_err() {
                break; // The disk is behind; the next round retries.
            }
            let ticket = self.take_ticket();
            self.send(ticket, Op::Expire { hold_id, now_ms });
            slot.budget.free_hold(slot.amount);
            self.close_hold(&slot.budget);
            slot.resolution = Some(Resolution::Expired);
            slot.ticket = ticket;
            expired += 1;
        }
        self.expired_total.fetch_add(expired, SeqCst);
        expired
    }

    fn reap_loop(self: Arc<Self>) {
        let interval = Duration::from_millis(self.config.reap_interval_ms);
        let prune_every = Duration::from_millis(self.config.prune_interval_ms);
        let mut last_prune = Instant::now();
        while !self.closing.load(SeqCst) {
            self.reap_expired();
            if last_prune.elapsed() >= prune_every && self.check_open().is_ok() && self.acquire_queue_slot().is_ok() {
                let before_ms = self.clock.now_ms() - self.config.resolved_retention_ms as i64;
                let ticket = self.take_ticket();
                self.send(ticket, Op::Prune { before_ms });
                last_prune = Instant::now();
            }
            std::thread::park_timeout(interval);
        }
    }

    fn set_budget(
        &self,
        customer_id: &str,
        limit: i64,
        stripe_customer_id: &str,
    ) -> Result<SetBudgetOutcome, EngineError> {
        self.check_open()?;
        validate_id("customer_id", customer_id)?;
        validate_amount("limit", limit, 0)?;
        if !stripe_customer_id.is_empty() {
            validate_id("stripe_customer_id", stripe_customer_id)?;
        }
        let stripe = (!stripe_customer_id.is_empty()).then(|| stripe_customer_id.to_string());
        loop {
            if let Ok(budget) = self.budget(customer_id) {
                return self.update_budget(&budget, limit, stripe);
            }
            if let Some(outcome) = self.create_budget(customer_id, limit, stripe.clone())? {
                return Ok(outcome);
            }
            // Lost a race with another creator: update the budget it made.
        }
    }

    fn update_budget(
        &self,
        budget: &Arc<Budget>,
        limit: i64,
        stripe: Option<String>,
    ) -> Result<SetBudgetOutcome, EngineError> {
        let mut admin = budget.admin.lock().expect("budget admin lock");
        self.acquire_queue_slot()?;
        let op = Op::SetBudget {
            customer_id: budget.customer_id.to_string(),
            limit,
            stripe_customer_id: stripe.clone(),
            now_ms: self.clock.now_ms(),
        };
        let ticket = if limit >= budget.limit() {
            let ticket = self.take_ticket();
            self.send(ticket, op);
            budget.shift_limit(limit);
            ticket
        } else {
            budget.shift_limit(limit);
            let ticket = self.take_ticket();
            self.send(ticket, op);
            ticket
        };
        if let Some(stripe) = stripe {
            admin.stripe_customer_id = stripe;
        }
        drop(admin);
        Ok(SetBudgetOutcome { balance: budget.view(), created: false, ticket })
    }

    fn create_budget(
        &self,
        customer_id: &str,
        limit: i64,
        stripe: Option<String>,
    ) -> Result<Option<SetBudgetOutcome>, EngineError> {
        if self.map_full.load(SeqCst) {
            return Err(self.map_full_error());
        }
        let Entry::Vacant(entry) = self.budgets.entry(customer_id.into()) else { return Ok(None) };
        if self.budget_count.load(SeqCst) >= self.config.max_budgets {
            return Err(EngineError::exhausted(format!(
                "there are already {} budgets (max_budgets); raise max_budgets or remove unused budgets",
                self.config.max_budgets
            )));
        }
        self.acquire_queue_slot()?;
        let now_ms = self.clock.now_ms();
        let record = BudgetRecord {
            limit,
            spent: 0,
            held: 0,
            overdraft: 0,
            stripe_customer_id: stripe.clone().unwrap_or_else(|| customer_id.to_string()),
            created_ms: now_ms,
            updated_ms: now_ms,
            frozen: false,
        };
        let budget = Arc::new(Budget::from_record(customer_id, &record, 0));
        // The ticket comes before the budget is visible, so every op on it is serialized after its creation.
        let ticket = self.take_ticket();
        self.send(
            ticket,
            Op::SetBudget {
                customer_id: customer_id.to_string(),
                limit,
                stripe_customer_id: Some(record.stripe_customer_id.clone()),
                now_ms,
            },
        );
        entry.insert(budget.clone());
        self.budget_count.fetch_add(1, SeqCst);
        Ok(Some(SetBudgetOutcome { balance: budget.view(), created: true, ticket }))
    }

    fn map_full_error(&self) -> EngineError {
        EngineError::exhausted(format!(
            "the LMDB map is {MAP_HIGH_WATER_PERCENT}% full ({} of {} MiB): new reservations and budgets are refused \
             so that existing holds can still commit; raise map_size_mb (--map-size-mb or SPENDGATE_MAP_SIZE_MB) and \
             restart",
            self.map_used_bytes.load(SeqCst) >> 20,
            self.map_size_bytes.load(SeqCst) >> 20
        ))
    }

    fn update_map_usage(&self, (size_bytes, used_bytes): (u64, u64)) {
        self.map_size_bytes.store(size_bytes, SeqCst);
        self.map_used_bytes.store(used_bytes, SeqCst);
        let full = used_bytes.saturating_mul(100) >= size_bytes.saturating_mul(MAP_HIGH_WATER_PERCENT);
        self.map_full.store(full, SeqCst);
    }

    /// Called by the writer after a batch is durable.
    pub(crate) fn publish_durable(&self, last_ticket: u64, ops: usize, map_usage: (u64, u64)) {
        let before = self.durable_ticket.swap(last_ticket, SeqCst);
        assert!(last_ticket > before, "durable ticket went backwards: {before} -> {last_ticket}");
        let depth_before = self.queue_depth.fetch_sub(ops as u64, SeqCst);
        assert!(depth_before >= ops as u64, "queue depth went negative");
        self.batches_total.fetch_add(1, SeqCst);
        self.ops_total.fetch_add(ops as u64, SeqCst);
        self.update_map_usage(map_usage);
        self.wake_waiters();
    }

    /// Called by the writer once an op is durable: a resolved hold no longer needs its memory slot.
    pub(crate) fn forget_resolved(&self, ticket: u64, op: &Op) {
        let hold_id = match op {
            Op::Commit { hold_id, .. } | Op::Release { hold_id, .. } | Op::Expire { hold_id, .. } => *hold_id,
            _ => return,
        };
        let removed = self.holds.remove_if(&hold_id, |_, slot| slot.ticket == ticket && slot.resolution.is_some());
        if let Some((_, slot)) = removed {
            if let Some(key) = slot.idem_key {
                self.idempotency.remove_if(key.as_ref(), |_, id| *id == hold_id);
            }
        }
    }

    pub(crate) fn outbox_grew(&self, entries: u64) {
        self.outbox_depth.fetch_add(entries, SeqCst);
    }

    pub(crate) fn outbox_shrank(&self, entries: u64) {
        let before = self.outbox_depth.fetch_sub(entries, SeqCst);
        assert!(before >= entries, "outbox depth went negative");
    }

    /// Enqueue an op that frees or takes no capacity, and return its ticket.
    fn submit(&self, op: Op) -> Result<u64, EngineError> {
        self.check_open()?;
        self.acquire_queue_slot()?;
        let ticket = self.take_ticket();
        self.send(ticket, op);
        Ok(ticket)
    }

    pub(crate) fn fail(&self, why: String) {
        *self.failure.lock().expect("failure lock") = Some(why);
        self.failed.store(true, SeqCst);
        self.wake_waiters();
    }

    pub(crate) fn writer_stopped(&self) {
        self.writer_done.store(true, SeqCst);
        self.wake_waiters();
    }

    fn wake_waiters(&self) {
        drop(self.durable_lock.lock().expect("durable lock"));
        self.durable_cv.notify_all();
        // A full pipe already says "readable"; a lost byte loses nothing.
        let _ = (&self.notify_tx).write(&[1u8]);
    }

    fn wait_durable(&self, ticket: u64, timeout: Duration) -> Result<(), EngineError> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.durable_lock.lock().expect("durable lock");
        loop {
            if self.durable_ticket.load(SeqCst) >= ticket {
                return Ok(());
            }
            if self.failed.load(SeqCst) {
                return Err(self.check_open().expect_err("failed engine reports an error"));
            }
            if self.writer_done.load(SeqCst) {
                return Err(EngineError::unavailable("the engine closed before this change was durable"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(EngineError::unavailable(format!(
                    "the change was not durable within {} ms; the disk is slow or stuck",
                    timeout.as_millis()
                )));
            }
            guard = self.durable_cv.wait_timeout(guard, deadline - now).expect("durable lock").0;
        }
    }

    fn check_invariants(&self) -> Result<(), String> {
        let mut held: std::collections::HashMap<String, (i64, i64)> = Default::default();
        for slot in self.holds.iter() {
            if slot.resolution.is_none() {
                let entry = held.entry(slot.budget.customer_id.to_string()).or_default();
                entry.0 += slot.amount;
                entry.1 += 1;
            }
        }
        for entry in self.budgets.iter() {
            let c = entry.value().counters();
            let (sum, count) = held.get(entry.key().as_ref()).copied().unwrap_or_default();
            if c.held != sum || c.active_holds != count {
                return Err(format!(
                    "{}: held {} / {} holds, but open holds sum to {sum} / {count}",
                    entry.key(),
                    c.held,
                    c.active_holds
                ));
            }
            if c.available != c.limit - c.spent - c.held {
                return Err(format!("{}: available {} != limit - spent - held ({c:?})", entry.key(), c.available));
            }
            if c.spent + c.held > c.limit + c.overdraft {
                return Err(format!("{}: spent + held > limit + overdraft ({c:?})", entry.key()));
            }
        }
        Ok(())
    }
}

fn stored_resolution(record: &HoldRecord) -> Result<Resolution, EngineError> {
    match record.status {
        HoldStatus::Committed => Ok(Resolution::Committed {
            amount: record.committed_amount.unwrap_or_default(),
            excess: record.excess,
            late: record.late,
        }),
        HoldStatus::Released => Ok(Resolution::Released),
        HoldStatus::Expired => Ok(Resolution::Expired),
        HoldStatus::Active => Err(EngineError::internal("invariant: an active hold is missing from memory")),
    }
}

fn replay_commit(
    reservation_id: &str,
    resolution: Resolution,
    held: i64,
    amount: i64,
    remaining: i64,
    ticket: u64,
) -> Result<CommitOutcome, EngineError> {
    match resolution {
        Resolution::Committed { amount: committed, excess, late } if committed == amount => Ok(CommitOutcome {
            charged: committed,
            remaining,
            over_reserved: committed > held,
            excess,
            replayed: true,
            hold_expired: late,
            ticket,
        }),
        Resolution::Committed { amount: committed, .. } => Err(EngineError::precondition(format!(
            "reservation {reservation_id} was already committed with {committed} units; a commit is final (a retry \
             must send the same amount)"
        ))),
        Resolution::Released => Err(EngineError::precondition(format!(
            "reservation {reservation_id} was released, so it cannot be committed; reserve again before the call"
        ))),
        Resolution::Expired => unreachable!("an expired hold commits late instead of replaying"),
    }
}

fn replay_release(
    reservation_id: &str,
    resolution: Resolution,
    remaining: i64,
    ticket: u64,
) -> Result<ReleaseOutcome, EngineError> {
    match resolution {
        Resolution::Released => {
            Ok(ReleaseOutcome { released: true, remaining, state: HoldState::Released, replayed: true, ticket })
        }
        Resolution::Expired => {
            Ok(ReleaseOutcome { released: false, remaining, state: HoldState::Expired, replayed: false, ticket })
        }
        Resolution::Committed { amount, .. } => Err(EngineError::precondition(format!(
            "reservation {reservation_id} was already committed with {amount} units; a committed reservation cannot \
             be released"
        ))),
    }
}

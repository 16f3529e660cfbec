//! The engine: budgets, holds and their life cycle. Every state change follows the ordering rule in lib.rs.
//!
//! - `admission.rs`: Reserve, Commit, Release and expiry (the hot paths).
//! - `policy.rs`: budget settings, periods and their roll-over, freezing, the circuit breaker, alerts.
//! - `time.rs`: the clocks (crate::clock) in the engine: the checkpoint, clock-step alerts, restored deadlines.
//! - `views.rs`: balances, usage per period, closed periods, alerts to read.
//! - `ledger.rs`: the audit trail, LMDB's ledger and the archive's, a page at a time.

mod admission;
mod credits;
mod ledger;
mod policy;
mod time;
mod views;

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use dashmap::DashMap;

use crate::alerts::{AlertKind, PendingAlert, MAX_ALERTS_BATCH};
use crate::breaker::BreakerConfig;
use crate::budget::Budget;
use crate::capacity::{mib, room_needed_bytes, MapUsage};
use crate::clock::{
    Clock, SystemClock, TimeKeeper, CLOCK_CHECKPOINT_INTERVAL_MS, MAX_CLOCK_STEP_CONFIRM_MS_CEILING,
    MAX_CLOCK_STEP_MS_CEILING,
};
use crate::error::EngineError;
use crate::hold::{truncate_for_message, DenyReason, HoldSlot, HoldState};
use crate::identity::Identity;
use crate::limits::*;
use crate::period::PeriodRule;
use crate::records::{AlertRecord, BudgetRecord, DeadLetter, Dimensions, HoldRecord, OutboxEntry, UsageDetail};
use crate::store::{idempotency_key, Store};
use crate::writer::{MapLimits, Op, Ticketed, Writer};

pub use ledger::{LedgerPage, LedgerRow, SettlementState};
use time::clock_checkpoint;

pub use credits::GrantOutcome;
pub use policy::BudgetUpdate;
pub use views::{BalanceView, UsageView};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Where the LMDB map starts; the writer grows it up to `map_max_mb` (crate::capacity).
    pub map_size_mb: u64,
    /// The most the map may grow to, in MiB; 0: whatever the disk can spare beyond `disk_reserve_mb`.
    pub map_max_mb: u64,
    /// Disk space left to everything else when `map_max_mb` is 0, and subtracted from the disk's free space always.
    pub disk_reserve_mb: u64,
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
    /// Settled ledger entries of closed periods older than this move to the archive (crate::archive).
    pub ledger_retention_days: u64,
    /// Committed usage waiting for settlement. At the bound new reservations are refused (commits of existing holds
    /// still go in), so an outage at Stripe can never fill the disk unnoticed.
    pub max_outbox_entries: u64,
    /// The period of a budget created without one.
    pub default_period: PeriodRule,
    /// The circuit breaker's defaults (a budget may set its own multiplier).
    pub breaker: BreakerConfig,
    /// A wall clock further than this from the monotonic clock's extrapolation has stepped (crate::clock).
    pub max_clock_step_ms: u64,
    /// How long (monotonic) a step must hold before periods, the breaker and timestamps follow it.
    pub clock_step_confirm_ms: u64,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.into(),
            map_size_mb: 1024,
            map_max_mb: 0,
            disk_reserve_mb: crate::capacity::DEFAULT_DISK_RESERVE_MB,
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
            ledger_retention_days: DEFAULT_LEDGER_RETENTION_DAYS,
            max_outbox_entries: 10_000_000,
            default_period: PeriodRule::CALENDAR_MONTH,
            breaker: BreakerConfig { multiplier: 10, recent_ms: 3_600_000, window_ms: 86_400_000, min_units: 0 },
            max_clock_step_ms: 1_000,
            clock_step_confirm_ms: 900_000,
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
            ("max_clock_step_ms", self.max_clock_step_ms),
            ("clock_step_confirm_ms", self.clock_step_confirm_ms),
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
        if self.map_max_mb != 0 && !(self.map_size_mb..=MAX_MAP_SIZE_MB).contains(&self.map_max_mb) {
            return Err(EngineError::invalid(format!(
                "map_max_mb is {}; it must be 0 (as much as the disk can spare) or in map_size_mb ({})..={MAX_MAP_SIZE_MB}",
                self.map_max_mb, self.map_size_mb
            )));
        }
        if self.ledger_retention_days > MAX_LEDGER_RETENTION_DAYS {
            return Err(EngineError::invalid(format!(
                "ledger_retention_days is {}; it must be at most {MAX_LEDGER_RETENTION_DAYS}",
                self.ledger_retention_days
            )));
        }
        if self.disk_reserve_mb > MAX_MAP_SIZE_MB {
            return Err(EngineError::invalid(format!(
                "disk_reserve_mb is {}; it must be at most {MAX_MAP_SIZE_MB}",
                self.disk_reserve_mb
            )));
        }
        if self.max_clock_step_ms > MAX_CLOCK_STEP_MS_CEILING {
            return Err(EngineError::invalid(format!(
                "max_clock_step_ms is {}; it must be at most {MAX_CLOCK_STEP_MS_CEILING} (a day: a larger step would \
                 go unnoticed)",
                self.max_clock_step_ms
            )));
        }
        if self.clock_step_confirm_ms > MAX_CLOCK_STEP_CONFIRM_MS_CEILING {
            return Err(EngineError::invalid(format!(
                "clock_step_confirm_ms is {}; it must be at most {MAX_CLOCK_STEP_CONFIRM_MS_CEILING} (7 days)",
                self.clock_step_confirm_ms
            )));
        }
        self.default_period.validate()?;
        self.breaker.validate()
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
    /// Granted past a limit (a budget in soft mode).
    pub over_limit: bool,
    /// The budget whose limit or freeze decided a denial, or was passed by a soft grant: the customer's own, or its
    /// org's. Empty otherwise.
    pub decided_by: String,
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
    /// Spent is past the limit after this commit (on the budget or its org).
    pub over_limit: bool,
    /// This commit tripped the circuit breaker: the budget (or its org) is now frozen.
    pub breaker_tripped: bool,
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
pub struct SetBudgetOutcome {
    pub balance: BalanceView,
    pub created: bool,
    /// The call started a new period.
    pub rolled: bool,
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
    pub map_capacity_bytes: u64,
    pub map_high_water_bytes: u64,
    pub expired_total: u64,
    pub batches_total: u64,
    pub ops_total: u64,
    pub outbox_depth: u64,
    pub breaker_trips_total: u64,
    pub periods_rolled_total: u64,
    pub alert_seq: u64,
    /// Wall-clock steps seen since the start (crate::clock).
    pub clock_steps_total: u64,
    /// The step not yet accepted (wall minus trusted time, ms), 0 while the clocks agree.
    pub clock_step_pending_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStats {
    pub depth: u64,
    pub oldest_ts_ms: Option<i64>,
    pub dead_letters: u64,
    pub max_entries: u64,
}

/// A Reserve: `amount` units for `customer_id`, optionally labelled. `fingerprint` replaces the amount in the
/// idempotency check when the amount was derived (a token estimate priced now may cost differently on a retry after
/// the price table changed).
#[derive(Debug, Clone, Default)]
pub struct ReserveArgs<'a> {
    pub customer_id: &'a str,
    pub amount: i64,
    pub idempotency_key: &'a str,
    pub ttl_ms: u64,
    pub model: &'a str,
    pub dimensions: Dimensions,
    pub fingerprint: &'a str,
}

/// A Commit: the actual `amount`, and, for a priced call, the token usage it is made of.
#[derive(Debug, Clone, Default)]
pub struct CommitArgs<'a> {
    pub reservation_id: &'a str,
    pub amount: i64,
    pub usage: Option<UsageDetail>,
    pub dimensions: Dimensions,
}

/// State shared by the calling threads, the writer and the reaper.
pub struct Shared {
    config: EngineConfig,
    /// This data dir's instance id: in every reservation id it issues, and what parses them back.
    pub(crate) identity: Identity,
    /// Engine time (holds) and trusted wall time (everything else): see crate::clock.
    clock: TimeKeeper,
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
    map_size_bytes: AtomicU64,
    map_used_bytes: AtomicU64,
    /// The most the map may grow to (crate::capacity::capacity_bytes), as the writer last measured it.
    map_capacity_bytes: AtomicU64,
    map_high_water_bytes: AtomicU64,
    expired_total: AtomicU64,
    batches_total: AtomicU64,
    ops_total: AtomicU64,
    outbox_depth: AtomicU64,
    breaker_trips_total: AtomicU64,
    periods_rolled_total: AtomicU64,
    /// The newest durable alert's sequence number (0: none).
    alert_seq: AtomicU64,
    /// The last prune or archive pass stopped at its bound: the reaper sends the next one without waiting a prune
    /// interval.
    prune_backlog: AtomicBool,
    /// The earliest end of any budget's period: the reaper looks for roll-overs only once it has passed.
    next_roll_ms: AtomicI64,
    /// Serializes linking members to orgs (admin calls only).
    hierarchy: Mutex<()>,
    /// Credit grants by idempotency key until they are durable (then LMDB's `grants` answers).
    grants: DashMap<String, credits::GrantMemo>,
}

pub struct Engine {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    reaper: Mutex<Option<JoinHandle<()>>>,
    notify_rx: UnixStream,
    /// Held until close: one process owns the environment.
    lock_file: Mutex<Option<File>>,
    /// The archive files' member indexes, built as list_ledger reads them.
    archive_index: Mutex<ledger::ArchiveIndexes>,
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
        let map_usage = store.map_usage(config.map_max_mb, config.disk_reserve_mb)?;
        let checkpoint = clock_checkpoint(&store)?;
        let (clock, first_event) =
            TimeKeeper::open(clock, checkpoint.as_ref(), config.max_clock_step_ms, config.clock_step_confirm_ms);
        let shared = Arc::new(Shared {
            clock,
            store: std::sync::RwLock::new(Some(store.clone())),
            budgets: DashMap::new(),
            holds: DashMap::new(),
            idempotency: DashMap::new(),
            tx,
            identity: recovered.identity,
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
            map_size_bytes: AtomicU64::new(map_usage.size_bytes),
            map_used_bytes: AtomicU64::new(map_usage.used_bytes),
            map_capacity_bytes: AtomicU64::new(map_usage.capacity_bytes),
            map_high_water_bytes: AtomicU64::new(map_usage.high_water_bytes),
            expired_total: AtomicU64::new(0),
            batches_total: AtomicU64::new(0),
            ops_total: AtomicU64::new(0),
            outbox_depth: AtomicU64::new(recovered.outbox_depth),
            breaker_trips_total: AtomicU64::new(0),
            periods_rolled_total: AtomicU64::new(0),
            alert_seq: AtomicU64::new(recovered.next_alert_seq - 1),
            prune_backlog: AtomicBool::new(false),
            next_roll_ms: AtomicI64::new(i64::MAX),
            hierarchy: Mutex::new(()),
            grants: DashMap::new(),
            config,
        });
        shared.rebuild(recovered.budgets, recovered.active_holds, checkpoint.is_some())?;
        let map_limits =
            MapLimits { map_max_mb: shared.config.map_max_mb, disk_reserve_mb: shared.config.disk_reserve_mb };
        let writer = Writer::new(
            shared.clone(),
            store,
            rx,
            recovered.next_ledger_seq,
            recovered.next_alert_seq,
            map_limits,
            map_usage,
        );
        let writer = std::thread::Builder::new()
            .name("spendgate-writer".into())
            .spawn(move || writer.run())
            .map_err(|err| EngineError::internal(format!("cannot start the writer thread: {err}")))?;
        // Before any op that uses this run's engine time: a durable hold's deadline implies a durable timeline.
        shared.save_clock()?;
        if let Some(event) = first_event {
            shared.clock_event(event);
        }
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
            archive_index: Mutex::new(Default::default()),
        })
    }

    pub fn reserve(
        &self,
        customer_id: &str,
        amount: i64,
        key: &str,
        ttl_ms: u64,
    ) -> Result<ReserveOutcome, EngineError> {
        self.shared.reserve(&ReserveArgs { customer_id, amount, idempotency_key: key, ttl_ms, ..Default::default() })
    }

    pub fn reserve_with(&self, args: &ReserveArgs<'_>) -> Result<ReserveOutcome, EngineError> {
        self.shared.reserve(args)
    }

    /// What a Reserve of `amount` would answer now, without holding anything (Budget.Quote): same checks, same
    /// order, nothing changed. A granted quote has no reservation id; `ticket` is 0.
    pub fn quote(&self, customer_id: &str, amount: i64) -> Result<ReserveOutcome, EngineError> {
        self.shared.quote(customer_id, amount)
    }

    pub fn commit(&self, reservation_id: &str, amount: i64) -> Result<CommitOutcome, EngineError> {
        self.shared.commit(CommitArgs { reservation_id, amount, ..Default::default() })
    }

    pub fn commit_with(&self, args: CommitArgs<'_>) -> Result<CommitOutcome, EngineError> {
        self.shared.commit(args)
    }

    pub fn release(&self, reservation_id: &str) -> Result<ReleaseOutcome, EngineError> {
        self.shared.release(reservation_id)
    }

    /// The model a Reserve priced ("" when it gave a plain amount), so that a Commit of token usage without a model
    /// is priced for the model it reserved for. NOT_FOUND for an unknown (or pruned) reservation.
    pub fn hold_model(&self, reservation_id: &str) -> Result<String, EngineError> {
        let hold_id = self.shared.identity.parse(reservation_id)?;
        if let Some(slot) = self.shared.holds.get(&hold_id) {
            return Ok(slot.extras.as_ref().map(|extras| extras.model.clone()).unwrap_or_default());
        }
        Ok(self.shared.stored_hold(reservation_id, hold_id)?.model)
    }

    pub fn set_budget(
        &self,
        customer_id: &str,
        limit: i64,
        stripe_customer_id: &str,
    ) -> Result<SetBudgetOutcome, EngineError> {
        let stripe_customer_id = (!stripe_customer_id.is_empty()).then(|| stripe_customer_id.to_string());
        self.shared
            .update_budget(customer_id, &BudgetUpdate { limit: Some(limit), stripe_customer_id, ..Default::default() })
    }

    /// Create a budget or change any of its settings; what `update` leaves None stays as it is.
    pub fn update_budget(&self, customer_id: &str, update: &BudgetUpdate) -> Result<SetBudgetOutcome, EngineError> {
        self.shared.update_budget(customer_id, update)
    }

    /// Add `amount` credits to a budget's limit, once per idempotency key (Admin.GrantCredits; see credits.rs).
    pub fn grant_credits(
        &self,
        customer_id: &str,
        amount: i64,
        idempotency_key: &str,
        reason: &str,
    ) -> Result<GrantOutcome, EngineError> {
        self.shared.grant_credits(customer_id, amount, idempotency_key, reason)
    }

    /// Freeze (deny every Reserve) or unfreeze a budget, by an operator. Commits of existing holds still post.
    pub fn set_frozen(&self, customer_id: &str, frozen: bool) -> Result<SetBudgetOutcome, EngineError> {
        self.freeze(customer_id, frozen, "frozen by an operator (Admin.FreezeBudget)")
    }

    /// Freeze or unfreeze, saying who and why; raises a frozen or unfrozen alert when it changes anything.
    pub fn freeze(&self, customer_id: &str, frozen: bool, reason: &str) -> Result<SetBudgetOutcome, EngineError> {
        validate_id("customer_id", customer_id)?;
        validate_reason(reason)?;
        let budget = self.shared.budget(customer_id)?;
        self.shared.freeze(&budget, frozen, reason)
    }

    /// Start the periods that have ended (the reaper does this by itself every reap interval), after comparing the
    /// wall clock with the monotonic clock as the reaper does. Returns how many.
    pub fn roll_due(&self) -> u64 {
        self.shared.observe_clock();
        self.shared.roll_due()
    }

    /// The trusted wall time (crate::clock): what periods, the breaker and timestamps go by.
    pub fn now_ms(&self) -> i64 {
        self.shared.clock.now_ms()
    }

    /// Record an alert raised outside the engine (a settlement dead letter, ...). Returns its durability ticket.
    pub fn raise_alert(
        &self,
        kind: &str,
        customer_id: &str,
        message: &str,
        values: &[(&str, i64)],
    ) -> Result<u64, EngineError> {
        let kind = AlertKind::parse(kind).filter(|kind| AlertKind::RAISED_OUTSIDE.contains(kind)).ok_or_else(|| {
            let outside: Vec<&str> = AlertKind::RAISED_OUTSIDE.iter().map(|kind| kind.as_str()).collect();
            EngineError::invalid(format!(
                "alert kind {kind:?} cannot be raised from outside the engine (it decides the budget kinds itself, \
                 and freeze() raises frozen and unfrozen); use one of {}",
                outside.join(", ")
            ))
        })?;
        validate_id("customer_id", customer_id)?;
        let alert = PendingAlert::new(kind, customer_id, self.shared.clock.now_ms(), message.to_string(), values);
        self.shared.submit(Op::Alert(Box::new(alert)))
    }

    /// Durable alerts after `after_seq`, oldest first.
    pub fn alerts_after(&self, after_seq: u64, limit: usize) -> Result<Vec<AlertRecord>, EngineError> {
        if limit == 0 || limit > MAX_ALERTS_BATCH {
            return Err(EngineError::invalid(format!("limit is {limit}; pass 1..={MAX_ALERTS_BATCH}")));
        }
        self.shared.with_store(|store| store.alerts_after(after_seq, limit))
    }

    /// The newest durable alert's sequence number (0: none yet).
    pub fn alert_seq(&self) -> u64 {
        self.shared.alert_seq.load(SeqCst)
    }

    /// The alert webhook's delivery cursor: every alert up to it was delivered.
    pub fn alert_cursor(&self) -> Result<u64, EngineError> {
        self.shared.with_store(|store| store.alert_cursor())
    }

    /// Replace the document `name` (the Stripe webhooks' state): applied in ticket order after every change
    /// submitted before it, so any durable state (after a crash, in a backup) that holds the document holds those
    /// changes too. Returns the ticket to wait for.
    pub fn put_document(&self, name: &str, body: &str) -> Result<u64, EngineError> {
        if name.is_empty() || name.len() > MAX_DOCUMENT_NAME_BYTES {
            return Err(EngineError::invalid(format!(
                "document name {:?} must be 1..={MAX_DOCUMENT_NAME_BYTES} bytes",
                truncate_for_message(name)
            )));
        }
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(EngineError::invalid(format!(
                "document {name:?} is {} bytes, more than {MAX_DOCUMENT_BYTES}",
                body.len()
            )));
        }
        self.shared.submit(Op::PutDocument { name: name.to_string(), body: body.to_string() })
    }

    /// The durable body of document `name`, or None.
    pub fn document(&self, name: &str) -> Result<Option<String>, EngineError> {
        self.shared.with_store(|store| store.document(name))
    }

    pub fn set_alert_cursor(&self, seq: u64) -> Result<u64, EngineError> {
        self.shared.submit(Op::AlertCursor { seq })
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

    /// Stripe refused these for good: move them to the dead letters with the reason. `fate_unknown`: the events
    /// may be at Stripe already (an earlier send went unanswered), so a requeue needs `confirmed_missing`.
    pub fn outbox_dead_letter(&self, seqs: &[u64], reason: &str, fate_unknown: bool) -> Result<u64, EngineError> {
        check_batch("seqs", seqs.len())?;
        validate_reason(reason)?;
        let now_ms = self.shared.clock.now_ms();
        let reason = reason.to_string();
        self.shared.submit(Op::OutboxDeadLetter { seqs: seqs.to_vec(), reason, fate_unknown, now_ms })
    }

    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, EngineError> {
        check_batch("limit", limit)?;
        self.shared.with_store(|store| store.dead_letter_head(limit))
    }

    /// Put a dead letter back in the outbox under a fresh identifier (Stripe keeps the identifiers it refused).
    /// A letter whose event may be at Stripe already is requeued only with `confirmed_missing`: under a fresh
    /// identifier Stripe would count it again.
    pub fn dead_letter_requeue(&self, seq: u64, confirmed_missing: bool) -> Result<u64, EngineError> {
        let letter = self.shared.with_store(|store| {
            let rtxn = store.read_txn()?;
            Ok(store.dead_letters.get(&rtxn, &seq)?)
        })?;
        let Some(letter) = letter else {
            return Err(EngineError::not_found(format!(
                "no dead letter with seq {seq}; list them with dead_letters()"
            )));
        };
        if letter.fate_unknown && !confirmed_missing {
            return Err(EngineError::precondition(format!(
                "dead letter {seq} ({}) may already be at Stripe: it was sent before, or came back with a restore. \
                 A requeue sends it under a fresh identifier, which Stripe would count again. Run `spendgate \
                 reconcile` for customer {}; only if it shows this usage missing, requeue with confirmed_missing \
                 (the CLI's --confirmed-missing)",
                letter.entry.identifier, letter.entry.customer_id
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
    /// Returns the copy's size in bytes. Restore it with `spendgate restore`.
    ///
    /// The copy holds every customer's ledger, so it is made like the live file: mode 0600, created exclusively
    /// (never truncating or following a symlink planted at its name), in a directory that is really empty.
    pub fn backup(&self, dest_dir: &std::path::Path) -> Result<u64, EngineError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if !dest_dir.is_absolute() {
            return Err(EngineError::invalid(format!(
                "backup destination {} is relative; pass an absolute path on the sidecar's machine",
                dest_dir.display()
            )));
        }
        match std::fs::read_dir(dest_dir).map(|mut entries| entries.next().is_some()) {
            Ok(true) => {
                return Err(EngineError::invalid(format!(
                    "backup destination {} is not empty; pass a new or empty directory",
                    dest_dir.display()
                )))
            }
            Ok(false) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dest_dir).map_err(|err| {
                    EngineError::invalid(format!("cannot create backup directory {}: {err}", dest_dir.display()))
                })?;
            }
            Err(err) => {
                return Err(EngineError::invalid(format!(
                    "cannot read backup destination {}: {err}; pass a directory the sidecar can read and write",
                    dest_dir.display()
                )))
            }
        }
        let path = dest_dir.join("data.mdb");
        let mut file = File::options()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600) // create_new is O_CREAT|O_EXCL: it fails on any existing name, a symlink included
            .open(&path)
            .map_err(|err| {
                EngineError::invalid(format!("cannot create {} (it must not exist yet): {err}", path.display()))
            })?;
        self.shared.with_store(|store| store.copy_to_file(&mut file))?;
        file.sync_all().map_err(|err| EngineError::internal(format!("fsync of {}: {err}", path.display())))?;
        let size_bytes =
            file.metadata().map_err(|err| EngineError::internal(format!("{}: {err}", path.display())))?.len();
        let data_dir = self.shared.with_store(|store| Ok(store.dir().to_path_buf()))?;
        let archive_bytes = crate::archive::copy_all(&data_dir, dest_dir)?;
        Ok(size_bytes + archive_bytes)
    }

    /// This data dir's instance id (in every reservation id it issues).
    pub fn instance_id(&self) -> u64 {
        self.shared.identity.instance_id
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
            map_capacity_bytes: s.map_capacity_bytes.load(SeqCst),
            map_high_water_bytes: s.map_high_water_bytes.load(SeqCst),
            expired_total: s.expired_total.load(SeqCst),
            batches_total: s.batches_total.load(SeqCst),
            ops_total: s.ops_total.load(SeqCst),
            outbox_depth: s.outbox_depth.load(SeqCst),
            breaker_trips_total: s.breaker_trips_total.load(SeqCst),
            periods_rolled_total: s.periods_rolled_total.load(SeqCst),
            alert_seq: s.alert_seq.load(SeqCst),
            clock_steps_total: s.clock.steps_total(),
            clock_step_pending_ms: s.clock.pending_step_ms(),
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
        // The last checkpoint and Shutdown bypass the queue bound: they must always get through.
        for op in [s.clock_op(), Op::Shutdown] {
            let ticket = s.last_ticket.fetch_add(1, SeqCst) + 1;
            s.queue_depth.fetch_add(1, SeqCst);
            let _ = s.tx.send(Ticketed { ticket, op });
        }
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

pub(crate) fn validate_id(field: &str, value: &str) -> Result<(), EngineError> {
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

fn validate_reason(reason: &str) -> Result<(), EngineError> {
    if reason.is_empty() || reason.len() > MAX_REASON_BYTES {
        return Err(EngineError::invalid(format!(
            "reason is {} bytes; give a reason of 1..={MAX_REASON_BYTES} bytes",
            reason.len()
        )));
    }
    Ok(())
}

pub(crate) fn validate_amount(field: &str, value: i64, min: i64) -> Result<(), EngineError> {
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

impl Shared {
    /// `timeline_known`: the data dir has a clock checkpoint, so the holds' engine-time deadlines are on this run's
    /// timeline.
    fn rebuild(
        &self,
        budgets: Vec<(String, BudgetRecord)>,
        active: Vec<(u64, HoldRecord)>,
        timeline_known: bool,
    ) -> Result<(), EngineError> {
        // An org's held and open holds include its members' holds.
        let mut per_budget: std::collections::HashMap<&str, (i64, i64)> = Default::default();
        for (_, hold) in &active {
            for customer_id in std::iter::once(&hold.customer_id).chain(hold.parent.as_ref()) {
                let entry = per_budget.entry(customer_id.as_str()).or_default();
                entry.0 += hold.amount;
                entry.1 += 1;
            }
        }
        let mut next_roll_ms = i64::MAX;
        for (customer_id, record) in &budgets {
            let (held, count) = per_budget.get(customer_id.as_str()).copied().unwrap_or_default();
            if held != record.held {
                return Err(EngineError::internal(format!(
                    "the data dir is inconsistent: budget {customer_id:?} records held={} but its active holds sum \
                     to {held}; restore from a backup",
                    record.held
                )));
            }
            next_roll_ms = next_roll_ms.min(record.period_end_ms);
            let budget = Arc::new(Budget::from_record(customer_id, record, count));
            self.budgets.insert(customer_id.as_str().into(), budget);
        }
        self.next_roll_ms.store(next_roll_ms, SeqCst);
        for (customer_id, record) in &budgets {
            if let Some(parent_id) = &record.parent {
                let parent = self.budget(parent_id).map_err(|_| {
                    EngineError::internal(format!(
                        "the data dir is inconsistent: budget {customer_id:?} names a missing org {parent_id:?}"
                    ))
                })?;
                parent.members.fetch_add(1, SeqCst);
                let member = self.budget(customer_id)?;
                assert!(member.parent.set(parent).is_ok(), "{customer_id} linked to its org twice");
            }
        }
        self.budget_count.store(budgets.len() as u64, SeqCst);
        for (hold_id, hold) in active {
            self.restore_hold(hold_id, hold, timeline_known)?;
        }
        Ok(())
    }

    fn restore_hold(&self, hold_id: u64, hold: HoldRecord, timeline_known: bool) -> Result<(), EngineError> {
        let missing =
            || EngineError::internal(format!("the data dir is inconsistent: hold {hold_id} names a missing budget"));
        let budget = self.budget(&hold.customer_id).map_err(|_| missing())?;
        let parent = match &hold.parent {
            Some(parent_id) => Some(self.budget(parent_id).map_err(|_| missing())?),
            None => None,
        };
        let idem_key = hold.idempotency_key.as_ref().map(|key| idempotency_key(&hold.customer_id, key));
        if let Some(key) = &idem_key {
            self.idempotency.insert(key.clone(), hold_id);
        }
        let slot = HoldSlot {
            budget,
            parent,
            extras: crate::hold::HoldExtras::boxed(&hold.model, &hold.dimensions, &hold.fingerprint),
            amount: hold.amount,
            expires_ms: hold.expires_ms,
            deadline_mono_ms: self.restored_deadline(&hold, timeline_known),
            idem_key: idem_key.map(String::into_boxed_str),
            resolution: None,
            ticket: 0,
        };
        self.holds.insert(hold_id, slot);
        self.active_holds.fetch_add(1, SeqCst);
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

    /// Enqueue an op that frees or takes no capacity, and return its ticket.
    fn submit(&self, op: Op) -> Result<u64, EngineError> {
        self.check_open()?;
        self.acquire_queue_slot()?;
        let ticket = self.take_ticket();
        self.send(ticket, op);
        Ok(ticket)
    }

    /// Enqueue an alert without waiting for it. False when it could not be queued (a full queue, a closing engine):
    /// the caller then re-arms the budget's flag, so that the next call finding the condition raises it again (as
    /// after a crash before the alert was durable: the flag was not persisted either).
    fn raise(&self, alert: PendingAlert) -> bool {
        self.submit(Op::Alert(Box::new(alert))).is_ok()
    }

    pub(crate) fn breaker_config(&self) -> BreakerConfig {
        self.config.breaker
    }

    /// Refuse new work (a hold, a budget) that would leave the map too little room for what is already granted:
    /// every open hold's resolution and every outbox entry's acknowledgement (crate::capacity).
    fn check_map_room(&self, new_work_bytes: u64) -> Result<(), EngineError> {
        let used = self.map_used_bytes.load(SeqCst);
        let capacity = self.map_capacity_bytes.load(SeqCst);
        let needed = room_needed_bytes(self.active_holds.load(SeqCst), self.outbox_depth.load(SeqCst))
            .saturating_add(new_work_bytes);
        if used.saturating_add(needed) <= capacity {
            return Ok(());
        }
        Err(EngineError::exhausted(format!(
            "the data may grow to {} MiB (map_max_mb, or the disk's free space past disk_reserve_mb) and uses {} MiB; \
             the {} open holds and {} unsettled commits may still need {} MiB, so new reservations, budgets and credit \
             grants are refused while commits and releases go on. Free disk space or raise map_max_mb; settled history is \
             archived after ledger_retention_days",
            mib(capacity),
            mib(used),
            self.active_holds.load(SeqCst),
            self.outbox_depth.load(SeqCst),
            mib(needed)
        )))
    }

    fn update_map_usage(&self, usage: MapUsage) {
        self.map_size_bytes.store(usage.size_bytes, SeqCst);
        self.map_used_bytes.store(usage.used_bytes, SeqCst);
        self.map_capacity_bytes.store(usage.capacity_bytes, SeqCst);
        self.map_high_water_bytes.store(usage.high_water_bytes, SeqCst);
    }

    /// Called by the writer after a batch is durable.
    pub(crate) fn publish_durable(&self, last_ticket: u64, ops: usize, map_usage: MapUsage, alert_seq: u64) {
        let alert_before = self.alert_seq.swap(alert_seq, SeqCst);
        assert!(alert_seq >= alert_before, "alert seq went backwards: {alert_before} -> {alert_seq}");
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
            Op::Grant(grant) => return self.forget_grant(ticket, &grant.key),
            Op::Commit(commit) => commit.hold_id,
            Op::Release { hold_id, .. } | Op::Expire { hold_id, .. } => *hold_id,
            _ => return,
        };
        let removed = self.holds.remove_if(&hold_id, |_, slot| slot.ticket == ticket && slot.resolution.is_some());
        if let Some((_, slot)) = removed {
            if let Some(key) = slot.idem_key {
                self.idempotency.remove_if(key.as_ref(), |_, id| *id == hold_id);
            }
        }
    }

    pub(crate) fn set_prune_backlog(&self, backlog: bool) {
        self.prune_backlog.store(backlog, SeqCst);
    }

    pub(crate) fn outbox_grew(&self, entries: u64) {
        self.outbox_depth.fetch_add(entries, SeqCst);
    }

    pub(crate) fn outbox_shrank(&self, entries: u64) {
        let before = self.outbox_depth.fetch_sub(entries, SeqCst);
        assert!(before >= entries, "outbox depth went negative");
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

    fn reap_loop(self: Arc<Self>) {
        let interval = Duration::from_millis(self.config.reap_interval_ms);
        let prune_every = Duration::from_millis(self.config.prune_interval_ms);
        let checkpoint_every = Duration::from_millis(CLOCK_CHECKPOINT_INTERVAL_MS);
        let mut last_prune = Instant::now();
        let mut prune_ticket = 0;
        let mut last_checkpoint = Instant::now();
        while !self.closing.load(SeqCst) {
            self.observe_clock();
            self.reap_expired();
            self.roll_due();
            if last_checkpoint.elapsed() >= checkpoint_every && self.save_clock().is_ok() {
                last_checkpoint = Instant::now();
            }
            // One prune in flight at a time: a pass slower than the interval must not pile up ahead of commits.
            let idle = self.durable_ticket.load(SeqCst) >= prune_ticket;
            let due = idle && (last_prune.elapsed() >= prune_every || self.prune_backlog.swap(false, SeqCst));
            if due && self.check_open().is_ok() && self.acquire_queue_slot().is_ok() {
                let now_ms = self.clock.now_ms();
                let before_ms = now_ms - self.config.resolved_retention_ms as i64;
                let archive_before_ms = now_ms - self.config.ledger_retention_days as i64 * crate::period::DAY_MS;
                let ticket = self.take_ticket();
                self.send(ticket, Op::Prune { before_ms, archive_before_ms });
                prune_ticket = ticket;
                last_prune = Instant::now();
            }
            std::thread::park_timeout(interval);
        }
    }

    fn check_invariants(&self) -> Result<(), String> {
        let mut held: std::collections::HashMap<String, (i64, i64)> = Default::default();
        for slot in self.holds.iter() {
            if slot.resolution.is_none() {
                for budget in std::iter::once(&slot.budget).chain(slot.parent.as_ref()) {
                    let entry = held.entry(budget.customer_id.to_string()).or_default();
                    entry.0 += slot.amount;
                    entry.1 += 1;
                }
            }
        }
        for entry in self.budgets.iter() {
            let budget = entry.value();
            let c = budget.counters();
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
            // Only a soft-mode grant or a limit cut below what was already spent and held may pass the limit.
            if c.spent + c.held > c.limit + c.overdraft && !budget.soft_mode() && !budget.limit_was_cut() {
                return Err(format!("{}: spent + held > limit + overdraft ({c:?})", entry.key()));
            }
        }
        Ok(())
    }
}

/// Give a data dir that is not being served (a restore's verified copy) a new instance id: see
/// `Store::renew_identity`. Takes the data dir's lock like `Engine::open`.
pub fn renew_identity(data_dir: &std::path::Path, map_size_mb: u64, now_ms: i64) -> Result<u64, EngineError> {
    let _lock = lock_data_dir(data_dir)?;
    let store = Store::open(data_dir, map_size_mb, false)?;
    let identity = store.renew_identity(now_ms)?;
    drop(store);
    Ok(identity.instance_id)
}

//! The LMDB environment and its schema (through heed). One `Store` per process; only the writer thread writes.

use std::ops::Deref;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use heed::byteorder::BigEndian;
use heed::types::{SerdeJson, Str, U64};
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};

use crate::capacity::{capacity_bytes, disk_free_bytes, MapUsage};
use crate::error::EngineError;
use crate::identity::{random_instance_id, Identity};
use crate::limits::{MAX_DBS, MAX_MAP_SIZE_MB, MIN_MAP_SIZE_MB};
use crate::records::{
    AlertRecord, BudgetRecord, DeadLetter, GrantRecord, HoldRecord, HoldStatus, LedgerEntry, OutboxEntry, PeriodRecord,
    UsageRecord, SCHEMA_VERSION,
};

pub type Key64 = U64<BigEndian>;

const META_SCHEMA_VERSION: &str = "schema_version";
const META_NEXT_HOLD_ID: &str = "next_hold_id";
/// The next ledger sequence number: the ledger's last entry may have been archived, and a seq is never reused.
const META_NEXT_LEDGER_SEQ: &str = "next_ledger_seq";
/// The data dir's random instance id (crate::identity), made with it and renewed by every restore.
const META_INSTANCE_ID: &str = "instance_id";
/// Holds below this id were issued before the data dir had an instance id (see Identity::legacy_holds_below).
const META_LEGACY_HOLDS_BELOW: &str = "legacy_holds_below";
/// The highest alert sequence number the alert webhook delivered.
pub const META_ALERT_CURSOR: &str = "alert_webhook_cursor";
/// Schema versions this build reads (older ones are upgraded in place on open).
const READABLE_SCHEMA_VERSIONS: [u64; 2] = [1, 2];

#[derive(Clone)]
pub struct Store {
    pub env: Env<WithoutTls>,
    pub meta: Database<Str, SerdeJson<u64>>,
    pub budgets: Database<Str, SerdeJson<BudgetRecord>>,
    pub holds: Database<Key64, SerdeJson<HoldRecord>>,
    pub idempotency: Database<Str, Key64>,
    pub ledger: Database<Key64, SerdeJson<LedgerEntry>>,
    pub outbox: Database<Key64, SerdeJson<OutboxEntry>>,
    pub dead_letters: Database<Key64, SerdeJson<DeadLetter>>,
    /// Closed periods, by `period_key(customer, start)`.
    pub periods: Database<Str, SerdeJson<PeriodRecord>>,
    /// Usage per budget and period, by `period_key(customer, start)`.
    pub usage: Database<Str, SerdeJson<UsageRecord>>,
    pub alerts: Database<Key64, SerdeJson<AlertRecord>>,
    /// Small documents of the layers above, by name (the Stripe webhooks' state), so that they share the engine's
    /// durability and its backups.
    pub documents: Database<Str, Str>,
    /// Credit grants by idempotency key (Admin.GrantCredits), kept like the ledger they are in.
    pub grants: Database<Str, SerdeJson<GrantRecord>>,
    page_size_bytes: u64,
    /// Read transactions hold it shared; a map resize takes it exclusively, because LMDB requires that no
    /// transaction of this process is active while the map changes size (mdb_env_set_mapsize).
    resize_lock: Arc<RwLock<()>>,
    dir: std::path::PathBuf,
}

/// A read transaction that keeps the map from being resized under it. Fields drop in order: the transaction ends
/// before the guard is released.
pub struct ReadTxn<'a> {
    txn: RoTxn<'a, WithoutTls>,
    _resize: RwLockReadGuard<'a, ()>,
}

impl<'a> Deref for ReadTxn<'a> {
    type Target = RoTxn<'a, WithoutTls>;
    fn deref(&self) -> &Self::Target {
        &self.txn
    }
}

/// How long the writer waits for read transactions to end before it gives up one attempt to resize the map. Readers
/// are short (one lookup or one page of a listing), so this is only ever reached under a stuck reader.
const RESIZE_WAIT_MS: u64 = 2_000;
const MIB: u64 = 1024 * 1024;

/// Everything the engine needs to rebuild its counters after a start.
pub struct Recovered {
    pub identity: Identity,
    pub budgets: Vec<(String, BudgetRecord)>,
    pub active_holds: Vec<(u64, HoldRecord)>,
    pub next_hold_id: u64,
    pub next_ledger_seq: u64,
    pub outbox_depth: u64,
    pub next_alert_seq: u64,
}

impl Store {
    /// `relaxed`: no fsync per transaction. Survives kill -9 (the OS has the pages), not power loss.
    pub fn open(dir: &Path, map_size_mb: u64, relaxed: bool) -> Result<Store, EngineError> {
        if !(MIN_MAP_SIZE_MB..=MAX_MAP_SIZE_MB).contains(&map_size_mb) {
            return Err(EngineError::invalid(format!(
                "map_size_mb is {map_size_mb}; it must be in {MIN_MAP_SIZE_MB}..={MAX_MAP_SIZE_MB}"
            )));
        }
        std::fs::create_dir_all(dir).map_err(|err| {
            EngineError::invalid(format!("cannot create data dir {}: {err}; pass a writable --data-dir", dir.display()))
        })?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(usize::try_from(map_size_mb * 1024 * 1024).expect("map size fits in usize"));
        options.max_dbs(MAX_DBS);
        if relaxed {
            // SAFETY: NO_SYNC only drops the fsync; the pages still reach the OS with each commit.
            unsafe { options.flags(EnvFlags::NO_SYNC) };
        }
        // SAFETY: one Store per process owns this environment (the engine checks a lock file), and nothing else in
        // this process opens it.
        let env = unsafe { options.open(dir) }.map_err(|err| match err {
            heed::Error::Io(io) => EngineError::invalid(format!("cannot open LMDB in {}: {io}", dir.display())),
            other => EngineError::from(other),
        })?;
        let mut wtxn = env.write_txn()?;
        let meta = env.create_database(&mut wtxn, Some("meta"))?;
        let budgets = env.create_database(&mut wtxn, Some("budgets"))?;
        let holds = env.create_database(&mut wtxn, Some("holds"))?;
        let idempotency = env.create_database(&mut wtxn, Some("idempotency"))?;
        let ledger = env.create_database(&mut wtxn, Some("ledger"))?;
        let outbox = env.create_database(&mut wtxn, Some("outbox"))?;
        let dead_letters = env.create_database(&mut wtxn, Some("dead_letters"))?;
        let periods = env.create_database(&mut wtxn, Some("periods"))?;
        let usage = env.create_database(&mut wtxn, Some("usage"))?;
        let alerts = env.create_database(&mut wtxn, Some("alerts"))?;
        let documents = env.create_database(&mut wtxn, Some("documents"))?;
        let grants = env.create_database(&mut wtxn, Some("grants"))?;
        let page_size_bytes = u64::from(budgets.stat(&wtxn)?.page_size);
        let store = Store {
            env: env.clone(),
            meta,
            budgets,
            holds,
            idempotency,
            ledger,
            outbox,
            dead_letters,
            periods,
            usage,
            alerts,
            documents,
            grants,
            page_size_bytes,
            resize_lock: Arc::new(RwLock::new(())),
            dir: dir.to_path_buf(),
        };
        store.check_schema(&mut wtxn)?;
        store.ensure_identity(&mut wtxn)?;
        wtxn.commit()?;
        Ok(store)
    }

    fn check_schema(&self, wtxn: &mut RwTxn) -> Result<(), EngineError> {
        match self.meta.get(wtxn, META_SCHEMA_VERSION)? {
            // Version 1 reads as 2: its records lack only fields that default (a lifetime period, no policy).
            None | Some(1) => self.meta.put(wtxn, META_SCHEMA_VERSION, &u64::from(SCHEMA_VERSION))?,
            Some(found) if READABLE_SCHEMA_VERSIONS.contains(&found) => {}
            Some(found) => {
                return Err(EngineError::precondition(format!(
                    "the data dir has schema version {found}, this build reads {SCHEMA_VERSION}; \
                     use a spendgate release that matches the data"
                )))
            }
        }
        Ok(())
    }

    /// Give a data dir without an instance id one. A data dir that already issued holds (made before instance ids)
    /// keeps accepting those holds' ids, and its entries never sent yet are renamed to carry the new instance id; an
    /// entry already sent keeps its identifier, so that a resend is still a duplicate at Stripe.
    fn ensure_identity(&self, wtxn: &mut RwTxn) -> Result<(), EngineError> {
        if self.meta.get(wtxn, META_INSTANCE_ID)?.is_some() {
            return Ok(());
        }
        let issued_below = self.meta.get(wtxn, META_NEXT_HOLD_ID)?.unwrap_or(0);
        let max_hold = self.holds.last(wtxn)?.map_or(0, |(hold_id, _)| hold_id + 1);
        let identity = Identity { instance_id: random_instance_id()?, legacy_holds_below: issued_below.max(max_hold) };
        self.put_identity(wtxn, identity)?;
        let seqs: Vec<u64> = self.outbox.iter(wtxn)?.map(|item| item.map(|(seq, _)| seq)).collect::<Result<_, _>>()?;
        for seq in seqs {
            let Some(mut entry) = self.outbox.get(wtxn, &seq)? else { continue };
            if entry.sent_as.is_some() || entry.first_attempt_ms.is_some() {
                continue; // it may be at Stripe under its old identifier: a resend must repeat it
            }
            if let Some(renamed) = legacy_identifier_renamed(&entry.identifier, &identity) {
                entry.identifier = renamed;
                self.outbox.put(wtxn, &seq, &entry)?;
            }
        }
        Ok(())
    }

    /// A new instance id for a data dir that is being restored from a backup: every id it issues from now on differs
    /// from every id issued before, by it or by the data dir the backup was taken from. Old reservation ids are all
    /// refused, and the outbox entries of the backup are marked as possibly at Stripe already.
    pub fn renew_identity(&self, now_ms: i64) -> Result<Identity, EngineError> {
        let mut wtxn = self.env.write_txn()?;
        let identity = Identity { instance_id: random_instance_id()?, legacy_holds_below: 0 };
        self.put_identity(&mut wtxn, identity)?;
        let seqs: Vec<u64> = self.outbox.iter(&wtxn)?.map(|item| item.map(|(seq, _)| seq)).collect::<Result<_, _>>()?;
        for seq in seqs {
            let Some(mut entry) = self.outbox.get(&wtxn, &seq)? else { continue };
            entry.restored_ms.get_or_insert(now_ms);
            self.outbox.put(&mut wtxn, &seq, &entry)?;
        }
        wtxn.commit()?;
        Ok(identity)
    }

    fn put_identity(&self, wtxn: &mut RwTxn, identity: Identity) -> Result<(), EngineError> {
        self.meta.put(wtxn, META_INSTANCE_ID, &identity.instance_id)?;
        self.meta.put(wtxn, META_LEGACY_HOLDS_BELOW, &identity.legacy_holds_below)?;
        Ok(())
    }

    pub fn identity(&self, rtxn: &RoTxn<'_, WithoutTls>) -> Result<Identity, EngineError> {
        let instance_id = self.meta.get(rtxn, META_INSTANCE_ID)?.ok_or_else(|| {
            EngineError::internal("invariant: the data dir has no instance id after open".to_string())
        })?;
        let legacy_holds_below = self.meta.get(rtxn, META_LEGACY_HOLDS_BELOW)?.unwrap_or(0);
        Ok(Identity { instance_id, legacy_holds_below })
    }

    pub fn read_txn(&self) -> Result<ReadTxn<'_>, EngineError> {
        let guard = self.resize_lock.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(ReadTxn { txn: self.env.read_txn()?, _resize: guard })
    }

    /// Grow the map to `new_size_bytes` (a multiple of the OS page size). Only the writer thread calls it, between
    /// write transactions; it waits for this process's read transactions to end. Ok(false): they did not end in time.
    pub fn resize_map(&self, new_size_bytes: u64) -> Result<bool, EngineError> {
        let deadline = Instant::now() + Duration::from_millis(RESIZE_WAIT_MS);
        let guard = loop {
            match self.resize_lock.try_write() {
                Ok(guard) => break guard,
                Err(std::sync::TryLockError::Poisoned(poisoned)) => break poisoned.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
            }
        };
        let size = usize::try_from(new_size_bytes).expect("map size fits in usize");
        // SAFETY: the writer thread is the only one that opens write transactions and it has none open now; the
        // exclusive guard proves no read transaction of this process is open either.
        unsafe { self.env.resize(size) }?;
        drop(guard);
        Ok(true)
    }

    pub fn recover(&self) -> Result<Recovered, EngineError> {
        let rtxn = self.read_txn()?;
        let mut budgets = Vec::new();
        for item in self.budgets.iter(&rtxn)? {
            let (customer_id, record) = item?;
            budgets.push((customer_id.to_string(), record));
        }
        let mut active_holds = Vec::new();
        let mut max_hold_id = None;
        for item in self.holds.iter(&rtxn)? {
            let (hold_id, record) = item?;
            max_hold_id = Some(hold_id);
            if record.status == HoldStatus::Active {
                active_holds.push((hold_id, record));
            }
        }
        let stored_next = self.meta.get(&rtxn, META_NEXT_HOLD_ID)?.unwrap_or(1);
        let next_hold_id = stored_next.max(max_hold_id.map_or(1, |id| id + 1));
        let next_ledger_seq = self.next_ledger_seq(&rtxn)?;
        let outbox_depth = self.outbox.len(&rtxn)?;
        let next_alert_seq = self.alerts.last(&rtxn)?.map_or(1, |(seq, _)| seq + 1);
        let identity = self.identity(&rtxn)?;
        Ok(Recovered { identity, budgets, active_holds, next_hold_id, next_ledger_seq, outbox_depth, next_alert_seq })
    }

    /// The seq the next ledger entry will get (every seq below it was issued once).
    pub fn next_ledger_seq(&self, rtxn: &RoTxn<'_, WithoutTls>) -> Result<u64, EngineError> {
        let after_last = self.ledger.last(rtxn)?.map_or(1, |(seq, _)| seq + 1);
        Ok(after_last.max(self.meta.get(rtxn, META_NEXT_LEDGER_SEQ)?.unwrap_or(1)))
    }

    pub fn get_hold(&self, hold_id: u64) -> Result<Option<HoldRecord>, EngineError> {
        let rtxn = self.read_txn()?;
        Ok(self.holds.get(&rtxn, &hold_id)?)
    }

    pub fn get_idempotency(&self, composite_key: &str) -> Result<Option<u64>, EngineError> {
        let rtxn = self.read_txn()?;
        Ok(self.idempotency.get(&rtxn, composite_key)?)
    }

    /// The first `limit` outbox entries in ledger order.
    pub fn outbox_head(&self, limit: usize) -> Result<Vec<OutboxEntry>, EngineError> {
        let rtxn = self.read_txn()?;
        let mut entries = Vec::with_capacity(limit.min(1024));
        for item in self.outbox.iter(&rtxn)?.take(limit) {
            entries.push(item?.1);
        }
        Ok(entries)
    }

    pub fn dead_letter_head(&self, limit: usize) -> Result<Vec<DeadLetter>, EngineError> {
        let rtxn = self.read_txn()?;
        let mut letters = Vec::new();
        for item in self.dead_letters.iter(&rtxn)?.take(limit) {
            letters.push(item?.1);
        }
        Ok(letters)
    }

    /// (outbox entries, timestamp of the oldest, dead letters).
    pub fn outbox_stats(&self) -> Result<(u64, Option<i64>, u64), EngineError> {
        let rtxn = self.read_txn()?;
        let oldest = self.outbox.first(&rtxn)?.map(|(_, entry)| entry.ts_ms);
        Ok((self.outbox.len(&rtxn)?, oldest, self.dead_letters.len(&rtxn)?))
    }

    pub fn get_usage(&self, customer_id: &str, start_ms: i64) -> Result<Option<UsageRecord>, EngineError> {
        let rtxn = self.read_txn()?;
        Ok(self.usage.get(&rtxn, &period_key(customer_id, start_ms))?)
    }

    /// A budget's closed periods, newest first, at most `limit`.
    pub fn closed_periods(&self, customer_id: &str, limit: usize) -> Result<Vec<PeriodRecord>, EngineError> {
        let rtxn = self.read_txn()?;
        let prefix = format!("{customer_id}\0");
        let mut found = Vec::new();
        for item in self.periods.rev_prefix_iter(&rtxn, &prefix)?.take(limit) {
            found.push(item?.1);
        }
        Ok(found)
    }

    /// Alerts with a sequence number above `after_seq`, oldest first, at most `limit`.
    pub fn alerts_after(&self, after_seq: u64, limit: usize) -> Result<Vec<AlertRecord>, EngineError> {
        let rtxn = self.read_txn()?;
        let mut found = Vec::new();
        for item in self.alerts.range(&rtxn, &(after_seq.saturating_add(1)..))?.take(limit) {
            found.push(item?.1);
        }
        Ok(found)
    }

    pub fn get_grant(&self, key: &str) -> Result<Option<GrantRecord>, EngineError> {
        let rtxn = self.read_txn()?;
        Ok(self.grants.get(&rtxn, key)?)
    }

    pub fn document(&self, name: &str) -> Result<Option<String>, EngineError> {
        let rtxn = self.read_txn()?;
        Ok(self.documents.get(&rtxn, name)?.map(str::to_string))
    }

    pub fn alert_cursor(&self) -> Result<u64, EngineError> {
        let rtxn = self.read_txn()?;
        Ok(self.meta.get(&rtxn, META_ALERT_CURSOR)?.unwrap_or(0))
    }

    pub fn put_next_hold_id(&self, wtxn: &mut RwTxn, next_hold_id: u64) -> Result<(), EngineError> {
        let stored = self.meta.get(wtxn, META_NEXT_HOLD_ID)?.unwrap_or(1);
        if next_hold_id > stored {
            self.meta.put(wtxn, META_NEXT_HOLD_ID, &next_hold_id)?;
        }
        Ok(())
    }

    pub fn put_next_ledger_seq(&self, wtxn: &mut RwTxn, next_ledger_seq: u64) -> Result<(), EngineError> {
        Ok(self.meta.put(wtxn, META_NEXT_LEDGER_SEQ, &next_ledger_seq)?)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// (map size, bytes up to the highest page in use), both in bytes.
    pub fn map_usage_bytes(&self) -> (u64, u64) {
        let info = self.env.info();
        let used = (info.last_page_number as u64 + 1) * self.page_size_bytes;
        (info.map_size as u64, used)
    }

    /// The map's size and use, and the most it may grow to now (crate::capacity::capacity_bytes).
    /// Only the writer thread calls it, between write transactions (it opens its own read transaction).
    pub fn map_usage(&self, map_max_mb: u64, disk_reserve_mb: u64) -> Result<MapUsage, EngineError> {
        let (size_bytes, high_water_bytes) = self.map_usage_bytes();
        let file_bytes =
            std::fs::metadata(self.dir.join("data.mdb")).map(|meta| meta.len()).unwrap_or(high_water_bytes);
        let free_bytes = disk_free_bytes(&self.dir)?;
        let capacity_bytes =
            capacity_bytes(map_max_mb.saturating_mul(MIB), disk_reserve_mb.saturating_mul(MIB), file_bytes, free_bytes);
        Ok(MapUsage {
            size_bytes,
            used_bytes: self.data_bytes()?,
            high_water_bytes,
            capacity_bytes: capacity_bytes.max(high_water_bytes),
        })
    }

    /// A compacted copy of the data (a backup), under the resize lock: LMDB must not resize while its read runs.
    pub fn copy_to_file(&self, file: &mut std::fs::File) -> Result<(), EngineError> {
        let _no_resize = self.resize_lock.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.env.copy_to_file(file, heed::CompactionOption::Enabled)?;
        Ok(())
    }

    /// Bytes of the pages that hold data: every database's pages and the two meta pages, not the free ones.
    pub fn data_bytes(&self) -> Result<u64, EngineError> {
        let _no_resize = self.resize_lock.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(self.env.non_free_pages_size()? + 2 * self.page_size_bytes)
    }
}

/// The key of a budget's period (closed periods, usage): ids sort by customer, then by start.
pub fn period_key(customer_id: &str, start_ms: i64) -> String {
    debug_assert!(start_ms >= 0);
    format!("{customer_id}\0{start_ms:020}")
}

/// The composite key of an idempotency entry: keys are per customer.
pub fn idempotency_key(customer_id: &str, key: &str) -> String {
    format!("{customer_id}\0{key}")
}

/// `sg-rsv_<16 hex>[suffix]` (an identifier made before instance ids) with the instance id put in; None for any other.
fn legacy_identifier_renamed(identifier: &str, identity: &Identity) -> Option<String> {
    use crate::limits::LEGACY_RESERVATION_ID_LEN;
    let rest = identifier.strip_prefix("sg-")?;
    let legacy = rest.get(..LEGACY_RESERVATION_ID_LEN)?;
    let suffix = &rest[LEGACY_RESERVATION_ID_LEN..];
    if !(suffix.is_empty() || suffix.starts_with('-')) {
        return None;
    }
    let hold_id = u64::from_str_radix(legacy.strip_prefix("rsv_")?, 16).ok()?;
    Some(format!("sg-{}{suffix}", identity.reservation_id(hold_id)))
}

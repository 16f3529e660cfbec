//! The audit trail: a budget's ledger entries of one period with their settlement state, from LMDB and the archive
//! together, in seq order, a bounded page at a time.
//!
//! Consistency: one read transaction gives the LMDB part, the settlement state of each entry and the archive's
//! committed lengths, all from one snapshot, so every entry of the snapshot is in exactly one of LMDB and the
//! committed part of the archive. The archive is read after the transaction has ended (a long read must not keep
//! the map from growing); its committed bytes never change, only bytes past them are ever cut. Seqs are never
//! reused and an entry keeps its seq when it moves to the archive, so paging by "the last seq seen" neither skips
//! nor repeats an entry while commits, settlement and archiving go on.

use std::collections::HashMap;

use super::{validate_id, Engine};
use crate::archive::{self, FileIndex, MemberSpan, META_ARCHIVE_LEN_PREFIX};
use crate::error::EngineError;
use crate::limits::{MAX_ARCHIVE_SCAN_PER_PAGE, MAX_LEDGER_PAGE, MAX_LEDGER_SCAN_PER_PAGE};
use crate::records::LedgerEntry;
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettlementState {
    /// In the outbox: not yet accepted by Stripe (maybe sent, without an answer yet).
    Pending,
    /// Accepted by Stripe.
    Sent,
    /// Refused for good, or held back: in the dead letters until an operator requeues it.
    DeadLetter,
    /// A credit grant (Admin.GrantCredits): not usage, never sent to Stripe.
    Credit,
}

impl SettlementState {
    pub fn as_str(self) -> &'static str {
        match self {
            SettlementState::Pending => "pending",
            SettlementState::Sent => "sent",
            SettlementState::DeadLetter => "dead_letter",
            SettlementState::Credit => "credit",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub entry: LedgerEntry,
    pub state: SettlementState,
    /// The identifier the entry is (to be) sent under (`sg-<reservation id>`, `-requeue<n>` once requeued).
    pub identifier: String,
    /// The claim its meter event(s) went out under, once fixed (None: not sent yet, or settled by a build that did
    /// not keep it).
    pub claim: Option<String>,
    pub dead_letter_reason: String,
    /// Read from the archive (settled, of a closed period past ledger_retention_days).
    pub archived: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerPage {
    pub rows: Vec<LedgerRow>,
    /// Pass it as `after` for the next page. When `more` is false it is the last seq looked at: later commits come
    /// after it.
    pub next_after: u64,
    pub more: bool,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    /// Entries looked at: LMDB's and the archive's.
    pub scanned: u64,
}

/// Which entries belong to a budget's period: its own, and for an org its members' that counted in this period.
struct Selector<'a> {
    customer_id: &'a str,
    start_ms: i64,
    /// The period's end (or its closing time if later), for members' entries written before they kept the org's
    /// period start.
    end_ms: i64,
    org: bool,
}

impl Selector<'_> {
    fn matches(&self, entry: &LedgerEntry) -> bool {
        if entry.customer_id == self.customer_id {
            return entry.period_start_ms == self.start_ms;
        }
        self.org
            && entry.parent.as_deref() == Some(self.customer_id)
            && match entry.parent_period_start_ms {
                Some(start_ms) => start_ms == self.start_ms,
                None => self.start_ms <= entry.ts_ms && entry.ts_ms < self.end_ms,
            }
    }
}

/// The LMDB part of a page.
struct Snapshot {
    rows: Vec<LedgerRow>,
    /// Every LMDB entry up to this seq was looked at (u64::MAX: the whole ledger after the cursor).
    covered: u64,
    last_seen: u64,
    scanned: u64,
    /// Archive file -> committed bytes, from the same transaction.
    lengths: Vec<(String, u64)>,
}

impl Engine {
    /// A page of the ledger entries of `customer_id`'s period containing `at_ms` (None: the current one) with a seq
    /// above `after`, oldest first, at most `limit`. An org's page holds its members' entries of the period too (its
    /// usage counts them). NOT_FOUND for an unknown budget or period; INVALID_ARGUMENT for a limit past
    /// MAX_LEDGER_PAGE or a cursor past the ledger's end.
    pub fn list_ledger(
        &self,
        customer_id: &str,
        at_ms: Option<i64>,
        after: u64,
        limit: usize,
    ) -> Result<LedgerPage, EngineError> {
        validate_id("customer_id", customer_id)?;
        if limit == 0 || limit > MAX_LEDGER_PAGE {
            return Err(EngineError::invalid(format!(
                "limit is {limit}; ask for 1..={MAX_LEDGER_PAGE} entries a page (MAX_LEDGER_PAGE) and page on with the \
                 cursor"
            )));
        }
        let (start_ms, end_ms, _) = self.period_bounds(customer_id, at_ms)?;
        let org = self.shared.budget(customer_id)?.members.load(std::sync::atomic::Ordering::SeqCst) > 0;
        let selector = Selector { customer_id, start_ms, end_ms, org };
        let snapshot = self.shared.with_store(|store| ledger_snapshot(store, &selector, after, limit))?;
        let Snapshot { mut rows, covered: lmdb_covered, mut last_seen, mut scanned, lengths } = snapshot;
        let files: Vec<(String, u64)> = if org {
            lengths // a member's entries are filed by the member's period, which may be any month
        } else {
            let own = archive::file_name(start_ms);
            lengths.into_iter().filter(|(name, _)| *name == own).collect()
        };
        let (archived, archive_covered, archive_last, archive_scanned) =
            self.archived_rows(&files, &selector, after, lmdb_covered, limit)?;
        last_seen = last_seen.max(archive_last);
        scanned += archive_scanned;
        let covered = lmdb_covered.min(archive_covered);
        let in_lmdb: std::collections::HashSet<u64> = rows.iter().map(|row| row.entry.seq).collect();
        rows.extend(archived.into_iter().filter(|row| !in_lmdb.contains(&row.entry.seq)));
        rows.retain(|row| row.entry.seq <= covered);
        rows.sort_by_key(|row| row.entry.seq);
        let (next_after, more) = if rows.len() > limit {
            rows.truncate(limit);
            (rows[limit - 1].entry.seq, true)
        } else if covered != u64::MAX {
            (covered, true)
        } else {
            (last_seen.max(after), false)
        };
        debug_assert!(next_after >= after, "a page must never move the cursor back");
        Ok(LedgerPage { rows, next_after, more, period_start_ms: start_ms, period_end_ms: end_ms, scanned })
    }

    /// The archived entries of the selection with seqs in (after, up_to], decoding whole members in seq order
    /// until about MAX_ARCHIVE_SCAN_PER_PAGE entries or `limit` matches. Returns the rows, the seq up to which every
    /// archived entry was looked at, the last seq seen and the entries decoded.
    fn archived_rows(
        &self,
        files: &[(String, u64)],
        selector: &Selector<'_>,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<(Vec<LedgerRow>, u64, u64, u64), EngineError> {
        let dir = archive::archive_dir(&self.shared.config.data_dir);
        let mut spans: Vec<(usize, MemberSpan)> = Vec::new();
        {
            let mut indexes = self.archive_index.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (file, (name, committed_len)) in files.iter().enumerate() {
                let index = indexes.entry(name.clone()).or_default();
                index.extend(&dir.join(name), *committed_len)?;
                spans.extend(
                    index
                        .members
                        .iter()
                        .filter(|m| m.offset + m.len <= *committed_len && m.max_seq > after && m.min_seq <= up_to)
                        .map(|m| (file, *m)),
                );
            }
        }
        spans.sort_by_key(|(_, span)| span.min_seq);
        let (mut rows, mut decoded, mut covered, mut last_seen) = (Vec::new(), 0u64, u64::MAX, 0u64);
        for (file, span) in spans {
            // Stop before a member that starts past the cursor once enough is known; every entry below its first
            // seq has been looked at (members are sorted by their first seq).
            let enough = decoded >= MAX_ARCHIVE_SCAN_PER_PAGE as u64
                || rows.iter().filter(|row: &&LedgerRow| row.entry.seq < span.min_seq).count() >= limit;
            if enough && span.min_seq > after + 1 {
                covered = span.min_seq - 1;
                break;
            }
            let entries = archive::read_member(&dir.join(&files[file].0), &span)?;
            decoded += entries.len() as u64;
            for entry in entries {
                if entry.seq <= after || entry.seq > up_to {
                    continue;
                }
                last_seen = last_seen.max(entry.seq);
                if selector.matches(&entry) {
                    rows.push(archived_row(entry));
                }
            }
        }
        Ok((rows, covered, last_seen, decoded))
    }
}

fn ledger_snapshot(store: &Store, selector: &Selector<'_>, after: u64, limit: usize) -> Result<Snapshot, EngineError> {
    let rtxn = store.read_txn()?;
    let next_seq = store.next_ledger_seq(&rtxn)?;
    if after >= next_seq {
        return Err(EngineError::invalid(format!(
            "after is {after}, but the ledger's last seq is {}: pass 0 to start, or the next_after of the previous \
             page",
            next_seq - 1
        )));
    }
    let (mut rows, mut scanned, mut last_seen, mut covered) = (Vec::new(), 0u64, after, u64::MAX);
    for item in store.ledger.range(&rtxn, &(after + 1..))? {
        if scanned as usize >= MAX_LEDGER_SCAN_PER_PAGE {
            covered = last_seen;
            break;
        }
        let (seq, entry) = item?;
        scanned += 1;
        last_seen = seq;
        if selector.matches(&entry) {
            rows.push(lmdb_row(store, &rtxn, entry)?);
            if rows.len() >= limit {
                covered = seq;
                break;
            }
        }
    }
    // After the ledger, in the same snapshot: an entry archived by now is in these committed lengths.
    let mut lengths = Vec::new();
    for item in store.meta.prefix_iter(&rtxn, META_ARCHIVE_LEN_PREFIX)? {
        let (key, len) = item?;
        lengths.push((key[META_ARCHIVE_LEN_PREFIX.len()..].to_string(), len));
    }
    Ok(Snapshot { rows, covered, last_seen, scanned, lengths })
}

fn lmdb_row(
    store: &Store,
    rtxn: &heed::RoTxn<'_, heed::WithoutTls>,
    entry: LedgerEntry,
) -> Result<LedgerRow, EngineError> {
    if entry.settled_ms.is_some() || !entry.kind.is_commit() {
        return Ok(LedgerRow { archived: false, ..archived_row(entry) });
    }
    let seq = entry.seq;
    if let Some(outbox) = store.outbox.get(rtxn, &seq)? {
        return Ok(LedgerRow {
            entry,
            state: SettlementState::Pending,
            identifier: outbox.identifier,
            claim: outbox.sent_as,
            dead_letter_reason: String::new(),
            archived: false,
        });
    }
    if let Some(letter) = store.dead_letters.get(rtxn, &seq)? {
        return Ok(LedgerRow {
            entry,
            state: SettlementState::DeadLetter,
            identifier: letter.entry.identifier,
            claim: letter.entry.sent_as,
            dead_letter_reason: letter.reason,
            archived: false,
        });
    }
    Err(EngineError::internal(format!(
        "invariant: ledger entry {seq} is neither settled nor in the outbox nor a dead letter"
    )))
}

/// A settled entry (its identifier and claim as kept at acknowledgement), or a grant (never billed: no identifier).
fn archived_row(mut entry: LedgerEntry) -> LedgerRow {
    if !entry.kind.is_commit() {
        return LedgerRow {
            entry,
            state: SettlementState::Credit,
            identifier: String::new(),
            claim: None,
            dead_letter_reason: String::new(),
            archived: true,
        };
    }
    debug_assert!(entry.settled_ms.is_some(), "only settled entries and grants are archived");
    let identifier = entry.identifier.take().unwrap_or_else(|| entry.base_identifier());
    let claim = entry.sent_as.take();
    LedgerRow {
        entry,
        state: SettlementState::Sent,
        identifier,
        claim,
        dead_letter_reason: String::new(),
        archived: true,
    }
}

/// Archive file name -> its member index, kept by the engine between pages (indexing reads a file once).
pub type ArchiveIndexes = HashMap<String, FileIndex>;

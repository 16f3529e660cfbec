//! The ledger archive: settled entries of closed periods, moved out of LMDB after `ledger_retention_days`.
//!
//! One file per calendar month (UTC) of the entries' period start, `archive/ledger-YYYY-MM.jsonl.gz` in the data dir:
//! gzip members appended one per archiving transaction, each holding JSON lines in the ledger's own format (any gzip
//! reader reads the concatenation). The file is append-only, and its committed length is kept in LMDB's meta
//! database, written in the same transaction that deletes the archived entries: bytes past it (a crash between the
//! append and the commit, whose entries are therefore still in LMDB) are cut off before the next append, so each
//! entry is in exactly one of the two once a transaction commits. A reader of a live data dir may meet such a tail:
//! it skips entries it also finds in LMDB (by seq) and stops at a torn member. The audit trail (Engine::list_ledger)
//! indexes a file's members by seq (`FileIndex`) and decodes only those a page needs.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::error::EngineError;
use crate::period::{civil_from_days, DAY_MS};
use crate::records::LedgerEntry;

/// The archive's folder in the data dir; backups copy it beside data.mdb.
pub const ARCHIVE_DIR: &str = "archive";
/// Meta key prefix of a file's committed length.
pub const META_ARCHIVE_LEN_PREFIX: &str = "archive_len:";

/// The archive file of an entry: the month its period started in.
pub fn file_name(period_start_ms: i64) -> String {
    let (year, month, _) = civil_from_days(period_start_ms.div_euclid(DAY_MS));
    format!("ledger-{year:04}-{month:02}.jsonl.gz")
}

pub fn archive_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(ARCHIVE_DIR)
}

/// Append `entries` as one gzip member to `name`, after cutting the file back to `committed_len` bytes, and make it
/// durable. Returns the new length, to be committed with the deletion of the entries.
pub fn append(data_dir: &Path, name: &str, committed_len: u64, entries: &[LedgerEntry]) -> Result<u64, EngineError> {
    assert!(!entries.is_empty(), "an archive append carries entries");
    let dir = archive_dir(data_dir);
    let created_dir = !dir.exists();
    std::fs::create_dir_all(&dir).map_err(|err| io_error(&dir, "create", err))?;
    let path = dir.join(name);
    let created = !path.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .map_err(|err| io_error(&path, "open", err))?;
    let found_len = file.metadata().map_err(|err| io_error(&path, "stat", err))?.len();
    if found_len < committed_len {
        return Err(EngineError::internal(format!(
            "invariant: archive {} has {found_len} bytes, LMDB committed {committed_len}; restore it from a backup",
            path.display()
        )));
    }
    file.set_len(committed_len).map_err(|err| io_error(&path, "truncate", err))?;
    file.seek(SeekFrom::Start(committed_len)).map_err(|err| io_error(&path, "seek", err))?;
    let member = gzip_member(entries)?;
    file.write_all(&member).map_err(|err| io_error(&path, "write", err))?;
    file.sync_all().map_err(|err| io_error(&path, "fsync", err))?;
    if created {
        sync_dir(&dir)?;
    }
    if created_dir {
        sync_dir(data_dir)?;
    }
    Ok(committed_len + member.len() as u64)
}

fn gzip_member(entries: &[LedgerEntry]) -> Result<Vec<u8>, EngineError> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    for entry in entries {
        serde_json::to_writer(&mut encoder, entry)
            .map_err(|err| EngineError::internal(format!("cannot encode ledger entry {}: {err}", entry.seq)))?;
        encoder.write_all(b"\n").map_err(|err| EngineError::internal(format!("gzip: {err}")))?;
    }
    encoder.finish().map_err(|err| EngineError::internal(format!("gzip: {err}")))
}

fn sync_dir(dir: &Path) -> Result<(), EngineError> {
    File::open(dir).and_then(|handle| handle.sync_all()).map_err(|err| io_error(dir, "fsync", err))
}

fn io_error(path: &Path, what: &str, err: std::io::Error) -> EngineError {
    EngineError::unavailable(format!("cannot {what} the ledger archive {}: {err}", path.display()))
}

/// Copy every archive file of `data_dir` into `dest_dir/archive` (a backup, after its LMDB snapshot) and make the
/// copies durable; returns the bytes copied. A file may hold a tail appended after the snapshot: the snapshot's meta
/// does not count it, so readers skip it and the next append cuts it, and those entries are in the snapshot's ledger.
pub fn copy_all(data_dir: &Path, dest_dir: &Path) -> Result<u64, EngineError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = archive_dir(data_dir);
    let Ok(listing) = std::fs::read_dir(&dir) else {
        return Ok(0); // nothing archived yet
    };
    let dest = archive_dir(dest_dir);
    std::fs::create_dir(&dest).map_err(|err| io_error(&dest, "create", err))?;
    let mut copied_bytes = 0;
    for item in listing {
        let path = item.map_err(|err| io_error(&dir, "list", err))?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else { continue };
        if !(name.starts_with("ledger-") && name.ends_with(".jsonl.gz")) {
            continue;
        }
        let target = dest.join(name);
        let mut from = File::open(&path).map_err(|err| io_error(&path, "open", err))?;
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&target)
            .map_err(|err| io_error(&target, "create", err))?;
        copied_bytes += std::io::copy(&mut from, &mut to).map_err(|err| io_error(&target, "write", err))?;
        to.sync_all().map_err(|err| io_error(&target, "fsync", err))?;
    }
    sync_dir(&dest)?;
    sync_dir(dest_dir)?;
    Ok(copied_bytes)
}

/// Every entry in one archive file up to `len` bytes (tests and tools; the audit trail reads members: `read_member`).
pub fn read(path: &Path, len: u64) -> Result<Vec<LedgerEntry>, EngineError> {
    use std::io::{BufRead, BufReader, Read};
    let file = File::open(path).map_err(|err| io_error(path, "open", err))?;
    let decoder = flate2::read::MultiGzDecoder::new(file.take(len));
    let mut entries = Vec::new();
    for line in BufReader::new(decoder).lines() {
        let line = line.map_err(|err| io_error(path, "read", err))?;
        entries.push(
            serde_json::from_str(&line)
                .map_err(|err| EngineError::internal(format!("bad line in {}: {err}", path.display())))?,
        );
    }
    Ok(entries)
}

/// One gzip member of an archive file (one archiving transaction's entries, in seq order) and the seqs it holds, so
/// that a reader of one seq range decodes only the members that overlap it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberSpan {
    pub offset: u64,
    pub len: u64,
    pub min_seq: u64,
    pub max_seq: u64,
    pub entries: u64,
}

/// The members of an archive file's committed part, indexed so far (the file is append-only below its committed
/// length, so an index only ever grows at its end).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileIndex {
    pub indexed_len: u64,
    pub members: Vec<MemberSpan>,
}

impl FileIndex {
    /// Index the members between what is indexed and `committed_len` (a shorter committed length than indexed
    /// means another data dir: start again).
    pub fn extend(&mut self, path: &Path, committed_len: u64) -> Result<(), EngineError> {
        if committed_len < self.indexed_len {
            *self = FileIndex::default();
        }
        if committed_len > self.indexed_len {
            self.members.extend(index_members(path, self.indexed_len, committed_len)?);
            self.indexed_len = committed_len;
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// The gzip members in bytes [from, to) of an archive file, each with the seqs it holds.
fn index_members(path: &Path, from: u64, to: u64) -> Result<Vec<MemberSpan>, EngineError> {
    use std::io::{BufRead, BufReader, Read};
    let mut file = File::open(path).map_err(|err| missing(path, to, err))?;
    file.seek(SeekFrom::Start(from)).map_err(|err| io_error(path, "seek", err))?;
    let mut reader = BufReader::new(file.take(to - from));
    let mut spans = Vec::new();
    let mut offset = from;
    while !reader.fill_buf().map_err(|err| io_error(path, "read", err))?.is_empty() {
        let (mut min_seq, mut max_seq, mut entries) = (u64::MAX, 0, 0);
        // bufread's decoder consumes exactly one member (header to trailer) and leaves the rest buffered.
        for line in BufReader::new(flate2::bufread::GzDecoder::new(&mut reader)).lines() {
            let line = line.map_err(|err| damaged(path, to, &err.to_string()))?;
            let seq = serde_json::from_str::<SeqOnly>(&line).map_err(|err| damaged(path, to, &err.to_string()))?.seq;
            (min_seq, max_seq, entries) = (min_seq.min(seq), max_seq.max(seq), entries + 1);
        }
        let end = to - reader.get_ref().limit() - reader.buffer().len() as u64;
        assert!(end > offset, "a gzip member of {} consumed no bytes", path.display());
        if entries > 0 {
            spans.push(MemberSpan { offset, len: end - offset, min_seq, max_seq, entries });
        }
        offset = end;
    }
    Ok(spans)
}

/// The entries of one indexed member.
pub fn read_member(path: &Path, span: &MemberSpan) -> Result<Vec<LedgerEntry>, EngineError> {
    use std::io::{BufRead, BufReader, Read};
    let end = span.offset + span.len;
    let mut file = File::open(path).map_err(|err| missing(path, end, err))?;
    file.seek(SeekFrom::Start(span.offset)).map_err(|err| io_error(path, "seek", err))?;
    let decoder = flate2::bufread::GzDecoder::new(BufReader::new(file.take(span.len)));
    let mut entries = Vec::with_capacity(usize::try_from(span.entries).unwrap_or(0).min(1 << 16));
    for line in BufReader::new(decoder).lines() {
        let line = line.map_err(|err| damaged(path, end, &err.to_string()))?;
        entries.push(serde_json::from_str(&line).map_err(|err| damaged(path, end, &err.to_string()))?);
    }
    Ok(entries)
}

fn missing(path: &Path, committed_len: u64, err: std::io::Error) -> EngineError {
    EngineError::unavailable(format!(
        "cannot open the ledger archive {} ({err}), which LMDB says holds {committed_len} committed bytes: restore the \
         data dir's archive/ from its backup",
        path.display()
    ))
}

fn damaged(path: &Path, committed_len: u64, why: &str) -> EngineError {
    EngineError::internal(format!(
        "the ledger archive {} is damaged within its committed {committed_len} bytes ({why}): restore it from a backup",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> LedgerEntry {
        LedgerEntry {
            seq,
            reservation_id: format!("rsv_{seq:032x}"),
            customer_id: "c".into(),
            stripe_customer_id: "cus_1".into(),
            amount: 5,
            reserved: 5,
            excess: 0,
            ts_ms: 1,
            settled_ms: Some(2),
            period_start_ms: 0,
            parent: None,
            usage: None,
            dimensions: Default::default(),
            parent_period_start_ms: None,
            sent_as: None,
            identifier: None,
            kind: Default::default(),
            grant_key: String::new(),
            reason: String::new(),
        }
    }

    #[test]
    fn months_name_the_files() {
        assert_eq!(file_name(0), "ledger-1970-01.jsonl.gz");
        assert_eq!(file_name(1_764_547_200_000), "ledger-2025-12.jsonl.gz");
    }

    #[test]
    fn appends_are_members_and_an_uncommitted_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let name = file_name(0);
        let first = append(dir.path(), &name, 0, &[entry(1), entry(2)]).unwrap();
        // A crash after this append, before its transaction committed: LMDB still says `first`.
        append(dir.path(), &name, first, &[entry(3)]).unwrap();
        let second = append(dir.path(), &name, first, &[entry(3), entry(4)]).unwrap();
        let path = archive_dir(dir.path()).join(&name);
        let seqs: Vec<u64> = read(&path, second).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), second);
    }

    #[test]
    fn the_index_finds_each_member_and_grows_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let name = file_name(0);
        let path = archive_dir(dir.path()).join(&name);
        let first = append(dir.path(), &name, 0, &[entry(1), entry(3)]).unwrap();
        let mut index = FileIndex::default();
        index.extend(&path, first).unwrap();
        // An uncommitted tail past `second` is never indexed.
        let second = append(dir.path(), &name, first, &[entry(2), entry(9)]).unwrap();
        append(dir.path(), &name, second, &[entry(10)]).unwrap();
        index.extend(&path, second).unwrap();
        let spans: Vec<(u64, u64, u64)> = index.members.iter().map(|m| (m.min_seq, m.max_seq, m.entries)).collect();
        assert_eq!(spans, [(1, 3, 2), (2, 9, 2)]);
        assert_eq!(index.members[1].offset, first);
        let seqs: Vec<u64> = read_member(&path, &index.members[1]).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 9]);
    }

    #[test]
    fn a_file_shorter_than_committed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(append(dir.path(), &file_name(0), 10, &[entry(1)]).is_err());
    }
}

//! How much the LMDB map may grow, and how much of it the open holds may still need.
//!
//! The map starts at `map_size_mb` and the writer grows it between batches, up to a capacity: `map_max_mb`, or, when
//! that is 0, what the disk can spare beyond `disk_reserve_mb`. New reservations and budgets are refused before the
//! map's high-water mark comes within what every open hold, every unacknowledged outbox entry and one worst batch
//! could still write, so a commit or release of anything already granted, and the settler's acknowledgements, always
//! fit.

use std::path::Path;

use crate::error::EngineError;
use crate::limits::MAX_DOCUMENT_BYTES;

const MIB: u64 = 1024 * 1024;

/// The most one open hold can still add when it resolves: its ledger entry (at most ~4.5 KiB of JSON with 16
/// dimensions and 8 usage parts: two overflow pages), its outbox entry (one to two pages), the rewrite of its hold
/// record (copy-on-write: two pages), and branch pages split on the way. 40 KiB is ten pages: twice the sum.
pub const HOLD_WORST_CASE_BYTES: u64 = 40 * 1024;
/// What acknowledging one outbox entry can add: the rewrite of its ledger entry (copy-on-write, two overflow pages)
/// and a branch page, before the old pages are free for reuse.
pub const ACK_WORST_CASE_BYTES: u64 = 12 * 1024;
/// A new budget: its record, its first usage record and their index pages.
pub const BUDGET_WORST_CASE_BYTES: u64 = 16 * 1024;
/// A credit grant: its ledger entry and its grant record (each under 3 KiB with a MAX_REASON_BYTES reason: an
/// overflow page each), the rewrite of its budget record (two pages) and branch pages split on the way; the usage
/// record's rewrite is the largest document's, in MAP_SLACK_BYTES.
pub const GRANT_WORST_CASE_BYTES: u64 = 24 * 1024;
/// Room that no count predicts: a rewrite of the largest document (old and new copies), alerts, period records, and
/// the few reservations racing past the check at once (each check reads the counts before the hold is counted).
pub const MAP_SLACK_BYTES: u64 = 2 * MAX_DOCUMENT_BYTES as u64 + 8 * MIB;
/// The writer grows the map once its high-water mark passes this share of it, to twice its size.
pub const GROW_AT_PERCENT: u64 = 75;
/// Reserve on the disk by default when `map_max_mb` is 0 (the data may use whatever else the disk has).
pub const DEFAULT_DISK_RESERVE_MB: u64 = 256;
/// How often the writer asks the file system how much room is left.
pub const DISK_CHECK_INTERVAL_MS: u64 = 1_000;

/// The map as the writer last saw it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapUsage {
    pub size_bytes: u64,
    /// Pages holding data (free pages, which LMDB reuses, not counted): what the data takes.
    pub used_bytes: u64,
    /// Up to the highest page ever used: LMDB never lowers it, and the map must hold it.
    pub high_water_bytes: u64,
    pub capacity_bytes: u64,
}

/// The room open work may still need in the map, in bytes.
pub fn room_needed_bytes(active_holds: u64, outbox_depth: u64) -> u64 {
    active_holds
        .saturating_mul(HOLD_WORST_CASE_BYTES)
        .saturating_add(outbox_depth.saturating_mul(ACK_WORST_CASE_BYTES))
        .saturating_add(MAP_SLACK_BYTES)
}

/// The largest the map may become: `map_max_bytes` when set, else the data file plus the disk's free space past the
/// reserve. Never below `used_bytes`: what is written is there.
pub fn capacity_bytes(map_max_bytes: u64, reserve_bytes: u64, file_bytes: u64, disk_free_bytes: u64) -> u64 {
    let disk = file_bytes.saturating_add(disk_free_bytes.saturating_sub(reserve_bytes));
    if map_max_bytes == 0 {
        disk
    } else {
        map_max_bytes.min(disk)
    }
}

/// The map size to grow to before the next batch, if any: twice the size once the high-water mark passes
/// GROW_AT_PERCENT (or `at_least_bytes`), never past the capacity, in whole OS pages.
pub fn next_map_size_bytes(size_bytes: u64, used_bytes: u64, capacity_bytes: u64, at_least_bytes: u64) -> Option<u64> {
    let crowded = used_bytes.saturating_mul(100) >= size_bytes.saturating_mul(GROW_AT_PERCENT);
    if !crowded && at_least_bytes <= size_bytes {
        return None;
    }
    let target = size_bytes.saturating_mul(2).max(at_least_bytes).min(capacity_bytes);
    let target = target - target % os_page_bytes();
    (target > size_bytes).then_some(target)
}

fn os_page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().filter(|page| *page > 0).unwrap_or(4096)
}

/// Bytes the file system holding `dir` lets an unprivileged writer still use.
pub fn disk_free_bytes(dir: &Path) -> Result<u64, EngineError> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| EngineError::invalid(format!("data dir {} contains a NUL byte", dir.display())))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is a valid out pointer for statvfs.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(EngineError::unavailable(format!("cannot read free space of {}: {err}", dir.display())));
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

pub fn mib(bytes: u64) -> u64 {
    bytes / MIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_doubles_once_crowded_and_stops_at_capacity() {
        assert_eq!(next_map_size_bytes(16 * MIB, 8 * MIB, 1024 * MIB, 0), None);
        assert_eq!(next_map_size_bytes(16 * MIB, 12 * MIB, 1024 * MIB, 0), Some(32 * MIB));
        assert_eq!(next_map_size_bytes(16 * MIB, 12 * MIB, 20 * MIB, 0), Some(20 * MIB));
        assert_eq!(next_map_size_bytes(20 * MIB, 19 * MIB, 20 * MIB, 0), None);
        assert_eq!(next_map_size_bytes(16 * MIB, MIB, 1024 * MIB, 100 * MIB), Some(100 * MIB));
    }

    #[test]
    fn capacity_is_the_setting_or_the_disk_past_its_reserve() {
        assert_eq!(capacity_bytes(0, 256 * MIB, 10 * MIB, 1000 * MIB), 754 * MIB);
        assert_eq!(capacity_bytes(64 * MIB, 256 * MIB, 10 * MIB, 1000 * MIB), 64 * MIB);
        assert_eq!(capacity_bytes(0, 256 * MIB, 10 * MIB, 100 * MIB), 10 * MIB);
    }

    #[test]
    fn every_open_hold_and_outbox_entry_needs_room() {
        assert_eq!(room_needed_bytes(0, 0), MAP_SLACK_BYTES);
        assert_eq!(room_needed_bytes(2, 1), MAP_SLACK_BYTES + 2 * HOLD_WORST_CASE_BYTES + ACK_WORST_CASE_BYTES);
        assert_eq!(room_needed_bytes(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn the_disk_has_some_room() {
        assert!(disk_free_bytes(Path::new("/")).is_ok());
    }
}

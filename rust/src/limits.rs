//! Every bound in one place. Crossing one gives a clear `EngineError`, never a crash or a silently wrong number.

/// Longest customer_id, stripe_customer_id or idempotency_key, in UTF-8 bytes. LMDB keys are at most 511 bytes; a
/// composite idempotency key (customer, NUL, key) must fit.
pub const MAX_ID_BYTES: usize = 128;

/// Largest amount or limit. 2^53 keeps every value exact in a JSON double, and sums of a few thousand of them far
/// from i64 overflow; all arithmetic on counters is checked anyway.
pub const MAX_AMOUNT_UNITS: i64 = 1 << 53;

/// The most one budget (or org) may book in a period: its spent, and, apart, its held. A commit or a (soft-mode)
/// reserve that would pass it is refused with INVALID_ARGUMENT before anything changes. Far below i64::MAX, so that
/// the writer's checked sums can never fail: even hundreds of racing calls of MAX_AMOUNT_UNITS past the check fit.
pub const MAX_BOOKED_UNITS: i64 = 1 << 60;
const _: () = assert!(MAX_BOOKED_UNITS >= 64 * MAX_AMOUNT_UNITS);
const _: () = assert!(i64::MAX - 2 * MAX_BOOKED_UNITS > 512 * MAX_AMOUNT_UNITS);

/// Largest value `max_ttl_ms` may be configured to: 7 days.
pub const MAX_TTL_MS_CEILING: u64 = 7 * 86_400_000;

/// Ops applied in one LMDB write transaction. Bounds the time one fsync covers and the memory a batch holds.
pub const MAX_BATCH_OPS: usize = 4096;

/// Most budgets one `list_budgets` call returns.
pub const MAX_LIST_BUDGETS: usize = 10_000;

/// Resolved holds (and their idempotency keys) pruned per write transaction, so pruning never stalls commits.
pub const MAX_PRUNE_PER_TXN: usize = 2_000;

/// Ledger entries moved to the archive per write transaction, and ledger entries looked at to find them, so that
/// archiving never stalls commits (crate::archive).
pub const MAX_ARCHIVE_PER_TXN: usize = 5_000;
pub const MAX_ARCHIVE_SCAN_PER_TXN: usize = 20_000;
/// Default `ledger_retention_days`: card networks take disputes up to 120 days after a charge; 180 days keeps every
/// entry a dispute can name in LMDB (and the archive keeps them all after).
pub const DEFAULT_LEDGER_RETENTION_DAYS: u64 = 180;
/// Longest `ledger_retention_days`: ten years.
pub const MAX_LEDGER_RETENTION_DAYS: u64 = 3_660;

/// Smallest and largest LMDB map, in MiB.
pub const MIN_MAP_SIZE_MB: u64 = 8;
pub const MAX_MAP_SIZE_MB: u64 = 1 << 20;

/// LMDB sub-databases: meta, budgets, holds, idempotency, ledger, outbox (+ room for the settlement issue).
pub const MAX_DBS: u32 = 16;

/// The reservation id is `rsv_` followed by 32 lowercase hex digits: the data dir's instance id, then the hold id.
pub const RESERVATION_ID_PREFIX: &str = "rsv_";
pub const RESERVATION_ID_LEN: usize = 4 + 16 + 16;
/// Ids issued before data dirs had an instance id: `rsv_` and the hold id alone.
pub const LEGACY_RESERVATION_ID_LEN: usize = 4 + 16;
/// Longest meter event identifier Stripe accepts.
pub const MAX_STRIPE_IDENTIFIER_CHARS: usize = 100;
/// The outbox identifier is `sg-` and the reservation id; the settler appends at most this much (`-requeue<n>`,
/// `-agg…`, a token type), so every identifier fits Stripe's limit.
pub const MAX_IDENTIFIER_SUFFIX_CHARS: usize = 48;
const _: () = assert!(3 + RESERVATION_ID_LEN + MAX_IDENTIFIER_SUFFIX_CHARS <= MAX_STRIPE_IDENTIFIER_CHARS);

/// Most outbox entries (or dead letters) one call returns.
pub const MAX_OUTBOX_BATCH: usize = 10_000;

/// A document of the layers above (Engine::put_document): its name and its body, in bytes. The webhook state, the
/// largest, is about 10,000 event ids of some 30 bytes.
pub const MAX_DOCUMENT_NAME_BYTES: usize = 64;
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

/// Longest reason kept with a dead letter, in bytes.
pub const MAX_REASON_BYTES: usize = 1_024;

//! What LMDB stores, as JSON values (readable by `spendgate inspect` through the Python `lmdb` package).
//! Keys: budgets by customer_id (UTF-8); holds, ledger and outbox by u64 big-endian; idempotency by
//! `customer_id NUL key`. Changing a field here is a schema change: bump `SCHEMA_VERSION`.

use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetRecord {
    pub limit: i64,
    pub spent: i64,
    /// Sum of the amounts of this budget's active holds.
    pub held: i64,
    /// Units committed past the limit (over-reserved commits that did not fit). Flagged, never dropped.
    pub overdraft: i64,
    pub stripe_customer_id: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// A frozen budget denies every Reserve (commits of existing holds still post).
    #[serde(default)]
    pub frozen: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Active,
    Committed,
    Released,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRecord {
    pub customer_id: String,
    pub amount: i64,
    pub status: HoldStatus,
    pub created_ms: i64,
    pub expires_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Set once committed: the actual units posted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_amount: Option<i64>,
    #[serde(default)]
    pub excess: i64,
    /// True when the commit arrived after the hold had expired.
    #[serde(default)]
    pub late: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_ms: Option<i64>,
}

/// One committed usage. Kept: it is the billing record that settlement and reconciliation read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub seq: u64,
    pub reservation_id: String,
    pub customer_id: String,
    pub stripe_customer_id: String,
    pub amount: i64,
    /// The hold's amount at commit time (0 for a commit after expiry).
    pub reserved: i64,
    pub excess: i64,
    pub ts_ms: i64,
    /// When Stripe accepted it (set when its outbox entry is acknowledged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_ms: Option<i64>,
}

/// What the settler must deliver to Stripe; removed once Stripe has accepted it. Written in the same transaction as
/// its ledger entry, so nothing committed can be missing here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub seq: u64,
    /// Stable across resends, so Stripe drops a duplicate.
    pub identifier: String,
    pub customer_id: String,
    pub stripe_customer_id: String,
    pub amount: i64,
    /// The event's timestamp, fixed at commit time and never recomputed at send time.
    pub ts_ms: i64,
    /// The identifier of the meter event this entry was first sent in (its own, or a pre-aggregated event's).
    /// Fixed durably before the first send, so a resend after a crash repeats exactly the same event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_as: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_attempt_ms: Option<i64>,
    #[serde(default)]
    pub attempts: u32,
}

/// An outbox entry that Stripe refused for good (unknown customer, archived meter, older than Stripe accepts ...).
/// Kept with the reason until an operator requeues it; never blocks other entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub entry: OutboxEntry,
    pub reason: String,
    pub dead_ms: i64,
    /// How often it was requeued before (a requeued entry gets a fresh identifier: Stripe keeps refused ones).
    #[serde(default)]
    pub requeues: u32,
}

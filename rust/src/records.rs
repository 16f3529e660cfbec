//! What LMDB stores, as JSON values (readable by `spendgate inspect` through the Python `lmdb` package).
//! Keys: budgets by customer_id (UTF-8); holds, ledger, outbox, dead letters and alerts by u64 big-endian;
//! idempotency by `customer_id NUL key`; periods and usage by `customer_id NUL period start` (see store.rs).
//! Changing a field here is a schema change: bump `SCHEMA_VERSION`. Fields added later carry `#[serde(default)]`, so
//! that an older data dir still reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::breaker::UsageRing;
use crate::period::{PeriodRule, NEVER_MS};

/// 1: budgets without policy. 2: periods, policy, hierarchy, usage views, alerts (a version 1 dir is upgraded in
/// place: its budgets keep their lifetime period).
pub const SCHEMA_VERSION: u32 = 2;

/// Free-form labels on a call (feature, member, action ...): the usage views break spend down by them.
pub type Dimensions = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforcementMode {
    /// Deny what does not fit under the limit.
    #[default]
    Hard,
    /// Grant it anyway and flag the call as over the limit: for products that must never break mid-conversation.
    Soft,
}

fn lifetime() -> PeriodRule {
    PeriodRule::Lifetime
}

fn never() -> i64 {
    NEVER_MS
}

fn is_zero_units(value: &i64) -> bool {
    *value == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetRecord {
    /// The configured limit of a period (the hard cap, overage included).
    pub limit: i64,
    /// Committed in the current period.
    pub spent: i64,
    /// Sum of the amounts of the active holds on this budget (and, for an org, on its members).
    pub held: i64,
    /// Units committed past the limit in the current period. Flagged, never dropped.
    pub overdraft: i64,
    pub stripe_customer_id: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// A frozen budget denies every Reserve (commits of existing holds still post).
    #[serde(default)]
    pub frozen: bool,
    /// Who froze it and why ("" when not frozen).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub frozen_reason: String,
    /// The plan's included quota per period; usage past it is overage.
    #[serde(default)]
    pub included: i64,
    /// Warn (one alert per period) once spent reaches this; 0: no soft limit.
    #[serde(default)]
    pub soft_limit: i64,
    #[serde(default)]
    pub mode: EnforcementMode,
    /// The kill switch: deny anything past the included quota.
    #[serde(default)]
    pub block_overage: bool,
    /// The org budget this one is a member of: a Reserve must fit both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default = "lifetime")]
    pub period: PeriodRule,
    #[serde(default)]
    pub period_start_ms: i64,
    #[serde(default = "never")]
    pub period_end_ms: i64,
    /// This period's soft-limit and limit alerts were raised (each once per period).
    #[serde(default)]
    pub soft_alerted: bool,
    #[serde(default)]
    pub limit_alerted: bool,
    /// Per-budget breaker multiplier; None: the server's breaker_multiplier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker_multiplier: Option<u64>,
    /// The customer's own stop-at (set from the usage page): Reserve admits at most up to it, in either mode. It can
    /// only lower enforcement, never raise it past `limit`. 0: none.
    #[serde(default, skip_serializing_if = "is_zero_units")]
    pub stop_at: i64,
    /// Recent usage, for the breaker.
    #[serde(default, skip_serializing_if = "UsageRing::is_empty")]
    pub ring: UsageRing,
    /// Granted credits (Admin.GrantCredits) still unused: Reserve admits against `limit + credits`. Spend draws the
    /// limit first; at roll-over the unused part carries into the next period (see `carried_credits`).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub credits: i64,
}

impl BudgetRecord {
    /// A new budget: nothing spent or held, no policy but its limit, in the period [start, end) of `period`.
    pub fn new(
        limit: i64,
        stripe_customer_id: String,
        now_ms: i64,
        period: PeriodRule,
        start_ms: i64,
        end_ms: i64,
    ) -> Self {
        BudgetRecord {
            limit,
            spent: 0,
            held: 0,
            overdraft: 0,
            stripe_customer_id,
            created_ms: now_ms,
            updated_ms: now_ms,
            frozen: false,
            frozen_reason: String::new(),
            included: 0,
            soft_limit: 0,
            mode: EnforcementMode::Hard,
            block_overage: false,
            parent: None,
            period,
            period_start_ms: start_ms,
            period_end_ms: end_ms,
            soft_alerted: false,
            limit_alerted: false,
            breaker_multiplier: None,
            stop_at: 0,
            ring: UsageRing::default(),
            credits: 0,
        }
    }

    /// The limit Reserve admits against: the limit plus the credits, which the kill switch caps at the included
    /// quota and a stop-at at itself.
    pub fn effective_limit(&self) -> i64 {
        effective_limit(self.limit + self.credits, self.block_overage, self.included, self.stop_at)
    }
}

/// The limit admission counts against: `limit` (with any credits), capped at `included` by the kill switch and at a
/// stop-at (> 0).
pub fn effective_limit(limit: i64, block_overage: bool, included: i64, stop_at: i64) -> i64 {
    let capped = if block_overage { limit.min(included) } else { limit };
    if stop_at > 0 {
        capped.min(stop_at)
    } else {
        capped
    }
}

/// The credits a period passes on to the next: spend draws the limit first, then the credits, so what is left of
/// `credits` after `spent` (never below 0). Granted credits never expire; they are used up.
pub fn carried_credits(limit: i64, credits: i64, spent: i64) -> i64 {
    let used = (spent - limit).clamp(0, credits);
    credits - used
}

/// A closed period of a budget, kept when the budget rolls over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodRecord {
    pub customer_id: String,
    pub start_ms: i64,
    pub end_ms: i64,
    /// When it was closed (its end, or earlier when a Stripe event started the next one).
    pub closed_ms: i64,
    pub limit: i64,
    pub included: i64,
    pub spent: i64,
    pub overdraft: i64,
    /// The unused credits the period had when it closed (its limit was `limit + credits`).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub credits: i64,
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
    /// When the hold ends on the wall clock as estimated at Reserve (shown to clients). Holds end on engine time.
    pub expires_ms: i64,
    /// When the hold ends in engine time (crate::clock: monotonic, continued across restarts). None in holds made
    /// before it existed: they end at `expires_ms`, by the wall clock, at most their TTL after the upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_mono_ms: Option<i64>,
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
    /// The org budget that holds the amount too, fixed at Reserve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The model the Reserve priced, if any: a Commit without usage falls back to it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: Dimensions,
    /// What an idempotent retry must repeat, when not the amount alone (an estimate: model and token counts).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint: String,
}

/// One priced part of a call: tokens of one type and the units they cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsagePart {
    pub token_type: String,
    pub tokens: i64,
    pub units: i64,
}

/// The token usage behind a committed amount, when the call was priced from tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageDetail {
    pub model: String,
    pub parts: Vec<UsagePart>,
    /// An app-level cache hit: no LLM call, nothing charged.
    #[serde(default)]
    pub cache_hit: bool,
    /// Priced at the fallback price (the model was not in the price table).
    #[serde(default)]
    pub fallback: bool,
}

/// What a ledger entry records. Absent in JSON for a commit (every entry written before grants existed reads as one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerKind {
    /// Committed usage: billed (it has an outbox entry).
    #[default]
    Commit,
    /// Credits added to the budget's limit (Admin.GrantCredits): never billed, never in the outbox, not usage.
    Grant,
}

impl LedgerKind {
    pub fn is_commit(&self) -> bool {
        *self == LedgerKind::Commit
    }

    /// Its name in JSON (serde's snake_case) and at the boundary.
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Commit => "commit",
            LedgerKind::Grant => "grant",
        }
    }
}

/// One committed usage, or a credit grant (`kind`). Kept: it is the billing record that settlement and
/// reconciliation read (they count commits only).
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
    /// The start of the budget period the amount counted in.
    #[serde(default)]
    pub period_start_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageDetail>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: Dimensions,
    /// A member's commit: the start of the org's period it counted in too (the org's ledger lists it there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_period_start_ms: Option<i64>,
    /// Set at acknowledgement: the claim its meter event(s) went out under (OutboxEntry::sent_as), from which the
    /// settler's rules derive the events' identifiers (spendgate.settle.aggregate.event_identifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_as: Option<String>,
    /// Set at acknowledgement when the entry's own identifier was not `sg-<reservation id>` (a requeue's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    #[serde(default, skip_serializing_if = "LedgerKind::is_commit")]
    pub kind: LedgerKind,
    /// A grant: its idempotency key and reason (reservation_id is empty, reserved and excess 0).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub grant_key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl LedgerEntry {
    /// The identifier its outbox entry was made with.
    pub fn base_identifier(&self) -> String {
        format!("sg-{}", self.reservation_id)
    }
}

/// A credit grant, by its idempotency key (keys are global: one key names one grant of one customer), so that a
/// replay answers what the grant did, across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub customer_id: String,
    pub amount: i64,
    pub reason: String,
    pub ts_ms: i64,
    /// Its ledger entry.
    pub seq: u64,
    pub period_start_ms: i64,
    /// The budget's limit (with credits) and its unused credits right after the grant.
    pub limit_after: i64,
    pub credits_after: i64,
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
    /// How often this entry was requeued from the dead letters (each requeue sends it under a fresh identifier).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requeues: u32,
    /// Set when the entry came back with a restored backup: it may be at Stripe already (sent after the backup was
    /// taken), so it is resent under its identifier only while Stripe still deduplicates that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_ms: Option<i64>,
    /// Token usage: settled as Stripe LLM token-billing events (one per token type) instead of one units event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageDetail>,
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
    /// The event may be at Stripe already (it was sent before, or came back with a restore): a requeue under a fresh
    /// identifier could bill it twice, so it needs `confirmed_missing` (after `spendgate reconcile`).
    #[serde(default)]
    pub fate_unknown: bool,
}

/// Tokens and units of one (model, token type) in a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenTotals {
    pub tokens: i64,
    pub units: i64,
}

/// A budget's usage in one period, kept up to date by the writer in the same transaction as each ledger entry, so
/// that GetUsage adds up to the ledger exactly and reads a few records instead of scanning it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub customer_id: String,
    pub period_start_ms: i64,
    pub units: i64,
    pub commits: u64,
    /// Units per UTC day (days since 1970-01-01).
    #[serde(default)]
    pub days: BTreeMap<i64, i64>,
    /// model -> token type -> totals. Calls in plain units have no model and appear only in the totals.
    #[serde(default)]
    pub models: BTreeMap<String, BTreeMap<String, TokenTotals>>,
    /// dimension key -> value -> units. Past MAX_TRACKED_VALUES values of one key, the rest go to OTHER_VALUE.
    #[serde(default)]
    pub dimensions: BTreeMap<String, BTreeMap<String, i64>>,
    /// Credits granted in the period (Admin.GrantCredits), and how many grants: not usage, not in `units`.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub granted: i64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub grants: u64,
}

/// Something an app or an operator should hear about: a soft limit crossed, a limit hit, a breaker trip ...
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub seq: u64,
    pub kind: String,
    pub customer_id: String,
    pub ts_ms: i64,
    pub message: String,
    /// The figures behind it (spent, limit, threshold ...), by name.
    #[serde(default)]
    pub values: BTreeMap<String, i64>,
    /// The instance id of the data dir that raised it (0: raised before instance ids), so that its id stays unique
    /// when a restore rewinds the sequence.
    #[serde(default)]
    pub instance_id: u64,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

fn is_zero_i64(value: &i64) -> bool {
    *value == 0
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_budget_reads_with_a_lifetime_period_and_no_policy() {
        let v1 = r#"{"limit":100,"spent":5,"held":0,"overdraft":0,"stripe_customer_id":"cus","created_ms":1,
                     "updated_ms":2,"frozen":false}"#;
        let record: BudgetRecord = serde_json::from_str(v1).unwrap();
        assert_eq!((record.period, record.period_end_ms), (PeriodRule::Lifetime, NEVER_MS));
        assert_eq!((record.mode, record.included, record.parent.clone()), (EnforcementMode::Hard, 0, None));
        assert_eq!(record.effective_limit(), 100);
        assert_eq!(record.credits, 0);
    }

    #[test]
    fn a_commit_entry_serializes_as_before_grants_and_old_entries_read_as_commits() {
        let entry = LedgerEntry {
            seq: 1,
            reservation_id: "rsv_1".into(),
            customer_id: "c".into(),
            stripe_customer_id: "cus".into(),
            amount: 5,
            reserved: 5,
            excess: 0,
            ts_ms: 1,
            settled_ms: None,
            period_start_ms: 0,
            parent: None,
            usage: None,
            dimensions: Dimensions::new(),
            parent_period_start_ms: None,
            sent_as: None,
            identifier: None,
            kind: LedgerKind::Commit,
            grant_key: String::new(),
            reason: String::new(),
        };
        let json = serde_json::to_string(&entry).unwrap();
        assert!(!json.contains("kind") && !json.contains("grant_key") && !json.contains("reason"), "{json}");
        let back: LedgerEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(back.kind, LedgerKind::Commit);
        let grant = LedgerEntry { kind: LedgerKind::Grant, ..entry };
        assert!(serde_json::to_string(&grant).unwrap().contains(r#""kind":"grant""#));
    }

    #[test]
    fn credits_are_drawn_after_the_limit_and_carry_what_is_left() {
        assert_eq!(carried_credits(100, 50, 0), 50);
        assert_eq!(carried_credits(100, 50, 100), 50);
        assert_eq!(carried_credits(100, 50, 120), 30);
        assert_eq!(carried_credits(100, 50, 150), 0);
        assert_eq!(carried_credits(100, 50, 900), 0); // overdraft uses no more than there is
        assert_eq!(carried_credits(100, 0, 120), 0);
    }
}

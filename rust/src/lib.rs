//! spendgate's core: budget admission with lock-free counters, two-phase holds, and LMDB persistence through one
//! group-commit writer thread.
//!
//! Plain Rust, no Python: the PyO3 layer lives in `python.rs` behind the `python` feature, so `cargo test` needs no
//! interpreter.
//!
//! The flow of a state change (Reserve, Commit, Release, expiry, SetBudget):
//! 1. The calling thread changes the in-memory counters (a compare-and-swap for admission) and enqueues one `Op`
//!    under a *ticket* from a global sequence.
//! 2. The writer applies ops to LMDB strictly in ticket order, many per transaction, and makes each batch durable.
//! 3. The caller acknowledges only once `durable_ticket() >= ticket`.
//!
//! Ordering rule that keeps every durable prefix consistent (see `engine.rs`): an op that *frees* capacity takes its
//! ticket before the capacity becomes visible to other threads; an op that *takes* capacity takes its ticket after
//! it won the compare-and-swap. So any op that used freed capacity is serialized after the op that freed it.

pub mod alerts;
pub mod archive;
pub mod breaker;
pub mod budget;
pub mod capacity;
pub mod clock;
pub mod engine;
pub mod error;
pub mod hold;
pub mod identity;
pub mod limits;
pub mod period;
pub mod records;
pub mod store;
pub mod usage;
pub mod writer;

#[cfg(feature = "python")]
mod python;

pub use engine::{
    BalanceView, BudgetUpdate, CommitArgs, CommitOutcome, Engine, EngineConfig, EngineStats, GrantOutcome, LedgerPage,
    LedgerRow, OutboxStats, ReleaseOutcome, ReserveArgs, ReserveOutcome, SetBudgetOutcome, SettlementState, UsageView,
};
pub use error::{EngineError, ErrorKind};
pub use hold::{DenyReason, HoldState};

//! Holds in memory: one slot per hold that is active, or resolved but not yet durable.

use std::sync::Arc;

use crate::budget::Budget;
use crate::records::Dimensions;

/// Numbers match spendgate.v1.DenyReason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum DenyReason {
    None = 0,
    InsufficientBudget = 1,
    TooManyHolds = 2,
    /// The budget (or its org) is frozen (by an operator, the circuit breaker, or a Stripe subscription event).
    Frozen = 3,
    /// It would fit under the limit, but past the included quota while the block-overage kill switch is on.
    OverageBlocked = 4,
    /// The model is not in the price table and no fallback price is set (decided by the server's pricing).
    UnknownModel = 5,
    /// An idempotent replay found its hold committed, released or expired: nothing is held for it now, so the
    /// caller must reserve again under a new key before it calls the model.
    HoldEnded = 6,
}

/// Numbers match spendgate.v1.HoldState.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum HoldState {
    Active = 1,
    Committed = 2,
    Released = 3,
    Expired = 4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Committed { amount: i64, excess: i64, late: bool },
    Released,
    Expired,
}

impl Resolution {
    pub fn state(self) -> HoldState {
        match self {
            Resolution::Committed { .. } => HoldState::Committed,
            Resolution::Released => HoldState::Released,
            Resolution::Expired => HoldState::Expired,
        }
    }
}

/// What a hold carries besides its amount, when the Reserve gave it (most holds carry nothing, so it is boxed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldExtras {
    pub model: String,
    pub dimensions: Dimensions,
    pub fingerprint: String,
}

impl HoldExtras {
    pub fn boxed(model: &str, dimensions: &Dimensions, fingerprint: &str) -> Option<Box<HoldExtras>> {
        let empty = model.is_empty() && dimensions.is_empty() && fingerprint.is_empty();
        (!empty).then(|| {
            Box::new(HoldExtras {
                model: model.to_string(),
                dimensions: dimensions.clone(),
                fingerprint: fingerprint.to_string(),
            })
        })
    }
}

pub struct HoldSlot {
    pub budget: Arc<Budget>,
    /// The org budget that holds the amount too (fixed at Reserve).
    pub parent: Option<Arc<Budget>>,
    pub extras: Option<Box<HoldExtras>>,
    /// Units held; 0 for a slot that only claims an already expired hold for a late commit.
    pub amount: i64,
    /// The wall-clock estimate of its end, as the Reserve answered it.
    pub expires_ms: i64,
    /// When it ends, in engine time (crate::clock): the reaper expires it then, whatever the wall clock says.
    pub deadline_mono_ms: i64,
    /// The composite idempotency key (customer NUL key), if the Reserve had one.
    pub idem_key: Option<Box<str>>,
    /// `None` while active; set by the one call that resolves the hold.
    pub resolution: Option<Resolution>,
    /// Ticket of the last op about this hold; the writer drops the slot once that ticket is durable.
    pub ticket: u64,
}

/// Echo at most 64 characters of bad input back in an error message.
pub fn truncate_for_message(text: &str) -> String {
    const MAX_ECHO_CHARS: usize = 64;
    if text.chars().count() <= MAX_ECHO_CHARS {
        return text.to_string();
    }
    let head: String = text.chars().take(MAX_ECHO_CHARS).collect();
    format!("{head}…")
}

//! Alerts: what an app or an operator should hear about. Stored durably in LMDB (the `alerts` database, by sequence
//! number) in ticket order, so WatchAlerts can resume after a reconnect and the alert webhook delivers each one after
//! a crash. The engine raises the kinds it decides on (soft limit, limit, breaker); the server adds the rest (freeze
//! by an operator or a Stripe event, settlement dead letters) through `Engine::raise_alert`.

use std::collections::BTreeMap;

/// Alerts kept; past it the oldest are pruned (a delivery cursor behind them skips ahead, and says so).
pub const MAX_ALERTS_KEPT: u64 = 100_000;
pub const MAX_ALERT_MESSAGE_BYTES: usize = 1_024;
/// Alerts one `alerts_after` call returns.
pub const MAX_ALERTS_BATCH: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    SoftLimitCrossed,
    LimitReached,
    BreakerTripped,
    Frozen,
    Unfrozen,
    SettlementDeadLetter,
    /// A Stripe draft invoice much larger than the customer's previous invoice (raised by the webhook handler).
    InvoiceSpike,
    /// The ledger and Stripe's meter summaries disagree past the tolerance (raised by the scheduled reconcile).
    ReconcileDivergence,
    /// The wall clock stepped against the monotonic clock past `max_clock_step_ms` (raised by the engine).
    ClockStep,
}

impl AlertKind {
    pub const ALL: [AlertKind; 9] = [
        AlertKind::SoftLimitCrossed,
        AlertKind::LimitReached,
        AlertKind::BreakerTripped,
        AlertKind::Frozen,
        AlertKind::Unfrozen,
        AlertKind::SettlementDeadLetter,
        AlertKind::InvoiceSpike,
        AlertKind::ReconcileDivergence,
        AlertKind::ClockStep,
    ];

    /// The kinds that code outside the engine may raise (`Engine::raise_alert`): the others mark a budget's state
    /// and are raised only where the engine decides them.
    pub const RAISED_OUTSIDE: [AlertKind; 3] =
        [AlertKind::SettlementDeadLetter, AlertKind::InvoiceSpike, AlertKind::ReconcileDivergence];

    /// The stored name, the same as spendgate.v1.AlertKind without its prefix, lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::SoftLimitCrossed => "soft_limit_crossed",
            AlertKind::LimitReached => "limit_reached",
            AlertKind::BreakerTripped => "breaker_tripped",
            AlertKind::Frozen => "frozen",
            AlertKind::Unfrozen => "unfrozen",
            AlertKind::SettlementDeadLetter => "settlement_dead_letter",
            AlertKind::InvoiceSpike => "invoice_spike",
            AlertKind::ReconcileDivergence => "reconcile_divergence",
            AlertKind::ClockStep => "clock_step",
        }
    }

    pub fn parse(name: &str) -> Option<AlertKind> {
        AlertKind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// An alert on its way to the writer, which gives it its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAlert {
    pub kind: AlertKind,
    pub customer_id: String,
    pub ts_ms: i64,
    pub message: String,
    pub values: BTreeMap<String, i64>,
}

impl PendingAlert {
    pub fn new(kind: AlertKind, customer_id: &str, ts_ms: i64, message: String, values: &[(&str, i64)]) -> Self {
        let mut message = message;
        if message.len() > MAX_ALERT_MESSAGE_BYTES {
            let mut cut = MAX_ALERT_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        PendingAlert {
            kind,
            customer_id: customer_id.to_string(),
            ts_ms,
            message,
            values: values.iter().map(|(name, value)| ((*name).to_string(), *value)).collect(),
        }
    }
}

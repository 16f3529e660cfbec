//! The thin PyO3 layer: converts arguments and results, nothing else. Built only with the `python` feature.
//! The GIL is released only around work that takes real time: opening (recovery), waiting for durability, closing.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use std::collections::BTreeMap;

use pyo3::types::PyList;

use crate::breaker::BreakerConfig;
use crate::engine::{
    BalanceView, BudgetUpdate, CommitArgs, Engine, EngineConfig, LedgerPage, LedgerRow, ReserveArgs, UsageView,
};
use crate::error::EngineError;
use crate::limits::{
    DEFAULT_LEDGER_PAGE, MAX_AMOUNT_UNITS, MAX_ARCHIVE_SCAN_PER_PAGE, MAX_ID_BYTES, MAX_LEDGER_PAGE,
    MAX_LEDGER_SCAN_PER_PAGE, MAX_TTL_MS_CEILING,
};
use crate::period::PeriodRule;
use crate::records::{AlertRecord, Dimensions, EnforcementMode, OutboxEntry, PeriodRecord, UsageDetail, UsagePart};

/// Every engine failure: `kind` picks the gRPC status, `message` says what was wrong and how to fix it.
#[pyclass(extends = PyException, module = "spendgate._core", name = "EngineError", subclass)]
pub struct PyEngineError {
    #[pyo3(get)]
    kind: String,
    #[pyo3(get)]
    message: String,
}

#[pymethods]
impl PyEngineError {
    #[new]
    fn new(kind: String, message: String) -> Self {
        PyEngineError { kind, message }
    }

    fn __str__(&self) -> String {
        format!("{}: {}", self.kind, self.message)
    }

    fn __repr__(&self) -> String {
        format!("EngineError({:?}, {:?})", self.kind, self.message)
    }
}

/// Python spells booleans True and False.
fn py_bool(value: bool) -> &'static str {
    if value {
        "True"
    } else {
        "False"
    }
}

fn to_py_err(err: EngineError) -> PyErr {
    Python::attach(|py| {
        let value = PyEngineError { kind: err.kind.as_str().to_string(), message: err.message };
        match Bound::new(py, value) {
            Ok(bound) => PyErr::from_value(bound.into_any()),
            Err(err) => err,
        }
    })
}

#[pyclass(module = "spendgate._core", name = "ReserveOutcome", frozen, get_all)]
pub struct PyReserveOutcome {
    granted: bool,
    reservation_id: String,
    remaining: i64,
    reason: i32,
    expires_at_ms: i64,
    replayed: bool,
    amount: i64,
    /// spendgate.v1.HoldState number; 0 when denied.
    state: i32,
    over_limit: bool,
    decided_by: String,
    ticket: u64,
}

#[pymethods]
impl PyReserveOutcome {
    fn __repr__(&self) -> String {
        format!(
            "ReserveOutcome(granted={}, reservation_id={:?}, remaining={}, reason={}, amount={}, replayed={}, ticket={})",
            py_bool(self.granted), self.reservation_id, self.remaining, self.reason, self.amount, py_bool(self.replayed), self.ticket
        )
    }
}

#[pyclass(module = "spendgate._core", name = "CommitOutcome", frozen, get_all)]
pub struct PyCommitOutcome {
    charged: i64,
    remaining: i64,
    over_reserved: bool,
    excess: i64,
    replayed: bool,
    hold_expired: bool,
    over_limit: bool,
    breaker_tripped: bool,
    ticket: u64,
}

#[pymethods]
impl PyCommitOutcome {
    fn __repr__(&self) -> String {
        format!(
            "CommitOutcome(charged={}, remaining={}, over_reserved={}, excess={}, replayed={}, hold_expired={}, ticket={})",
            self.charged, self.remaining, py_bool(self.over_reserved), self.excess, py_bool(self.replayed), py_bool(self.hold_expired), self.ticket
        )
    }
}

#[pyclass(module = "spendgate._core", name = "ReleaseOutcome", frozen, get_all)]
pub struct PyReleaseOutcome {
    released: bool,
    remaining: i64,
    state: i32,
    replayed: bool,
    ticket: u64,
}

#[pymethods]
impl PyReleaseOutcome {
    fn __repr__(&self) -> String {
        format!(
            "ReleaseOutcome(released={}, remaining={}, state={}, replayed={}, ticket={})",
            py_bool(self.released),
            self.remaining,
            self.state,
            py_bool(self.replayed),
            self.ticket
        )
    }
}

#[pyclass(module = "spendgate._core", name = "BalanceView", frozen, get_all)]
pub struct PyBalanceView {
    customer_id: String,
    limit: i64,
    spent: i64,
    reserved: i64,
    remaining: i64,
    active_holds: i64,
    stripe_customer_id: String,
    overdraft: i64,
    frozen: bool,
    frozen_reason: String,
    included: i64,
    soft_limit: i64,
    /// "hard" or "soft".
    mode: &'static str,
    block_overage: bool,
    parent_id: String,
    members: u64,
    /// {"kind": "monthly", "anchor_ms": ...}, {"kind": "fixed", "anchor_ms": ..., "length_ms": ...} or
    /// {"kind": "lifetime"}.
    period: BTreeMap<String, PeriodValue>,
    period_start_ms: i64,
    period_end_ms: i64,
    /// None: the server's multiplier.
    breaker_multiplier: Option<u64>,
    /// Granted credits in `limit` this period (granted in it or carried into it).
    credits: i64,
    /// The customer's own stop-at (0: none).
    stop_at: i64,
}

/// A value in a period dict: its kind's name, or a number of milliseconds.
#[derive(IntoPyObject, Clone)]
pub enum PeriodValue {
    Text(&'static str),
    Number(i64),
}

fn period_dict(rule: PeriodRule) -> BTreeMap<String, PeriodValue> {
    let mut dict = BTreeMap::new();
    let kind = match rule {
        PeriodRule::Lifetime => "lifetime",
        PeriodRule::Monthly { anchor_ms } => {
            dict.insert("anchor_ms".to_string(), PeriodValue::Number(anchor_ms));
            "monthly"
        }
        PeriodRule::Fixed { anchor_ms, length_ms } => {
            dict.insert("anchor_ms".to_string(), PeriodValue::Number(anchor_ms));
            dict.insert("length_ms".to_string(), PeriodValue::Number(length_ms));
            "fixed"
        }
    };
    dict.insert("kind".to_string(), PeriodValue::Text(kind));
    dict
}

fn mode_name(mode: EnforcementMode) -> &'static str {
    match mode {
        EnforcementMode::Hard => "hard",
        EnforcementMode::Soft => "soft",
    }
}

#[pymethods]
impl PyBalanceView {
    fn __repr__(&self) -> String {
        format!(
            "BalanceView(customer_id={:?}, limit={}, spent={}, reserved={}, remaining={}, active_holds={}, overdraft={})",
            self.customer_id, self.limit, self.spent, self.reserved, self.remaining, self.active_holds, self.overdraft
        )
    }
}

impl From<BalanceView> for PyBalanceView {
    fn from(v: BalanceView) -> Self {
        PyBalanceView {
            customer_id: v.customer_id,
            limit: v.limit,
            spent: v.spent,
            reserved: v.reserved,
            remaining: v.remaining,
            active_holds: v.active_holds,
            stripe_customer_id: v.stripe_customer_id,
            overdraft: v.overdraft,
            frozen: v.frozen,
            frozen_reason: v.frozen_reason,
            included: v.included,
            soft_limit: v.soft_limit,
            mode: mode_name(v.mode),
            block_overage: v.block_overage,
            parent_id: v.parent,
            members: v.members,
            period: period_dict(v.period),
            period_start_ms: v.period_start_ms,
            period_end_ms: v.period_end_ms,
            breaker_multiplier: v.breaker_multiplier,
            credits: v.credits,
            stop_at: v.stop_at,
        }
    }
}

#[pyclass(module = "spendgate._core", name = "SetBudgetOutcome", frozen, get_all)]
pub struct PySetBudgetOutcome {
    balance: Py<PyBalanceView>,
    created: bool,
    rolled: bool,
    ticket: u64,
}

#[pyclass(module = "spendgate._core", name = "GrantOutcome", frozen, get_all)]
pub struct PyGrantOutcome {
    customer_id: String,
    amount: i64,
    reason: String,
    granted_ms: i64,
    limit_after: i64,
    credits_after: i64,
    replayed: bool,
    balance: Py<PyBalanceView>,
    ticket: u64,
}

#[pyclass(module = "spendgate._core", name = "Engine", frozen)]
pub struct PyEngine {
    inner: Engine,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (
        data_dir, *, map_size_mb = 1024, map_max_mb = 0, disk_reserve_mb = 256, ledger_retention_days = 180, durability = "fsync", default_ttl_ms = 60_000, max_ttl_ms = 3_600_000,
        max_holds_per_budget = 10_000, max_active_holds = 1_000_000, max_budgets = 1_000_000,
        write_queue_capacity = 65_536, reap_interval_ms = 100, resolved_retention_ms = 604_800_000,
        prune_interval_ms = 60_000,
        max_outbox_entries = 10_000_000, default_period = "month", breaker_multiplier = 10,
        breaker_recent_ms = 3_600_000, breaker_window_ms = 86_400_000, breaker_min_units = 0,
        max_clock_step_ms = 1_000, clock_step_confirm_ms = 900_000
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        data_dir: PathBuf,
        map_size_mb: u64,
        map_max_mb: u64,
        disk_reserve_mb: u64,
        ledger_retention_days: u64,
        durability: &str,
        default_ttl_ms: u64,
        max_ttl_ms: u64,
        max_holds_per_budget: u64,
        max_active_holds: u64,
        max_budgets: u64,
        write_queue_capacity: u64,
        reap_interval_ms: u64,
        resolved_retention_ms: u64,
        prune_interval_ms: u64,
        max_outbox_entries: u64,
        default_period: &str,
        breaker_multiplier: u64,
        breaker_recent_ms: u64,
        breaker_window_ms: u64,
        breaker_min_units: i64,
        max_clock_step_ms: u64,
        clock_step_confirm_ms: u64,
    ) -> PyResult<Self> {
        let relaxed = match durability {
            "fsync" => false,
            "relaxed" => true,
            other => {
                return Err(to_py_err(EngineError::invalid(format!(
                    "durability is {other:?}; use \"fsync\" (survives power loss) or \"relaxed\" (survives kill -9)"
                ))))
            }
        };
        let mut config = EngineConfig::new(data_dir);
        config.map_size_mb = map_size_mb;
        config.map_max_mb = map_max_mb;
        config.disk_reserve_mb = disk_reserve_mb;
        config.ledger_retention_days = ledger_retention_days;
        config.relaxed = relaxed;
        config.default_ttl_ms = default_ttl_ms;
        config.max_ttl_ms = max_ttl_ms;
        config.max_holds_per_budget = max_holds_per_budget;
        config.max_active_holds = max_active_holds;
        config.max_budgets = max_budgets;
        config.write_queue_capacity = write_queue_capacity;
        config.reap_interval_ms = reap_interval_ms;
        config.resolved_retention_ms = resolved_retention_ms;
        config.prune_interval_ms = prune_interval_ms;
        config.max_outbox_entries = max_outbox_entries;
        config.default_period = match default_period {
            "month" => PeriodRule::CALENDAR_MONTH,
            "lifetime" => PeriodRule::Lifetime,
            other => {
                return Err(to_py_err(EngineError::invalid(format!(
                    "default_period is {other:?}; use \"month\" (the calendar month in UTC) or \"lifetime\""
                ))))
            }
        };
        config.breaker = BreakerConfig {
            multiplier: breaker_multiplier,
            recent_ms: breaker_recent_ms,
            window_ms: breaker_window_ms,
            min_units: breaker_min_units,
        };
        config.max_clock_step_ms = max_clock_step_ms;
        config.clock_step_confirm_ms = clock_step_confirm_ms;
        let inner = py.detach(|| Engine::open(config)).map_err(to_py_err)?;
        Ok(PyEngine { inner })
    }

    #[pyo3(signature = (customer_id, amount, idempotency_key = "", ttl_ms = 0, *, model = "", dimensions = None, fingerprint = ""))]
    #[allow(clippy::too_many_arguments)]
    fn reserve(
        &self,
        customer_id: &str,
        amount: i64,
        idempotency_key: &str,
        ttl_ms: u64,
        model: &str,
        dimensions: Option<Dimensions>,
        fingerprint: &str,
    ) -> PyResult<PyReserveOutcome> {
        let args = ReserveArgs {
            customer_id,
            amount,
            idempotency_key,
            ttl_ms,
            model,
            dimensions: dimensions.unwrap_or_default(),
            fingerprint,
        };
        Ok(reserve_outcome(self.inner.reserve_with(&args).map_err(to_py_err)?))
    }

    /// What a Reserve of `amount` would answer now, holding nothing (Budget.Quote): reservation_id "", ticket 0.
    fn quote(&self, customer_id: &str, amount: i64) -> PyResult<PyReserveOutcome> {
        Ok(reserve_outcome(self.inner.quote(customer_id, amount).map_err(to_py_err)?))
    }

    /// `usage`: {"model": str, "parts": [(token_type, tokens, units), ...], "cache_hit": bool, "fallback": bool}.
    #[pyo3(signature = (reservation_id, amount, *, usage = None, dimensions = None))]
    fn commit(
        &self,
        reservation_id: &str,
        amount: i64,
        usage: Option<&Bound<'_, PyDict>>,
        dimensions: Option<Dimensions>,
    ) -> PyResult<PyCommitOutcome> {
        let usage = usage.map(usage_detail).transpose()?;
        let args = CommitArgs { reservation_id, amount, usage, dimensions: dimensions.unwrap_or_default() };
        let o = self.inner.commit_with(args).map_err(to_py_err)?;
        Ok(PyCommitOutcome {
            charged: o.charged,
            remaining: o.remaining,
            over_reserved: o.over_reserved,
            excess: o.excess,
            replayed: o.replayed,
            hold_expired: o.hold_expired,
            over_limit: o.over_limit,
            breaker_tripped: o.breaker_tripped,
            ticket: o.ticket,
        })
    }

    /// The model a Reserve priced (empty when it gave an amount only): a Commit without a model is priced with it.
    fn hold_model(&self, reservation_id: &str) -> PyResult<String> {
        self.inner.hold_model(reservation_id).map_err(to_py_err)
    }

    fn release(&self, reservation_id: &str) -> PyResult<PyReleaseOutcome> {
        let o = self.inner.release(reservation_id).map_err(to_py_err)?;
        Ok(PyReleaseOutcome {
            released: o.released,
            remaining: o.remaining,
            state: o.state as i32,
            replayed: o.replayed,
            ticket: o.ticket,
        })
    }

    fn balance(&self, customer_id: &str) -> PyResult<PyBalanceView> {
        Ok(self.inner.balance(customer_id).map_err(to_py_err)?.into())
    }

    #[pyo3(signature = (prefix = "", limit = 100))]
    fn list_budgets(&self, prefix: &str, limit: usize) -> PyResult<Vec<PyBalanceView>> {
        let views = self.inner.list_budgets(prefix, limit).map_err(to_py_err)?;
        Ok(views.into_iter().map(PyBalanceView::from).collect())
    }

    #[pyo3(signature = (customer_id, limit, stripe_customer_id = ""))]
    fn set_budget(
        &self,
        py: Python<'_>,
        customer_id: &str,
        limit: i64,
        stripe_customer_id: &str,
    ) -> PyResult<PySetBudgetOutcome> {
        let o = self.inner.set_budget(customer_id, limit, stripe_customer_id).map_err(to_py_err)?;
        Ok(PySetBudgetOutcome {
            balance: Py::new(py, PyBalanceView::from(o.balance))?,
            created: o.created,
            rolled: o.rolled,
            ticket: o.ticket,
        })
    }

    /// Create a budget or change its settings; None leaves a setting unchanged. `mode`: "hard" or "soft"; `period`:
    /// a period dict (see BalanceView.period); `breaker_multiplier`: -1 for the server's, 0 off, or 2..=1000;
    /// `stop_at`: the customer's own stop-at, 0 to remove it (it only ever lowers what Reserve admits).
    #[pyo3(signature = (
        customer_id, *, limit = None, stripe_customer_id = None, included = None, soft_limit = None, mode = None,
        block_overage = None, parent_id = None, period = None, breaker_multiplier = None, stop_at = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn update_budget(
        &self,
        py: Python<'_>,
        customer_id: &str,
        limit: Option<i64>,
        stripe_customer_id: Option<String>,
        included: Option<i64>,
        soft_limit: Option<i64>,
        mode: Option<&str>,
        block_overage: Option<bool>,
        parent_id: Option<String>,
        period: Option<&Bound<'_, PyDict>>,
        breaker_multiplier: Option<i64>,
        stop_at: Option<i64>,
    ) -> PyResult<PySetBudgetOutcome> {
        let update = BudgetUpdate {
            limit,
            stripe_customer_id: stripe_customer_id.filter(|id| !id.is_empty()),
            included,
            soft_limit,
            mode: mode.map(parse_mode).transpose().map_err(to_py_err)?,
            block_overage,
            parent: parent_id.filter(|id| !id.is_empty()),
            period: period.map(parse_period).transpose()?,
            breaker_multiplier: breaker_multiplier.map(parse_multiplier).transpose().map_err(to_py_err)?,
            stop_at,
        };
        let o = self.inner.update_budget(customer_id, &update).map_err(to_py_err)?;
        Ok(PySetBudgetOutcome {
            balance: Py::new(py, PyBalanceView::from(o.balance))?,
            created: o.created,
            rolled: o.rolled,
            ticket: o.ticket,
        })
    }

    /// Add `amount` credits to the budget's limit, once per idempotency key (a replay answers the first call's grant).
    #[pyo3(signature = (customer_id, amount, idempotency_key, reason = ""))]
    fn grant_credits(
        &self,
        py: Python<'_>,
        customer_id: &str,
        amount: i64,
        idempotency_key: &str,
        reason: &str,
    ) -> PyResult<PyGrantOutcome> {
        let o = self.inner.grant_credits(customer_id, amount, idempotency_key, reason).map_err(to_py_err)?;
        Ok(PyGrantOutcome {
            customer_id: o.customer_id,
            amount: o.amount,
            reason: o.reason,
            granted_ms: o.granted_ms,
            limit_after: o.limit_after,
            credits_after: o.credits_after,
            replayed: o.replayed,
            balance: Py::new(py, PyBalanceView::from(o.balance))?,
            ticket: o.ticket,
        })
    }

    /// Freeze or unfreeze, saying why (kept with the budget and put in the alert).
    fn freeze(&self, py: Python<'_>, customer_id: &str, frozen: bool, reason: &str) -> PyResult<PySetBudgetOutcome> {
        let o = self.inner.freeze(customer_id, frozen, reason).map_err(to_py_err)?;
        Ok(PySetBudgetOutcome {
            balance: Py::new(py, PyBalanceView::from(o.balance))?,
            created: false,
            rolled: false,
            ticket: o.ticket,
        })
    }

    /// The usage of the period containing `at_ms` (None: the current one), as a dict.
    #[pyo3(signature = (customer_id, at_ms = None))]
    fn usage<'py>(&self, py: Python<'py>, customer_id: &str, at_ms: Option<i64>) -> PyResult<Bound<'py, PyDict>> {
        let view = self.inner.usage(customer_id, at_ms).map_err(to_py_err)?;
        usage_dict(py, &view)
    }

    /// A page of the ledger of the budget's period containing `at_ms` (None: the current one), entries with a seq
    /// above `after`, LMDB's and the archive's, with their settlement state. Reads files: the GIL is released.
    #[pyo3(signature = (customer_id, at_ms = None, after = 0, limit = DEFAULT_LEDGER_PAGE))]
    fn list_ledger<'py>(
        &self,
        py: Python<'py>,
        customer_id: &str,
        at_ms: Option<i64>,
        after: u64,
        limit: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let page = py.detach(|| self.inner.list_ledger(customer_id, at_ms, after, limit)).map_err(to_py_err)?;
        ledger_page_dict(py, &page)
    }

    #[pyo3(signature = (customer_id, limit = 100))]
    fn closed_periods<'py>(
        &self,
        py: Python<'py>,
        customer_id: &str,
        limit: usize,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let periods = self.inner.closed_periods(customer_id, limit).map_err(to_py_err)?;
        periods.iter().map(|period| period_record_dict(py, period)).collect()
    }

    fn roll_due(&self) -> u64 {
        self.inner.roll_due()
    }

    #[pyo3(signature = (kind, customer_id, message, values = None))]
    fn raise_alert(
        &self,
        kind: &str,
        customer_id: &str,
        message: &str,
        values: Option<BTreeMap<String, i64>>,
    ) -> PyResult<u64> {
        let values = values.unwrap_or_default();
        let pairs: Vec<(&str, i64)> = values.iter().map(|(name, value)| (name.as_str(), *value)).collect();
        self.inner.raise_alert(kind, customer_id, message, &pairs).map_err(to_py_err)
    }

    #[pyo3(signature = (after_seq, limit = 1000))]
    fn alerts_after<'py>(&self, py: Python<'py>, after_seq: u64, limit: usize) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let alerts = self.inner.alerts_after(after_seq, limit).map_err(to_py_err)?;
        alerts.iter().map(|alert| alert_dict(py, alert)).collect()
    }

    fn alert_seq(&self) -> u64 {
        self.inner.alert_seq()
    }

    fn alert_cursor(&self) -> PyResult<u64> {
        self.inner.alert_cursor().map_err(to_py_err)
    }

    fn set_alert_cursor(&self, seq: u64) -> PyResult<u64> {
        self.inner.set_alert_cursor(seq).map_err(to_py_err)
    }

    fn set_frozen(&self, py: Python<'_>, customer_id: &str, frozen: bool) -> PyResult<PySetBudgetOutcome> {
        let o = self.inner.set_frozen(customer_id, frozen).map_err(to_py_err)?;
        Ok(PySetBudgetOutcome {
            balance: Py::new(py, PyBalanceView::from(o.balance))?,
            created: false,
            rolled: false,
            ticket: o.ticket,
        })
    }

    #[pyo3(signature = (limit = 1000))]
    fn outbox_pending<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let entries = self.inner.outbox_pending(limit).map_err(to_py_err)?;
        entries.iter().map(|entry| outbox_dict(py, entry)).collect()
    }

    fn outbox_claim(&self, seqs: Vec<u64>, identifier: &str) -> PyResult<u64> {
        self.inner.outbox_claim(&seqs, identifier).map_err(to_py_err)
    }

    fn outbox_ack(&self, seqs: Vec<u64>) -> PyResult<u64> {
        self.inner.outbox_ack(&seqs).map_err(to_py_err)
    }

    #[pyo3(signature = (seqs, reason, *, fate_unknown = false))]
    fn outbox_dead_letter(&self, seqs: Vec<u64>, reason: &str, fate_unknown: bool) -> PyResult<u64> {
        self.inner.outbox_dead_letter(&seqs, reason, fate_unknown).map_err(to_py_err)
    }

    #[pyo3(signature = (limit = 1000))]
    fn dead_letters<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let letters = self.inner.dead_letters(limit).map_err(to_py_err)?;
        letters
            .iter()
            .map(|letter| {
                let dict = outbox_dict(py, &letter.entry)?;
                dict.set_item("reason", &letter.reason)?;
                dict.set_item("dead_ms", letter.dead_ms)?;
                dict.set_item("requeues", letter.requeues)?;
                dict.set_item("fate_unknown", letter.fate_unknown)?;
                Ok(dict)
            })
            .collect()
    }

    #[pyo3(signature = (seq, *, confirmed_missing = false))]
    fn dead_letter_requeue(&self, seq: u64, confirmed_missing: bool) -> PyResult<u64> {
        self.inner.dead_letter_requeue(seq, confirmed_missing).map_err(to_py_err)
    }

    fn put_document(&self, name: &str, body: &str) -> PyResult<u64> {
        self.inner.put_document(name, body).map_err(to_py_err)
    }

    fn document(&self, name: &str) -> PyResult<Option<String>> {
        self.inner.document(name).map_err(to_py_err)
    }

    /// This data dir's instance id, as 16 hex digits (the middle of every reservation id it issues).
    #[getter]
    fn instance_id(&self) -> String {
        format!("{:016x}", self.inner.instance_id())
    }

    fn outbox_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.inner.outbox_stats().map_err(to_py_err)?;
        let dict = PyDict::new(py);
        dict.set_item("depth", stats.depth)?;
        dict.set_item("oldest_ts_ms", stats.oldest_ts_ms)?;
        dict.set_item("dead_letters", stats.dead_letters)?;
        dict.set_item("max_entries", stats.max_entries)?;
        Ok(dict)
    }

    /// A consistent, compacted copy of the environment in `dest_dir` (new or empty), taken while serving.
    fn backup(&self, py: Python<'_>, dest_dir: PathBuf) -> PyResult<u64> {
        py.detach(|| self.inner.backup(&dest_dir)).map_err(to_py_err)
    }

    fn durable_ticket(&self) -> u64 {
        self.inner.durable_ticket()
    }

    #[pyo3(signature = (ticket, timeout_ms = 30_000))]
    fn wait_durable(&self, py: Python<'_>, ticket: u64, timeout_ms: u64) -> PyResult<()> {
        if ticket <= self.inner.durable_ticket() {
            return Ok(());
        }
        py.detach(|| self.inner.wait_durable(ticket, Duration::from_millis(timeout_ms))).map_err(to_py_err)
    }

    fn notify_fd(&self) -> i32 {
        self.inner.notify_fd()
    }

    fn failure(&self) -> Option<String> {
        self.inner.failure()
    }

    fn reap_expired(&self) -> u64 {
        self.inner.reap_expired()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let dict = PyDict::new(py);
        dict.set_item("budgets", s.budgets)?;
        dict.set_item("active_holds", s.active_holds)?;
        dict.set_item("queue_depth", s.queue_depth)?;
        dict.set_item("durable_ticket", s.durable_ticket)?;
        dict.set_item("map_size_bytes", s.map_size_bytes)?;
        dict.set_item("map_used_bytes", s.map_used_bytes)?;
        dict.set_item("map_capacity_bytes", s.map_capacity_bytes)?;
        dict.set_item("map_high_water_bytes", s.map_high_water_bytes)?;
        dict.set_item("expired_total", s.expired_total)?;
        dict.set_item("batches_total", s.batches_total)?;
        dict.set_item("ops_total", s.ops_total)?;
        dict.set_item("outbox_depth", s.outbox_depth)?;
        dict.set_item("breaker_trips_total", s.breaker_trips_total)?;
        dict.set_item("periods_rolled_total", s.periods_rolled_total)?;
        dict.set_item("alert_seq", s.alert_seq)?;
        dict.set_item("clock_steps_total", s.clock_steps_total)?;
        dict.set_item("clock_step_pending_ms", s.clock_step_pending_ms)?;
        Ok(dict)
    }

    /// Verify the in-memory books; raises EngineError("internal") naming the first broken invariant.
    fn check_invariants(&self) -> PyResult<()> {
        self.inner.check_invariants().map_err(|why| to_py_err(EngineError::internal(why)))
    }

    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close());
    }
}

fn reserve_outcome(o: crate::engine::ReserveOutcome) -> PyReserveOutcome {
    PyReserveOutcome {
        granted: o.granted,
        reservation_id: o.reservation_id,
        remaining: o.remaining,
        reason: o.reason as i32,
        expires_at_ms: o.expires_at_ms,
        replayed: o.replayed,
        amount: o.amount,
        state: o.state.map_or(0, |state| state as i32),
        over_limit: o.over_limit,
        decided_by: o.decided_by,
        ticket: o.ticket,
    }
}

fn outbox_dict<'py>(py: Python<'py>, entry: &OutboxEntry) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("seq", entry.seq)?;
    dict.set_item("identifier", &entry.identifier)?;
    dict.set_item("customer_id", &entry.customer_id)?;
    dict.set_item("stripe_customer_id", &entry.stripe_customer_id)?;
    dict.set_item("amount", entry.amount)?;
    dict.set_item("ts_ms", entry.ts_ms)?;
    dict.set_item("sent_as", entry.sent_as.as_deref())?;
    dict.set_item("first_attempt_ms", entry.first_attempt_ms)?;
    dict.set_item("attempts", entry.attempts)?;
    dict.set_item("requeues", entry.requeues)?;
    dict.set_item("restored_ms", entry.restored_ms)?;
    match &entry.usage {
        Some(usage) => dict.set_item("usage", usage_detail_dict(py, usage)?)?,
        None => dict.set_item("usage", py.None())?,
    }
    Ok(dict)
}

fn usage_detail_dict<'py>(py: Python<'py>, usage: &UsageDetail) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("model", &usage.model)?;
    let parts: Vec<(&str, i64, i64)> =
        usage.parts.iter().map(|part| (part.token_type.as_str(), part.tokens, part.units)).collect();
    dict.set_item("parts", parts)?;
    dict.set_item("cache_hit", usage.cache_hit)?;
    dict.set_item("fallback", usage.fallback)?;
    Ok(dict)
}

fn usage_detail(dict: &Bound<'_, PyDict>) -> PyResult<UsageDetail> {
    let item = |name: &str| dict.get_item(name);
    let model: String = item("model")?.map(|v| v.extract()).transpose()?.unwrap_or_default();
    let parts: Vec<(String, i64, i64)> = item("parts")?.map(|v| v.extract()).transpose()?.unwrap_or_default();
    let cache_hit: bool = item("cache_hit")?.map(|v| v.extract()).transpose()?.unwrap_or(false);
    let fallback: bool = item("fallback")?.map(|v| v.extract()).transpose()?.unwrap_or(false);
    let parts = parts.into_iter().map(|(token_type, tokens, units)| UsagePart { token_type, tokens, units }).collect();
    Ok(UsageDetail { model, parts, cache_hit, fallback })
}

fn parse_mode(mode: &str) -> Result<EnforcementMode, EngineError> {
    match mode {
        "hard" => Ok(EnforcementMode::Hard),
        "soft" => Ok(EnforcementMode::Soft),
        other => Err(EngineError::invalid(format!(
            "mode is {other:?}; use \"hard\" (deny past the limit) or \"soft\" (grant and flag)"
        ))),
    }
}

fn parse_multiplier(multiplier: i64) -> Result<Option<u64>, EngineError> {
    match multiplier {
        -1 => Ok(None),
        m if m >= 0 => Ok(Some(m as u64)),
        other => Err(EngineError::invalid(format!(
            "breaker_multiplier is {other}; use -1 (the server's), 0 (off) or 2..=1000"
        ))),
    }
}

fn parse_period(dict: &Bound<'_, PyDict>) -> PyResult<PeriodRule> {
    let number = |name: &str| -> PyResult<i64> {
        dict.get_item(name)?
            .map(|v| v.extract())
            .transpose()?
            .ok_or_else(|| to_py_err(EngineError::invalid(format!("the period needs {name:?} (Unix milliseconds)"))))
    };
    let kind: String = dict.get_item("kind")?.map(|v| v.extract()).transpose()?.unwrap_or_default();
    match kind.as_str() {
        "lifetime" => Ok(PeriodRule::Lifetime),
        "monthly" => Ok(PeriodRule::Monthly { anchor_ms: number("anchor_ms")? }),
        "fixed" => Ok(PeriodRule::Fixed { anchor_ms: number("anchor_ms")?, length_ms: number("length_ms")? }),
        other => Err(to_py_err(EngineError::invalid(format!(
            "period kind is {other:?}; use \"monthly\", \"fixed\" or \"lifetime\""
        )))),
    }
}

fn usage_dict<'py>(py: Python<'py>, view: &UsageView) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let record = &view.record;
    dict.set_item("customer_id", &view.customer_id)?;
    dict.set_item("period_start_ms", view.period_start_ms)?;
    dict.set_item("period_end_ms", view.period_end_ms)?;
    dict.set_item("current", view.current)?;
    dict.set_item("limit", view.limit)?;
    dict.set_item("included", view.included)?;
    dict.set_item("credits", view.credits)?;
    dict.set_item("granted", record.granted)?;
    dict.set_item("grants", record.grants)?;
    dict.set_item("units", record.units)?;
    dict.set_item("commits", record.commits)?;
    dict.set_item("days", record.days.iter().map(|(day, units)| (*day, *units)).collect::<Vec<_>>())?;
    let models = PyList::empty(py);
    for (model, types) in &record.models {
        for (token_type, totals) in types {
            models.append((model.as_str(), token_type.as_str(), totals.tokens, totals.units))?;
        }
    }
    dict.set_item("models", models)?;
    let dimensions = PyList::empty(py);
    for (key, values) in &record.dimensions {
        for (value, units) in values {
            dimensions.append((key.as_str(), value.as_str(), *units))?;
        }
    }
    dict.set_item("dimensions", dimensions)?;
    Ok(dict)
}

fn ledger_page_dict<'py>(py: Python<'py>, page: &LedgerPage) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let rows: Vec<Bound<'py, PyDict>> =
        page.rows.iter().map(|row| ledger_row_dict(py, row)).collect::<PyResult<_>>()?;
    dict.set_item("entries", rows)?;
    dict.set_item("next_after", page.next_after)?;
    dict.set_item("more", page.more)?;
    dict.set_item("period_start_ms", page.period_start_ms)?;
    dict.set_item("period_end_ms", page.period_end_ms)?;
    dict.set_item("scanned", page.scanned)?;
    Ok(dict)
}

fn ledger_row_dict<'py>(py: Python<'py>, row: &LedgerRow) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let entry = &row.entry;
    dict.set_item("seq", entry.seq)?;
    dict.set_item("reservation_id", &entry.reservation_id)?;
    dict.set_item("customer_id", &entry.customer_id)?;
    dict.set_item("stripe_customer_id", &entry.stripe_customer_id)?;
    dict.set_item("parent", entry.parent.as_deref().unwrap_or(""))?;
    dict.set_item("amount", entry.amount)?;
    dict.set_item("reserved", entry.reserved)?;
    dict.set_item("excess", entry.excess)?;
    dict.set_item("ts_ms", entry.ts_ms)?;
    dict.set_item("settled_ms", entry.settled_ms)?;
    dict.set_item("period_start_ms", entry.period_start_ms)?;
    match &entry.usage {
        Some(usage) => dict.set_item("usage", usage_detail_dict(py, usage)?)?,
        None => dict.set_item("usage", py.None())?,
    }
    dict.set_item("dimensions", entry.dimensions.clone())?;
    dict.set_item("state", row.state.as_str())?;
    dict.set_item("kind", entry.kind.as_str())?;
    dict.set_item("reason", &entry.reason)?;
    dict.set_item("identifier", &row.identifier)?;
    dict.set_item("claim", row.claim.as_deref())?;
    dict.set_item("dead_letter_reason", &row.dead_letter_reason)?;
    dict.set_item("archived", row.archived)?;
    Ok(dict)
}

fn period_record_dict<'py>(py: Python<'py>, period: &PeriodRecord) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("customer_id", &period.customer_id)?;
    dict.set_item("start_ms", period.start_ms)?;
    dict.set_item("end_ms", period.end_ms)?;
    dict.set_item("closed_ms", period.closed_ms)?;
    dict.set_item("limit", period.limit)?;
    dict.set_item("included", period.included)?;
    dict.set_item("spent", period.spent)?;
    dict.set_item("overdraft", period.overdraft)?;
    dict.set_item("credits", period.credits)?;
    Ok(dict)
}

fn alert_dict<'py>(py: Python<'py>, alert: &AlertRecord) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("seq", alert.seq)?;
    dict.set_item("kind", &alert.kind)?;
    dict.set_item("customer_id", &alert.customer_id)?;
    dict.set_item("ts_ms", alert.ts_ms)?;
    dict.set_item("instance_id", format!("{:016x}", alert.instance_id))?;
    dict.set_item("message", &alert.message)?;
    dict.set_item("values", alert.values.clone())?;
    Ok(dict)
}

/// Give a data dir that no process serves (a restore's verified copy) a new instance id; returns it as 16 hex digits.
#[pyfunction]
#[pyo3(signature = (data_dir, *, map_size_mb, now_ms))]
fn renew_identity(py: Python<'_>, data_dir: PathBuf, map_size_mb: u64, now_ms: i64) -> PyResult<String> {
    let id = py.detach(|| crate::engine::renew_identity(&data_dir, map_size_mb, now_ms)).map_err(to_py_err)?;
    Ok(format!("{id:016x}"))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(renew_identity, m)?)?;
    m.add_class::<PyEngine>()?;
    m.add_class::<PyEngineError>()?;
    m.add_class::<PyReserveOutcome>()?;
    m.add_class::<PyCommitOutcome>()?;
    m.add_class::<PyReleaseOutcome>()?;
    m.add_class::<PyBalanceView>()?;
    m.add_class::<PySetBudgetOutcome>()?;
    m.add_class::<PyGrantOutcome>()?;
    m.add("MAX_ID_BYTES", MAX_ID_BYTES)?;
    m.add("MAX_AMOUNT_UNITS", MAX_AMOUNT_UNITS)?;
    m.add("MAX_TTL_MS_CEILING", MAX_TTL_MS_CEILING)?;
    m.add("MAX_LEDGER_PAGE", MAX_LEDGER_PAGE)?;
    m.add("DEFAULT_LEDGER_PAGE", DEFAULT_LEDGER_PAGE)?;
    m.add("MAX_LEDGER_SCAN_PER_PAGE", MAX_LEDGER_SCAN_PER_PAGE)?;
    m.add("MAX_ARCHIVE_SCAN_PER_PAGE", MAX_ARCHIVE_SCAN_PER_PAGE)?;
    m.add("OTHER_VALUE", crate::usage::OTHER_VALUE)?;
    m.add("DENY_NONE", 0)?;
    m.add("DENY_INSUFFICIENT_BUDGET", 1)?;
    m.add("DENY_TOO_MANY_HOLDS", 2)?;
    m.add("DENY_FROZEN", 3)?;
    m.add("ALERT_KINDS", crate::alerts::AlertKind::ALL.map(|kind| kind.as_str()).to_vec())?;
    m.add("DENY_OVERAGE_BLOCKED", 4)?;
    m.add("DENY_UNKNOWN_MODEL", 5)?;
    m.add("DENY_HOLD_ENDED", 6)?;
    m.add("HOLD_ACTIVE", 1)?;
    m.add("HOLD_COMMITTED", 2)?;
    m.add("HOLD_RELEASED", 3)?;
    m.add("HOLD_EXPIRED", 4)?;
    Ok(())
}

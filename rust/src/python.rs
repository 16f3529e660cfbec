//! The thin PyO3 layer: converts arguments and results, nothing else. Built only with the `python` feature.
//! The GIL is released only around work that takes real time: opening (recovery), waiting for durability, closing.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::engine::{BalanceView, Engine, EngineConfig};
use crate::error::EngineError;
use crate::limits::{MAX_AMOUNT_UNITS, MAX_ID_BYTES, MAX_TTL_MS_CEILING};
use crate::records::OutboxEntry;

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
        }
    }
}

#[pyclass(module = "spendgate._core", name = "SetBudgetOutcome", frozen, get_all)]
pub struct PySetBudgetOutcome {
    balance: Py<PyBalanceView>,
    created: bool,
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
        data_dir, *, map_size_mb = 1024, durability = "fsync", default_ttl_ms = 60_000, max_ttl_ms = 3_600_000,
        max_holds_per_budget = 10_000, max_active_holds = 1_000_000, max_budgets = 1_000_000,
        write_queue_capacity = 65_536, reap_interval_ms = 100, resolved_retention_ms = 604_800_000,
        max_outbox_entries = 10_000_000
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        data_dir: PathBuf,
        map_size_mb: u64,
        durability: &str,
        default_ttl_ms: u64,
        max_ttl_ms: u64,
        max_holds_per_budget: u64,
        max_active_holds: u64,
        max_budgets: u64,
        write_queue_capacity: u64,
        reap_interval_ms: u64,
        resolved_retention_ms: u64,
        max_outbox_entries: u64,
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
        config.relaxed = relaxed;
        config.default_ttl_ms = default_ttl_ms;
        config.max_ttl_ms = max_ttl_ms;
        config.max_holds_per_budget = max_holds_per_budget;
        config.max_active_holds = max_active_holds;
        config.max_budgets = max_budgets;
        config.write_queue_capacity = write_queue_capacity;
        config.reap_interval_ms = reap_interval_ms;
        config.resolved_retention_ms = resolved_retention_ms;
        config.max_outbox_entries = max_outbox_entries;
        let inner = py.detach(|| Engine::open(config)).map_err(to_py_err)?;
        Ok(PyEngine { inner })
    }

    #[pyo3(signature = (customer_id, amount, idempotency_key = "", ttl_ms = 0))]
    fn reserve(
        &self,
        customer_id: &str,
        amount: i64,
        idempotency_key: &str,
        ttl_ms: u64,
    ) -> PyResult<PyReserveOutcome> {
        let o = self.inner.reserve(customer_id, amount, idempotency_key, ttl_ms).map_err(to_py_err)?;
        Ok(PyReserveOutcome {
            granted: o.granted,
            reservation_id: o.reservation_id,
            remaining: o.remaining,
            reason: o.reason as i32,
            expires_at_ms: o.expires_at_ms,
            replayed: o.replayed,
            amount: o.amount,
            state: o.state.map_or(0, |state| state as i32),
            ticket: o.ticket,
        })
    }

    fn commit(&self, reservation_id: &str, amount: i64) -> PyResult<PyCommitOutcome> {
        let o = self.inner.commit(reservation_id, amount).map_err(to_py_err)?;
        Ok(PyCommitOutcome {
            charged: o.charged,
            remaining: o.remaining,
            over_reserved: o.over_reserved,
            excess: o.excess,
            replayed: o.replayed,
            hold_expired: o.hold_expired,
            ticket: o.ticket,
        })
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
            ticket: o.ticket,
        })
    }

    fn set_frozen(&self, py: Python<'_>, customer_id: &str, frozen: bool) -> PyResult<PySetBudgetOutcome> {
        let o = self.inner.set_frozen(customer_id, frozen).map_err(to_py_err)?;
        Ok(PySetBudgetOutcome {
            balance: Py::new(py, PyBalanceView::from(o.balance))?,
            created: false,
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

    fn outbox_dead_letter(&self, seqs: Vec<u64>, reason: &str) -> PyResult<u64> {
        self.inner.outbox_dead_letter(&seqs, reason).map_err(to_py_err)
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
                Ok(dict)
            })
            .collect()
    }

    fn dead_letter_requeue(&self, seq: u64) -> PyResult<u64> {
        self.inner.dead_letter_requeue(seq).map_err(to_py_err)
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
        dict.set_item("expired_total", s.expired_total)?;
        dict.set_item("batches_total", s.batches_total)?;
        dict.set_item("ops_total", s.ops_total)?;
        dict.set_item("outbox_depth", s.outbox_depth)?;
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
    Ok(dict)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<PyEngineError>()?;
    m.add_class::<PyReserveOutcome>()?;
    m.add_class::<PyCommitOutcome>()?;
    m.add_class::<PyReleaseOutcome>()?;
    m.add_class::<PyBalanceView>()?;
    m.add_class::<PySetBudgetOutcome>()?;
    m.add("MAX_ID_BYTES", MAX_ID_BYTES)?;
    m.add("MAX_AMOUNT_UNITS", MAX_AMOUNT_UNITS)?;
    m.add("MAX_TTL_MS_CEILING", MAX_TTL_MS_CEILING)?;
    m.add("DENY_NONE", 0)?;
    m.add("DENY_INSUFFICIENT_BUDGET", 1)?;
    m.add("DENY_TOO_MANY_HOLDS", 2)?;
    m.add("DENY_FROZEN", 3)?;
    m.add("HOLD_ACTIVE", 1)?;
    m.add("HOLD_COMMITTED", 2)?;
    m.add("HOLD_RELEASED", 3)?;
    m.add("HOLD_EXPIRED", 4)?;
    Ok(())
}

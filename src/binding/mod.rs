//! The Python binding, thin on top of the pure core: the `_core` extension
//! module, the per-process runtime, the router, logging and settings
//! conversion.

mod events;
mod record;
mod router;
mod runtime;
mod value;

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::checker::config::ReadMode;
use crate::engines::{Observation, Role};
use crate::net::Failure;
use events::EventQueue;
use record::{GroupRecord, NodeRecord};
use runtime::{wait_detached, with_runtime, with_started_runtime};

/// The alias to write to in `group` (default: the first group).
///
/// The hot path: it reads the latest published snapshot, with no I/O, lock
/// or allocation.
#[pyfunction]
#[pyo3(signature = (group=None))]
fn available_db(py: Python<'_>, group: Option<&str>) -> PyResult<Py<PyString>> {
    with_runtime(py, |runtime, thread| {
        runtime.writer(py, thread, runtime.group_index(group)?)
    })
}

/// The alias to read from in `group` (default: the first group): a fresh
/// standby when `READS` allows, else the writer.
#[pyfunction]
#[pyo3(signature = (group=None))]
fn read_db(py: Python<'_>, group: Option<&str>) -> PyResult<Py<PyString>> {
    with_runtime(py, |runtime, thread| {
        runtime.reader(py, thread, runtime.group_index(group)?)
    })
}

/// Status rows for every alias (of `group`).
#[pyfunction]
#[pyo3(signature = (group=None))]
fn status(py: Python<'_>, group: Option<&str>) -> PyResult<Vec<NodeRecord>> {
    with_runtime(py, |runtime, _| {
        let group = group
            .map(|name| runtime.group_index(Some(name)))
            .transpose()?;
        Ok(record::nodes(runtime, group))
    })
}

/// Routing of every group (or of `group`).
#[pyfunction]
#[pyo3(signature = (group=None))]
fn group_status(py: Python<'_>, group: Option<&str>) -> PyResult<Vec<GroupRecord>> {
    with_runtime(py, |runtime, _| {
        let group = group
            .map(|name| runtime.group_index(Some(name)))
            .transpose()?;
        Ok(record::groups(runtime, group))
    })
}

/// Runs a probe round of `group` (or all groups) now and waits for it.
#[pyfunction]
#[pyo3(signature = (group=None))]
fn check_now(py: Python<'_>, group: Option<&str>) -> PyResult<bool> {
    with_runtime(py, |runtime, _| {
        let group = group
            .map(|name| runtime.group_index(Some(name)))
            .transpose()?;
        let ticket = runtime.checker.request_round(group);
        // A queued round may have to wait for the one in flight.
        let limit = runtime.config().timing.connect_timeout * 2 + std::time::Duration::from_secs(1);
        wait_detached(py, limit, |slice| {
            runtime.checker.wait_for_round(ticket, slice)
        })
    })
}

/// Reports that the application saw `alias` fail: re-probes its group now.
#[pyfunction]
fn report_failure(py: Python<'_>, alias: &str) -> PyResult<()> {
    with_runtime(py, |runtime, _| {
        let node = runtime.watched_node(alias)?;
        // It waits (briefly) for the scheduler: never with the interpreter.
        py.detach(|| runtime.checker.report_failure(node));
        Ok(())
    })
}

/// The alias writes of `alias`'s group go to now (the last writer while the
/// group has none); `None` for an alias dbha does not watch.
#[pyfunction]
fn group_writer(py: Python<'_>, alias: &str) -> PyResult<Option<Py<PyString>>> {
    with_runtime(py, |runtime, _| {
        Ok(runtime
            .node_index(alias)
            .map(|node| runtime.alias(py, runtime.group_writer(node))))
    })
}

/// Stops the health checker and waits for its threads. The next call starts
/// a new one.
#[pyfunction]
fn close(py: Python<'_>) {
    runtime::reset(py, true);
}

/// Counts `transaction.atomic()` blocks on `alias` entered (`True`) and
/// left in this thread (`dbha.transactions`).
#[pyfunction]
fn count_atomic(py: Python<'_>, alias: &str, entered: bool) -> PyResult<()> {
    // Bookkeeping only: a transaction must not start the checker.
    with_started_runtime(py, |runtime, thread| {
        runtime.count_atomic(thread, alias, entered);
        Ok(())
    })
    .map(drop)
}

/// This thread turned autocommit on (`True`) or off on its connection to
/// `alias` (`dbha.transactions`).
#[pyfunction]
fn count_autocommit(py: Python<'_>, alias: &str, autocommit: bool) -> PyResult<()> {
    with_started_runtime(py, |runtime, thread| {
        runtime.count_autocommit(thread, alias, autocommit);
        Ok(())
    })
    .map(drop)
}

/// Counts `dbha.use_writer()` blocks entered (`True`) and left.
#[pyfunction]
fn count_writer_pin(entered: bool) {
    runtime::count_writer_pin(entered);
}

/// Forgets the configuration (settings changed); the next call re-reads it.
#[pyfunction]
fn reset(py: Python<'_>) {
    runtime::reset(py, false);
}

/// What is wrong with these settings: `(check id, message)` for the first
/// error and every warning; empty when all is well.
#[pyfunction]
#[pyo3(signature = (databases, dbha, vendors=None))]
fn validate_settings(
    databases: &Bound<'_, PyAny>,
    dbha: &Bound<'_, PyAny>,
    vendors: Option<&Bound<'_, PyAny>>,
) -> Vec<(&'static str, String)> {
    let none = databases.py().None().into_bound(databases.py());
    runtime::problems(databases, dbha, vendors.unwrap_or(&none))
}

/// The groups these settings define, each with its aliases in priority
/// order (none if the settings are invalid): without starting a checker.
#[pyfunction]
#[pyo3(signature = (databases, dbha, vendors=None))]
fn watched_groups(
    databases: &Bound<'_, PyAny>,
    dbha: &Bound<'_, PyAny>,
    vendors: Option<&Bound<'_, PyAny>>,
) -> Vec<(String, Vec<String>)> {
    let none = databases.py().None().into_bound(databases.py());
    runtime::watched_groups(databases, dbha, vendors.unwrap_or(&none))
}

/// Scripts what every probe of `alias` finds (`dbha.testing`), until
/// called again with `state=None`: `"up"` (with `role`, `lag`, `timeline`),
/// or a failure: `"refused"`, `"timeout"`, `"closed"`.
#[pyfunction]
#[pyo3(signature = (alias, state, role=None, lag=None, timeline=None))]
fn simulate(
    alias: &str,
    state: Option<&str>,
    role: Option<&str>,
    lag: Option<f64>,
    timeline: Option<u64>,
) -> PyResult<()> {
    let answer = match state {
        None => None,
        Some("up") => Some(Ok(Observation {
            role: match role {
                None => None,
                Some("primary") => Some(Role::Primary),
                Some("standby") => Some(Role::Standby),
                Some(other) => {
                    return Err(PyValueError::new_err(format!(
                        "role must be 'primary', 'standby' or None, not {other:?}"
                    )))
                }
            },
            lag: lag
                .map(|lag| {
                    Duration::try_from_secs_f64(lag)
                        .map_err(|e| PyValueError::new_err(e.to_string()))
                })
                .transpose()?,
            timeline,
            position: None,
            upstream_timeline: None,
        })),
        Some("refused") => Some(Err(Failure::Refused)),
        Some("timeout") => Some(Err(Failure::Timeout)),
        Some("closed") => Some(Err(Failure::Closed)),
        Some(other) => {
            return Err(PyValueError::new_err(format!(
                "state must be 'up', 'refused', 'timeout', 'closed' or None, not {other:?}"
            )))
        }
    };
    runtime::SCRIPT.set(alias, answer.as_ref());
    Ok(())
}

/// Every alias is probed for real again (`dbha.testing`).
#[pyfunction]
fn clear_simulation() {
    runtime::SCRIPT.clear();
}

/// The core logs at Python's `level` for the `dbha` logger and above.
#[pyfunction]
fn follow_log_level(level: i64) {
    events::follow_level(level);
}

/// A request begins in this thread (`dbha.middleware`): its writes are
/// noted, and reads of each group in `pins` (group name to a time in ms
/// since the epoch) go only to nodes that have replayed up to that time.
#[pyfunction]
fn begin_request(py: Python<'_>, pins: &Bound<'_, PyDict>) -> PyResult<()> {
    with_runtime(py, |runtime, thread| runtime.begin_request(thread, pins))
}

/// How long a client's reads stay pinned after it wrote, in seconds: until
/// every standby that serves reads has replayed the write (`MAX_REPLICA_LAG`
/// and a second for what is on its way); `None` while reads follow writes.
#[pyfunction]
fn pin_window(py: Python<'_>) -> PyResult<Option<f64>> {
    with_runtime(py, |runtime, _| {
        let reads = &runtime.config().reads;
        Ok((reads.mode != ReadMode::Writer).then_some(reads.max_lag.as_secs_f64() + 1.0))
    })
}

/// The request in this thread ends: the names of the groups it wrote to.
#[pyfunction]
fn end_request(py: Python<'_>) -> PyResult<Vec<String>> {
    Ok(
        with_started_runtime(py, |runtime, thread| Ok(runtime.end_request(thread)))?
            .unwrap_or_default(),
    )
}

#[pymodule(gil_used = true)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    runtime::install_fork_handler();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<router::ModelDatabaseRouter>()?;
    m.add_class::<NodeRecord>()?;
    m.add_class::<GroupRecord>()?;
    m.add_class::<EventQueue>()?;
    m.add_function(wrap_pyfunction!(available_db, m)?)?;
    m.add_function(wrap_pyfunction!(read_db, m)?)?;
    m.add_function(wrap_pyfunction!(status, m)?)?;
    m.add_function(wrap_pyfunction!(check_now, m)?)?;
    m.add_function(wrap_pyfunction!(report_failure, m)?)?;
    m.add_function(wrap_pyfunction!(close, m)?)?;
    m.add_function(wrap_pyfunction!(reset, m)?)?;
    m.add_function(wrap_pyfunction!(count_writer_pin, m)?)?;
    m.add_function(wrap_pyfunction!(count_atomic, m)?)?;
    m.add_function(wrap_pyfunction!(count_autocommit, m)?)?;
    m.add_function(wrap_pyfunction!(group_writer, m)?)?;
    m.add_function(wrap_pyfunction!(validate_settings, m)?)?;
    m.add_function(wrap_pyfunction!(group_status, m)?)?;
    m.add_function(wrap_pyfunction!(watched_groups, m)?)?;
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    m.add_function(wrap_pyfunction!(clear_simulation, m)?)?;
    m.add_function(wrap_pyfunction!(follow_log_level, m)?)?;
    m.add_function(wrap_pyfunction!(begin_request, m)?)?;
    m.add_function(wrap_pyfunction!(end_request, m)?)?;
    m.add_function(wrap_pyfunction!(pin_window, m)?)?;
    Ok(())
}

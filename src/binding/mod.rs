//! The Python binding, thin on top of the pure core: the `_core` extension
//! module, the per-process runtime, the router, logging and settings
//! conversion.

mod log;
mod record;
mod router;
mod runtime;
mod value;

use pyo3::prelude::*;
use pyo3::types::PyString;

use record::NodeRecord;
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
        Ok(record::records(runtime, group))
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

/// Raises `ImproperlyConfigured` if these settings cannot be used.
#[pyfunction]
fn validate_settings(databases: &Bound<'_, PyAny>, dbha: &Bound<'_, PyAny>) -> PyResult<()> {
    runtime::config_from(databases, dbha).map(drop)
}

#[pymodule(gil_used = true)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    runtime::install_fork_handler();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<router::ModelDatabaseRouter>()?;
    m.add_class::<NodeRecord>()?;
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
    Ok(())
}

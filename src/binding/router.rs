//! `dbha.ModelDatabaseRouter`: Django's router interface over the checker.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::runtime::with_runtime;

/// Routes every model's reads and writes to its group's healthy writer.
///
/// Add `"dbha.ModelDatabaseRouter"` to `DATABASE_ROUTERS`.
// `subclass`: projects extend it, e.g. with their own `allow_migrate`.
#[pyclass(frozen, subclass, module = "dbha")]
pub struct ModelDatabaseRouter;

// Django calls these as methods; the router itself has no state.
#[allow(clippy::unused_self)]
#[pymethods]
impl ModelDatabaseRouter {
    #[new]
    fn new() -> Self {
        Self
    }

    /// The writer of the model's group (`ROUTES`), or of the group of the
    /// database an `instance` hint was loaded from; no opinion for an
    /// instance from a database dbha does not manage (Django then keeps it
    /// where it lives).
    #[pyo3(signature = (model, **hints))]
    fn db_for_write(
        &self,
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        hints: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Option<Py<PyString>>> {
        with_runtime(py, |runtime, thread| {
            let group = match instance_group(runtime, hints)? {
                Instance::Unmanaged => return Ok(None),
                Instance::In(group) => group,
                Instance::Unknown => runtime.model_route(py, model)?.group,
            };
            runtime.writer(py, thread, group).map(Some)
        })
    }

    /// Reads follow writes unless `READS` sends them to fresh standbys; even
    /// then `WRITER_READS` models, `dbha.use_writer()` blocks and open
    /// transactions on the writer read from the writer. An `instance` hint
    /// chooses the group as for writes.
    #[pyo3(signature = (model, **hints))]
    fn db_for_read(
        &self,
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        hints: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Option<Py<PyString>>> {
        with_runtime(py, |runtime, thread| {
            let mut route = runtime.model_route(py, model)?;
            match instance_group(runtime, hints)? {
                Instance::Unmanaged => return Ok(None),
                Instance::In(group) => route.group = group,
                Instance::Unknown => {}
            }
            if route.writer_reads {
                runtime.route_writer(py, route.group).map(Some)
            } else {
                runtime.reader(py, thread, route.group).map(Some)
            }
        })
    }

    /// Objects relate within a group, not across groups; no opinion about
    /// databases dbha does not manage.
    #[pyo3(signature = (obj1, obj2, **hints))]
    fn allow_relation(
        &self,
        py: Python<'_>,
        obj1: &Bound<'_, PyAny>,
        obj2: &Bound<'_, PyAny>,
        hints: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Option<bool>> {
        let _ = hints;
        let db_of = |obj: &Bound<'_, PyAny>| -> PyResult<Option<String>> {
            obj.getattr(pyo3::intern!(py, "_state"))?
                .getattr(pyo3::intern!(py, "db"))?
                .extract()
        };
        let (db1, db2) = (db_of(obj1)?, db_of(obj2)?);
        with_runtime(py, |runtime, _| {
            let group_of = |db: Option<String>| {
                let node = runtime.node_index(db.as_deref()?)?;
                Some(runtime.config().nodes[node].group)
            };
            Ok(match (group_of(db1), group_of(db2)) {
                (Some(a), Some(b)) => Some(a == b),
                _ => None,
            })
        })
    }

    /// Migrations never apply to a standby or a fenced primary of a group
    /// (`makemigrations` skips them, and `migrate --database` on one stops
    /// with the writer's name, see `dbha.migrate`): they apply to the writer
    /// and replicate. No opinion about other databases.
    #[pyo3(signature = (db, app_label, model_name=None, **hints))]
    fn allow_migrate(
        &self,
        py: Python<'_>,
        db: &str,
        app_label: &Bound<'_, PyAny>,
        model_name: Option<&Bound<'_, PyAny>>,
        hints: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Option<bool>> {
        let _ = (app_label, model_name, hints);
        with_runtime(py, |runtime, _| {
            Ok(runtime
                .node_index(db)
                .filter(|&node| runtime.refuses_writes(node))
                .map(|_| false))
        })
    }
}

/// Where an `instance` hint says the query belongs.
enum Instance {
    /// No instance, or one not saved to any database yet.
    Unknown,
    /// Loaded from (or saved to) a member of this group.
    In(usize),
    /// From a database dbha does not manage.
    Unmanaged,
}

fn instance_group(
    runtime: &super::runtime::Runtime,
    hints: Option<&Bound<'_, PyDict>>,
) -> PyResult<Instance> {
    let Some(hints) = hints.filter(|h| !h.is_empty()) else {
        return Ok(Instance::Unknown);
    };
    let py = hints.py();
    let Some(instance) = hints.get_item(pyo3::intern!(py, "instance"))? else {
        return Ok(Instance::Unknown);
    };
    let db = instance
        .getattr(pyo3::intern!(py, "_state"))
        .and_then(|state| state.getattr(pyo3::intern!(py, "db")));
    let Ok(db) = db else {
        // Not a model instance: no hint.
        return Ok(Instance::Unknown);
    };
    if db.is_none() {
        return Ok(Instance::Unknown);
    }
    let Ok(alias) = db.extract::<&str>() else {
        return Ok(Instance::Unknown);
    };
    Ok(match runtime.node_index(alias) {
        Some(node) => Instance::In(runtime.config().nodes[node].group),
        None => Instance::Unmanaged,
    })
}

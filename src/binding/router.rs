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

    #[pyo3(signature = (model, **hints))]
    fn db_for_write(
        &self,
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        hints: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyString>> {
        let _ = hints;
        with_runtime(py, |runtime, thread| {
            runtime.writer(py, thread, runtime.model_route(py, model)?.group)
        })
    }

    /// Reads follow writes unless `READS` sends them to fresh standbys; even
    /// then `WRITER_READS` models, `dbha.use_writer()` blocks and open
    /// transactions on the writer read from the writer.
    #[pyo3(signature = (model, **hints))]
    fn db_for_read(
        &self,
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        hints: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyString>> {
        let _ = hints;
        with_runtime(py, |runtime, thread| {
            let route = runtime.model_route(py, model)?;
            if route.writer_reads {
                runtime.route_writer(py, route.group)
            } else {
                runtime.reader(py, thread, route.group)
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

    /// No opinion: migrations run where Django's `migrate --database` says.
    #[pyo3(signature = (db, app_label, model_name=None, **hints))]
    fn allow_migrate(
        &self,
        db: &Bound<'_, PyAny>,
        app_label: &Bound<'_, PyAny>,
        model_name: Option<&Bound<'_, PyAny>>,
        hints: Option<&Bound<'_, PyDict>>,
    ) -> Option<bool> {
        let _ = (db, app_label, model_name, hints);
        None
    }
}

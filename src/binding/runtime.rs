//! The process-wide checker as Python sees it: started lazily from Django
//! settings on first use, restarted in the child after a fork, and read
//! lock-free on the hot path.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use parking_lot::{Mutex, MutexGuard};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::log as py_log;
use super::value::to_value;
use crate::checker::config::{Balance, Config, ConfigError, OnAllDown, ReadMode};
use crate::checker::{Checker, NetworkProber, Route, Snapshot};
use crate::engines::Role;

pyo3::import_exception!(django.core.exceptions, ImproperlyConfigured);
pyo3::import_exception!(dbha.exceptions, NoHealthyDatabase);
pyo3::import_exception!(django.utils.connection, ConnectionDoesNotExist);

/// Longest slice of a blocking wait before checking for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Bumped in the child after every fork: a runtime from an older generation
/// belongs to the parent, whose threads the child does not have.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static RUNTIME: ArcSwapOption<Runtime> = ArcSwapOption::const_empty();
/// Bumped whenever `RUNTIME` changes or the process forks: it tells each
/// thread's cached runtime (below) whether it is still the current one.
static EPOCH: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's copy of the current runtime and the epoch it was read
    /// at. It keeps the hot path to one atomic load: loading `RUNTIME`
    /// itself costs as much again as a Python function call.
    static CURRENT: RefCell<(u64, Option<Arc<Runtime>>)> = const { RefCell::new((0, None)) };
}
/// Serialises starting a runtime. Only ever locked detached from the
/// interpreter (see `lock_detached`), so it cannot deadlock with the GIL.
static START: Mutex<()> = Mutex::new(());

pub struct Runtime {
    generation: u64,
    id: u64,
    pub checker: Checker,
    /// Per node, the alias as an interned Python string: the hot path
    /// returns a new reference, never a new string.
    aliases: Vec<Py<PyString>>,
    /// Model class to its [`ModelRoute`] (packed), when settings make it vary.
    model_routes: Option<Py<PyDict>>,
    /// What pins reads to the writer, when reads may go elsewhere.
    pins: Option<ReadPins>,
    /// Set once the first probe round is in (or its wait timed out).
    informed: AtomicBool,
}

/// Where a model's queries go.
#[derive(Clone, Copy)]
pub struct ModelRoute {
    pub group: usize,
    /// `WRITER_READS`: its reads stay on the writer (sessions, auth).
    pub writer_reads: bool,
}

/// What keeps reads on the writer: `dbha.use_writer()` (a `ContextVar`)
/// and an open `transaction.atomic()` on the writer's connection.
struct ReadPins {
    use_writer: Py<PyAny>,
    connections: Py<PyAny>,
}

/// Open `use_writer()` blocks in the whole process: while there are none,
/// the router need not look up the `ContextVar`.
static OPEN_WRITER_PINS: AtomicUsize = AtomicUsize::new(0);

/// Numbers runtimes, so that per-thread caches can tell them apart.
static RUNTIME_IDS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Round-robin position; per thread, so readers share no counter.
    static NEXT_READER: Cell<u32> = const { Cell::new(0) };
    /// This thread's Django connection objects (`connections[alias]`) by
    /// node, for the runtime with this id. Django keeps one per thread and
    /// alias for good, and looking it up costs a microsecond.
    static CONNECTIONS: RefCell<(u64, Vec<Option<Py<PyAny>>>)> = const { RefCell::new((u64::MAX, Vec::new())) };
}

/// `use_writer()` entered (`true`) or left.
pub fn count_writer_pin(entered: bool) {
    if entered {
        OPEN_WRITER_PINS.fetch_add(1, Ordering::Relaxed);
    } else {
        // Never below zero, even if a block is left twice.
        let _ = OPEN_WRITER_PINS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

impl Runtime {
    pub fn config(&self) -> &Config {
        self.checker.config()
    }

    pub fn group_index(&self, name: Option<&str>) -> PyResult<usize> {
        let Some(name) = name else { return Ok(0) };
        self.config().group_index(name).ok_or_else(|| {
            let known: Vec<_> = self
                .config()
                .groups
                .iter()
                .map(|g| format!("'{}'", g.name))
                .collect();
            PyValueError::new_err(format!(
                "unknown dbha group '{name}'; groups are {}",
                known.join(", ")
            ))
        })
    }

    pub fn node_index(&self, alias: &str) -> Option<usize> {
        self.config().node_index(alias)
    }

    /// The group a model's queries go to (`ROUTES`) and whether its reads
    /// stay on the writer (`WRITER_READS`); cached per model class.
    pub fn model_route(&self, py: Python<'_>, model: &Bound<'_, PyAny>) -> PyResult<ModelRoute> {
        let Some(cache) = &self.model_routes else {
            return Ok(ModelRoute {
                group: 0,
                writer_reads: false,
            });
        };
        let cache = cache.bind(py);
        let packed: usize = match cache.get_item(model)? {
            Some(packed) => packed.extract()?,
            None => {
                let meta = model.getattr(pyo3::intern!(py, "_meta"))?;
                let label: String = meta.getattr(pyo3::intern!(py, "label_lower"))?.extract()?;
                let app_label: String = meta.getattr(pyo3::intern!(py, "app_label"))?.extract()?;
                let app_label = app_label.to_lowercase();
                let config = self.config();
                let group = config
                    .routes
                    .get(&label)
                    .or_else(|| config.routes.get(&app_label))
                    .copied()
                    .unwrap_or(0);
                let writer_reads = config
                    .reads
                    .writer_only
                    .iter()
                    .any(|l| *l == label || *l == app_label);
                let packed = group << 1 | usize::from(writer_reads);
                cache.set_item(model, packed)?;
                packed
            }
        };
        Ok(ModelRoute {
            group: packed >> 1,
            writer_reads: packed & 1 == 1,
        })
    }

    /// The alias to read from in `group`: a fresh standby (`READS`,
    /// `LOAD_BALANCE`), or the writer when none qualifies or reads are
    /// pinned to it.
    pub fn reader(&self, py: Python<'_>, group: usize) -> PyResult<Py<PyString>> {
        let readers = self.checker.readers(group);
        if readers == 0 || self.reads_pinned(py, group)? {
            return self.writer(py, group);
        }
        let first = self.config().groups[group].members.start;
        let count = readers.count_ones();
        let node = match self.config().reads.balance {
            Balance::Latency => self.checker.fastest_reader(group),
            Balance::RoundRobin => Some(first + nth_set_bit(readers, NEXT_READER.get() % count)),
            Balance::Random => Some(first + nth_set_bit(readers, fastrand::u32(..count))),
        }
        .unwrap_or(first + readers.trailing_zeros() as usize);
        NEXT_READER.set(NEXT_READER.get().wrapping_add(1));
        Ok(self.aliases[node].clone_ref(py))
    }

    fn reads_pinned(&self, py: Python<'_>, group: usize) -> PyResult<bool> {
        let Some(pins) = &self.pins else {
            return Ok(false);
        };
        if OPEN_WRITER_PINS.load(Ordering::Relaxed) > 0
            && pins
                .use_writer
                .call_method0(py, pyo3::intern!(py, "get"))?
                .is_truthy(py)?
        {
            return Ok(true);
        }
        let (Route::Healthy(writer) | Route::AllDown(writer)) = self.checker.route(group);
        let Some(connection) = self.django_connection(py, pins, writer)? else {
            return Ok(false);
        };
        connection
            .bind(py)
            .getattr(pyo3::intern!(py, "in_atomic_block"))?
            .is_truthy()
    }

    /// This thread's `connections[alias]` for `node`; `None` if Django has
    /// no such connection (then no transaction can be open on it).
    fn django_connection(
        &self,
        py: Python<'_>,
        pins: &ReadPins,
        node: usize,
    ) -> PyResult<Option<Py<PyAny>>> {
        let cached = CONNECTIONS.with_borrow(|(id, by_node)| {
            let connection = by_node.get(node).and_then(Option::as_ref);
            connection
                .filter(|_| *id == self.id)
                .map(|c| c.clone_ref(py))
        });
        if let Some(connection) = cached {
            return Ok(Some(connection));
        }
        let connection = match pins
            .connections
            .bind(py)
            .get_item(self.aliases[node].bind(py))
        {
            Ok(connection) => connection.unbind(),
            Err(e) if e.is_instance_of::<ConnectionDoesNotExist>(py) => return Ok(None),
            Err(e) => return Err(e),
        };
        CONNECTIONS.with_borrow_mut(|(id, by_node)| {
            if *id != self.id {
                *id = self.id;
                by_node.clear();
            }
            by_node.resize_with(self.aliases.len(), || None);
            by_node[node] = Some(connection.clone_ref(py));
        });
        Ok(Some(connection))
    }

    /// The alias to write to in `group`.
    #[inline]
    pub fn writer(&self, py: Python<'_>, group: usize) -> PyResult<Py<PyString>> {
        match self.checker.route(group) {
            Route::Healthy(node) => Ok(self.aliases[node].clone_ref(py)),
            Route::AllDown(node) => match self.config().on_all_down {
                OnAllDown::Last => Ok(self.aliases[node].clone_ref(py)),
                OnAllDown::Raise => Err(NoHealthyDatabase::new_err(self.all_down_message(group))),
            },
        }
    }

    #[cold]
    fn all_down_message(&self, group: usize) -> String {
        let config = self.config();
        format!(
            "no healthy database in group '{}': {}",
            config.groups[group].name,
            self.checker.snapshot().describe_group(config, group)
        )
    }
}

/// Runs `f` with the current runtime, starting it (and awaiting its first
/// round) if needed. The fast path is a thread-local read and one atomic load.
#[inline]
pub fn with_runtime<R>(py: Python<'_>, f: impl FnOnce(&Runtime) -> PyResult<R>) -> PyResult<R> {
    let epoch = EPOCH.load(Ordering::Acquire);
    CURRENT.with(|current| {
        // A shared borrow: `f` may run Python code that calls back in here.
        if let Ok(cached) = current.try_borrow() {
            if let (true, Some(runtime)) = (cached.0 == epoch, &cached.1) {
                return f(runtime);
            }
        }
        let runtime = start(py)?;
        if let Ok(mut cached) = current.try_borrow_mut() {
            *cached = (epoch, Some(Arc::clone(&runtime)));
        }
        f(&runtime)
    })
}

/// The position of the `n`th set bit of `mask` (`n` < its count of ones).
fn nth_set_bit(mut mask: u64, n: u32) -> usize {
    for _ in 0..n {
        mask &= mask - 1;
    }
    mask.trailing_zeros() as usize
}

/// The current runtime, informed by its first round: started if there is
/// none, or none of this process's own (after a fork).
#[cold]
fn start(py: Python<'_>) -> PyResult<Arc<Runtime>> {
    let runtime = {
        let _start = lock_detached(py, &START);
        let generation = FORK_GENERATION.load(Ordering::Relaxed);
        let current = RUNTIME.load_full();
        match current {
            Some(runtime) if runtime.generation == generation => runtime,
            previous => {
                let seed = previous.map(|parent| {
                    // The parent's threads do not exist here, and its locks
                    // may be held forever: read its last snapshot (lock-free)
                    // and never drop it.
                    let seed = Snapshot::clone(&parent.checker.snapshot());
                    std::mem::forget(parent);
                    py_log::forget_after_fork();
                    seed
                });
                let runtime = Arc::new(new_runtime(py, generation, seed.as_ref())?);
                RUNTIME.store(Some(Arc::clone(&runtime)));
                EPOCH.fetch_add(1, Ordering::AcqRel);
                runtime
            }
        }
    };
    if !runtime.informed.load(Ordering::Relaxed) {
        // One probe round finishes within the deadline; a little slack on top.
        let limit = runtime.config().timing.connect_timeout + Duration::from_millis(250);
        wait_detached(py, limit, |slice| runtime.checker.wait_for_round(1, slice))?;
        runtime.informed.store(true, Ordering::Relaxed);
    }
    Ok(runtime)
}

fn new_runtime(py: Python<'_>, generation: u64, seed: Option<&Snapshot>) -> PyResult<Runtime> {
    let config = Arc::new(read_config(py)?);
    let aliases = config
        .nodes
        .iter()
        .map(|n| PyString::intern(py, &n.alias).unbind())
        .collect();
    let replica_reads = config.reads.mode != ReadMode::Writer;
    let model_routes = ((config.groups.len() > 1 && !config.routes.is_empty())
        || (replica_reads && !config.reads.writer_only.is_empty()))
    .then(|| PyDict::new(py).unbind());
    let pins = if replica_reads {
        Some(ReadPins {
            use_writer: py.import("dbha.routing")?.getattr("USE_WRITER")?.unbind(),
            connections: py.import("django.db")?.getattr("connections")?.unbind(),
        })
    } else {
        None
    };
    if !py_log::running() {
        py_log::start();
    }
    let checker = Checker::start(config, Arc::new(NetworkProber), seed).map_err(|e| {
        PyOSError::new_err(format!("dbha: cannot start the health checker thread: {e}"))
    })?;
    Ok(Runtime {
        generation,
        id: RUNTIME_IDS.fetch_add(1, Ordering::Relaxed),
        checker,
        aliases,
        model_routes,
        pins,
        informed: AtomicBool::new(seed.is_some()),
    })
}

/// Reads `settings.DATABASES` and `settings.DBHA` through `dbha.conf`.
fn read_config(py: Python<'_>) -> PyResult<Config> {
    let (databases, dbha): (Bound<'_, PyAny>, Bound<'_, PyAny>) = py
        .import("dbha.conf")?
        .call_method0("read_settings")?
        .extract()?;
    config_from(&databases, &dbha)
}

pub fn config_from(databases: &Bound<'_, PyAny>, dbha: &Bound<'_, PyAny>) -> PyResult<Config> {
    Config::from_settings(&to_value(databases), &to_value(dbha))
        .map_err(|e| improperly_configured(&e))
}

fn improperly_configured(e: &ConfigError) -> PyErr {
    ImproperlyConfigured::new_err(format!("dbha: {e}"))
}

/// Takes `lock` without holding the interpreter while waiting for it.
fn lock_detached<'a>(py: Python<'_>, lock: &'a Mutex<()>) -> MutexGuard<'a, ()> {
    loop {
        if let Some(guard) = lock.try_lock() {
            return guard;
        }
        py.detach(|| drop(lock.lock()));
    }
}

/// Runs `wait` detached from the interpreter in short slices until it
/// returns true or `limit` passes, raising if a signal handler does (Ctrl-C).
pub fn wait_detached(
    py: Python<'_>,
    limit: Duration,
    wait: impl Fn(Duration) -> bool + Send + Sync,
) -> PyResult<bool> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        if py.detach(|| wait(left.min(SIGNAL_POLL))) {
            return Ok(true);
        }
        py.check_signals()?;
    }
}

/// Drops the runtime so that the next call reads settings afresh
/// (`setting_changed`). With `join`, also waits for its threads.
pub fn reset(py: Python<'_>, join: bool) {
    let _start = lock_detached(py, &START);
    let Some(runtime) = RUNTIME.swap(None) else {
        return;
    };
    EPOCH.fetch_add(1, Ordering::AcqRel);
    if runtime.generation != FORK_GENERATION.load(Ordering::Relaxed) {
        std::mem::forget(runtime);
        py_log::forget_after_fork();
        return;
    }
    if join {
        py.detach(|| {
            runtime.checker.stop(true);
            py_log::stop();
        });
    } else {
        runtime.checker.stop(false);
    }
}

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
    EPOCH.fetch_add(1, Ordering::AcqRel);
}

/// Registers the fork handler once per process.
pub fn install_fork_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: registers a plain function that only touches atomics,
        // which is async-signal-safe as a child fork handler must be.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
}

/// One status row: alias, group, state, role, latency (s), replication lag
/// (s), last error, checked at (epoch s), consecutive successes and
/// failures, is writer, split brain (a primary fenced off from writes).
pub type StatusRow = (
    String,
    String,
    &'static str,
    &'static str,
    Option<f64>,
    Option<f64>,
    Option<String>,
    Option<f64>,
    u32,
    u32,
    bool,
    bool,
);

pub fn status_rows(runtime: &Runtime, group: Option<usize>) -> Vec<StatusRow> {
    let config = runtime.config();
    let snapshot = runtime.checker.snapshot();
    config
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, node)| group.is_none_or(|g| g == node.group))
        .map(|(i, node)| {
            let health = &snapshot.nodes[i];
            (
                node.alias.clone(),
                config.groups[node.group].name.clone(),
                health.health.as_str(),
                match health.role {
                    Some(Role::Primary) => "primary",
                    Some(Role::Standby) => "standby",
                    None => "unknown",
                },
                health.latency.map(|l| l.as_secs_f64()),
                health.lag.map(|l| l.as_secs_f64()),
                health.last_error.as_ref().map(ToString::to_string),
                health
                    .checked_at
                    .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs_f64()),
                health.successes,
                health.failures,
                snapshot.writers[node.group] == Some(i),
                snapshot.fenced[i],
            )
        })
        .collect()
}

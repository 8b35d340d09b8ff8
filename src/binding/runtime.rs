//! The process-wide checker as Python sees it: started lazily from Django
//! settings on first use, restarted in the child after a fork, and read
//! lock-free on the hot path.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Once};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::events::{self as py_events, Queue};
use super::value::to_value;
use crate::checker::config::{Balance, Config, ConfigError, OnAllDown, ReadMode};
use crate::checker::reads::{caught_up_mask, model_route, pick_reader, ModelRoute};
use crate::checker::script::{Script, ScriptedProber};
use crate::checker::value::Value;
use crate::checker::{Checker, NetworkProber, Route, Snapshot};

pyo3::import_exception!(django.core.exceptions, ImproperlyConfigured);
pyo3::import_exception!(dbha.exceptions, NoHealthyDatabase);

/// Longest slice of a blocking wait before checking for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Bumped in the child after every fork: a runtime from an older generation
/// belongs to the parent, whose threads the child does not have.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static RUNTIME: ArcSwapOption<Runtime> = ArcSwapOption::const_empty();
/// Bumped whenever `RUNTIME` changes or the process forks: it tells each
/// thread's cached runtime (below) whether it is still the current one.
static EPOCH: AtomicU64 = AtomicU64::new(1);
/// Scripted answers (`dbha.testing`), by alias: they outlive a runtime, so
/// that a test's script holds across `override_settings`.
pub static SCRIPT: LazyLock<Arc<Script>> = LazyLock::new(Arc::default);

thread_local! {
    /// This thread's copy of the current runtime, the epoch it was read at,
    /// and its per-thread routing state. One thread-local for all of it
    /// keeps the hot path to one lookup and one atomic load: loading
    /// `RUNTIME` itself costs as much again as a Python function call.
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

struct Current {
    epoch: u64,
    runtime: Arc<Runtime>,
    reads: ThreadReads,
}

/// Serialises starting and dropping a runtime. A flag rather than a mutex:
/// the fork handler must be able to release it in the child (a thread of
/// the parent may have held it at the fork, and that thread does not exist
/// there), which only an atomic store does safely.
static STARTING: AtomicBool = AtomicBool::new(false);

struct StartGuard;

impl Drop for StartGuard {
    fn drop(&mut self) {
        STARTING.store(false, Ordering::Release);
    }
}

/// Takes the start flag, waiting for it detached from the interpreter (the
/// holder may need the interpreter to finish).
fn lock_start(py: Python<'_>) -> StartGuard {
    loop {
        if STARTING
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return StartGuard;
        }
        py.detach(|| std::thread::sleep(Duration::from_millis(1)));
    }
}

pub struct Runtime {
    generation: u64,
    pub checker: Checker,
    /// Per node, the alias as an interned Python string: the hot path
    /// returns a new reference, never a new string.
    aliases: Vec<Py<PyString>>,
    /// Model class to its [`ModelRoute`] (packed), when settings make it vary.
    model_routes: Option<Py<PyDict>>,
    /// What pins reads to the writer, when reads may go elsewhere.
    pins: Option<ReadPins>,
    /// Reads may go to standbys and must then see this thread's writes.
    tracks_writes: bool,
    /// Hands its events and log records to Python ...
    events: Arc<Queue>,
    /// ... where this `threading.Thread` takes them (`dbha.events`).
    events_thread: Option<Py<PyAny>>,
    /// Set once the first probe round is in (or its wait timed out).
    informed: AtomicBool,
}

/// What keeps reads on the writer besides an open `transaction.atomic()`
/// block: `dbha.use_writer()`, a `ContextVar`.
struct ReadPins {
    use_writer: Py<PyAny>,
}

/// Open `use_writer()` blocks in the whole process: while there are none,
/// the router need not look up the `ContextVar`.
static OPEN_WRITER_PINS: AtomicUsize = AtomicUsize::new(0);

/// A write in this context that no read has followed yet (see `reader`).
const WRITE_PENDING: u64 = u64::MAX;

/// What the hot path keeps per thread for one runtime. Cells: it is used
/// under a shared borrow, as the router may be re-entered.
pub struct ThreadReads {
    /// Round-robin position; per thread, so readers share no counter.
    turn: Cell<u32>,
    /// Per group: 0 (no write), `WRITE_PENDING`, or the writer probe number
    /// a standby must have caught up with to serve this thread's reads.
    writes: Box<[Cell<u64>]>,
    /// Per node: `transaction.atomic()` blocks open on it in this thread
    /// (`dbha.transactions`).
    atomic: Box<[Cell<u32>]>,
    /// Per node: this thread's connection to it has autocommit off, so a
    /// transaction may be open on it.
    manual: Box<[Cell<bool>]>,
    /// A request handled by `dbha.middleware.PinningMiddleware` runs in
    /// this thread: its writes are noted (see `request_writes`), and its
    /// reads after a write go only where the write is.
    in_request: Cell<bool>,
    /// The groups this request wrote to, one bit each (groups past the
    /// 63rd share the last bit).
    request_writes: Cell<u64>,
    /// Per group: this request's client wrote at this time (ms since the
    /// epoch; 0: no pin), so its reads go only to nodes replayed past it.
    pinned_through: Box<[Cell<u64>]>,
}

/// A group's bit in `ThreadReads::request_writes`.
fn group_bit(group: usize) -> u64 {
    1 << group.min(63)
}

impl ThreadReads {
    fn new(runtime: &Runtime) -> Self {
        Self {
            turn: Cell::new(0),
            writes: (0..runtime.config().groups.len())
                .map(|_| Cell::new(0))
                .collect(),
            atomic: (0..runtime.aliases.len()).map(|_| Cell::new(0)).collect(),
            manual: (0..runtime.aliases.len())
                .map(|_| Cell::new(false))
                .collect(),
            in_request: Cell::new(false),
            request_writes: Cell::new(0),
            pinned_through: (0..runtime.config().groups.len())
                .map(|_| Cell::new(0))
                .collect(),
        }
    }

    /// This thread's state for `runtime`. With replica reads, it starts
    /// from the transactions the thread has open now, as Django's
    /// connections know them: they may have opened before dbha started, in
    /// the parent before a fork, or under other settings.
    fn for_thread(py: Python<'_>, runtime: &Runtime) -> Self {
        let reads = Self::new(runtime);
        if runtime.pins.is_none() {
            return reads;
        }
        let aliases: Vec<&str> = runtime
            .config()
            .nodes
            .iter()
            .map(|node| node.alias.as_str())
            .collect();
        let open = py
            .import("dbha.transactions")
            .and_then(|module| module.call_method1("open_transactions", (aliases,)))
            .and_then(|open| open.extract::<Vec<(u32, bool)>>());
        match open {
            Ok(open) => {
                for (node, (depth, manual)) in open.into_iter().enumerate().take(reads.atomic.len())
                {
                    reads.atomic[node].set(depth);
                    reads.manual[node].set(manual);
                }
            }
            Err(e) => e.write_unraisable(py, None),
        }
        reads
    }
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
            let known = quoted(self.config().groups.iter().map(|g| g.name.as_str()));
            PyValueError::new_err(format!("unknown dbha group '{name}'; groups are {known}"))
        })
    }

    pub fn node_index(&self, alias: &str) -> Option<usize> {
        self.config().node_index(alias)
    }

    /// `node`'s alias, as the interned string the hot path hands out.
    pub fn alias(&self, py: Python<'_>, node: usize) -> Py<PyString> {
        self.aliases[node].clone_ref(py)
    }

    /// A standby, or a primary fenced off from writes (an older timeline, a
    /// split brain): nothing may be written there.
    pub fn refuses_writes(&self, node: usize) -> bool {
        let snapshot = self.checker.snapshot();
        snapshot.fenced[node] || snapshot.nodes[node].role == Some(crate::engines::Role::Standby)
    }

    /// The node writes of `node`'s group go to now (the last writer while
    /// the group has none).
    pub fn group_writer(&self, node: usize) -> usize {
        self.checker.route(self.config().nodes[node].group).node()
    }

    /// The node of a watched `alias`, else a `ValueError` listing them.
    pub fn watched_node(&self, alias: &str) -> PyResult<usize> {
        self.node_index(alias).ok_or_else(|| {
            let known = quoted(self.config().nodes.iter().map(|n| n.alias.as_str()));
            PyValueError::new_err(format!(
                "dbha does not watch alias '{alias}'; it watches {known}"
            ))
        })
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
                let route = model_route(self.config(), &label, &app_label.to_lowercase());
                let packed = route.group << 1 | usize::from(route.writer_reads);
                cache.set_item(model, packed)?;
                packed
            }
        };
        Ok(ModelRoute {
            group: packed >> 1,
            writer_reads: packed & 1 == 1,
        })
    }

    /// The alias to write to in `group`; notes the write for this thread's
    /// reads that follow (read-your-writes).
    #[inline]
    pub fn writer(
        &self,
        py: Python<'_>,
        thread: &ThreadReads,
        group: usize,
    ) -> PyResult<Py<PyString>> {
        if self.tracks_writes || thread.in_request.get() {
            thread.writes[group].set(WRITE_PENDING);
            thread
                .request_writes
                .set(thread.request_writes.get() | group_bit(group));
        }
        self.route_writer(py, group)
    }

    /// See `_core.begin_request`.
    pub fn begin_request(&self, thread: &ThreadReads, pins: &Bound<'_, PyDict>) -> PyResult<()> {
        thread.in_request.set(true);
        thread.request_writes.set(0);
        for cell in &thread.pinned_through {
            cell.set(0);
        }
        for (name, through) in pins.iter() {
            // A cookie from another configuration may name a group no more.
            let group = name
                .extract::<&str>()
                .ok()
                .and_then(|name| self.config().group_index(name));
            if let Some(group) = group {
                thread.pinned_through[group].set(through.extract()?);
            }
        }
        Ok(())
    }

    /// See `_core.end_request`.
    pub fn end_request(&self, thread: &ThreadReads) -> Vec<String> {
        thread.in_request.set(false);
        for cell in &thread.pinned_through {
            cell.set(0);
        }
        let written = thread.request_writes.replace(0);
        self.config()
            .groups
            .iter()
            .enumerate()
            .filter(|(g, _)| written & group_bit(*g) != 0)
            .map(|(_, group)| group.name.clone())
            .collect()
    }

    /// The alias writes go to, noting nothing (reads of `WRITER_READS`
    /// models).
    #[inline]
    pub fn route_writer(&self, py: Python<'_>, group: usize) -> PyResult<Py<PyString>> {
        match self.checker.route(group) {
            Route::Healthy(node) => Ok(self.aliases[node].clone_ref(py)),
            Route::AllDown(node) => match self.config().on_all_down {
                OnAllDown::Last => Ok(self.aliases[node].clone_ref(py)),
                OnAllDown::Raise => Err(NoHealthyDatabase::new_err(self.all_down_message(group))),
            },
            // The application's own attempts fail there too: failing now
            // beats every request waiting out the driver's connect timeout.
            Route::Failing(_) => Err(NoHealthyDatabase::new_err(self.all_down_message(group))),
        }
    }

    /// The alias to read from in `group`: a standby whose lag bound holds
    /// (`READS`, `LOAD_BALANCE`) and that has this thread's writes, or the
    /// writer when none qualifies or reads are pinned to it.
    pub fn reader(
        &self,
        py: Python<'_>,
        thread: &ThreadReads,
        group: usize,
    ) -> PyResult<Py<PyString>> {
        let mut mask = self.checker.readers(group);
        if mask == 0 || self.reads_pinned(py, thread, group)? {
            return self.route_writer(py, group);
        }
        let first = self.config().groups[group].members.start;
        let through = thread.pinned_through[group].get();
        if through != 0 {
            mask = caught_up_mask(mask, through, |bit| {
                self.checker.replayed_through(first + bit as usize)
            });
            if mask == 0 {
                return self.route_writer(py, group);
            }
        }
        let mut needed = thread.writes[group].get();
        if needed == WRITE_PENDING {
            // The write has committed by now: a writer probe sent from now
            // on finds it.
            needed = self.checker.writer_probes(group) + 1;
            thread.writes[group].set(needed);
        }
        if needed > self.checker.least_caught_up(group) {
            mask = caught_up_mask(mask, needed, |bit| {
                self.checker.caught_up(first + bit as usize)
            });
            if mask == 0 {
                return self.route_writer(py, group);
            }
        }
        let turn = thread.turn.get();
        thread.turn.set(turn.wrapping_add(1));
        let bit = match self.config().reads.balance {
            Balance::RoundRobin => pick_reader(mask, Balance::RoundRobin, turn, 0, None),
            Balance::Random => pick_reader(mask, Balance::Random, 0, fastrand::u32(..), None),
            Balance::Latency => {
                let fastest = self
                    .checker
                    .fastest_reader(group)
                    .and_then(|node| u32::try_from(node - first).ok());
                pick_reader(mask, Balance::Latency, 0, 0, fastest)
            }
        };
        Ok(self.aliases[first + bit as usize].clone_ref(py))
    }

    /// Reads go to the writer inside `use_writer()` and while this thread has
    /// a transaction open on the writer (`transaction.atomic()`, or
    /// autocommit turned off).
    fn reads_pinned(&self, py: Python<'_>, thread: &ThreadReads, group: usize) -> PyResult<bool> {
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
        let writer = self.checker.route(group).node();
        Ok(thread.atomic[writer].get() > 0 || thread.manual[writer].get())
    }

    /// This thread turned autocommit on or off on its connection to `alias`.
    pub fn count_autocommit(&self, thread: &ThreadReads, alias: &str, autocommit: bool) {
        if let Some(node) = self.node_index(alias) {
            thread.manual[node].set(!autocommit);
        }
    }

    /// A `transaction.atomic()` block on `alias` opened (`entered`) or
    /// closed in this thread.
    pub fn count_atomic(&self, thread: &ThreadReads, alias: &str, entered: bool) {
        if let Some(node) = self.node_index(alias) {
            let depth = &thread.atomic[node];
            depth.set(if entered {
                depth.get().saturating_add(1)
            } else {
                // A block opened before this runtime started is not counted.
                depth.get().saturating_sub(1)
            });
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

/// `'a', 'b'`: names for a message.
fn quoted<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `f` with the current runtime and this thread's state for it,
/// starting the runtime (and awaiting its first round) if needed. The fast
/// path is a thread-local read and one atomic load.
#[inline]
pub fn with_runtime<R>(
    py: Python<'_>,
    f: impl FnOnce(&Runtime, &ThreadReads) -> PyResult<R>,
) -> PyResult<R> {
    // Never `None` when starting is allowed; an error rather than a panic.
    with_current(py, true, f)?
        .ok_or_else(|| PyOSError::new_err("dbha: the health checker did not start"))
}

/// Like [`with_runtime`], but `None` instead of starting a runtime: for
/// bookkeeping that must not start the checker.
pub fn with_started_runtime<R>(
    py: Python<'_>,
    f: impl FnOnce(&Runtime, &ThreadReads) -> PyResult<R>,
) -> PyResult<Option<R>> {
    with_current(py, false, f)
}

#[inline]
fn with_current<R>(
    py: Python<'_>,
    start_if_needed: bool,
    f: impl FnOnce(&Runtime, &ThreadReads) -> PyResult<R>,
) -> PyResult<Option<R>> {
    let epoch = EPOCH.load(Ordering::Acquire);
    CURRENT.with(|current| {
        // A shared borrow: `f` may run Python code that calls back in here.
        if let Ok(cached) = current.try_borrow() {
            if let Some(cached) = cached.as_ref().filter(|c| c.epoch == epoch) {
                return f(&cached.runtime, &cached.reads).map(Some);
            }
        }
        // The epoch the runtime is cached under is one read before the
        // runtime was (or under the start flag, with it): a reset by another
        // thread in between then shows as a newer epoch, never the reverse.
        let (runtime, epoch) = if start_if_needed {
            start(py)?
        } else {
            match RUNTIME.load_full() {
                Some(runtime) if runtime.generation == FORK_GENERATION.load(Ordering::Relaxed) => {
                    (runtime, epoch)
                }
                _ => return Ok(None),
            }
        };
        let same = current.try_borrow().is_ok_and(|c| {
            c.as_ref()
                .is_some_and(|c| Arc::ptr_eq(&c.runtime, &runtime))
        });
        // Made before the borrow below: it runs Python code.
        let fresh = (!same).then(|| ThreadReads::for_thread(py, &runtime));
        if let Ok(mut cached) = current.try_borrow_mut() {
            match (cached.as_mut(), fresh) {
                // The same runtime: keep this thread's state (its writes).
                (Some(cached), None) => cached.epoch = epoch,
                (_, reads) => {
                    *cached = Some(Current {
                        epoch,
                        reads: reads.unwrap_or_else(|| ThreadReads::new(&runtime)),
                        runtime: Arc::clone(&runtime),
                    });
                }
            }
        }
        if let Ok(cached) = current.try_borrow() {
            if let Some(cached) = cached.as_ref() {
                return f(&cached.runtime, &cached.reads).map(Some);
            }
        }
        f(&runtime, &ThreadReads::for_thread(py, &runtime)).map(Some)
    })
}

/// The current runtime, informed by its first round: started if there is
/// none, or none of this process's own (after a fork); and the epoch it is
/// current at (read under the start flag, as resets change both under it).
#[cold]
fn start(py: Python<'_>) -> PyResult<(Arc<Runtime>, u64)> {
    let (runtime, epoch) = {
        let _start = lock_start(py);
        let generation = FORK_GENERATION.load(Ordering::Relaxed);
        let current = RUNTIME.load_full();
        let runtime = match current {
            Some(runtime) if runtime.generation == generation => runtime,
            previous => {
                let seed = previous.map(|parent| {
                    // The parent's threads do not exist here, and its locks
                    // may be held forever: read its last snapshot (lock-free)
                    // and never drop it.
                    let seed = Snapshot::clone(&parent.checker.snapshot());
                    std::mem::forget(parent);
                    py_events::forget_after_fork();
                    seed
                });
                let runtime = Arc::new(new_runtime(py, generation, seed.as_ref())?);
                RUNTIME.store(Some(Arc::clone(&runtime)));
                EPOCH.fetch_add(1, Ordering::AcqRel);
                runtime
            }
        };
        (runtime, EPOCH.load(Ordering::Acquire))
    };
    if !runtime.informed.load(Ordering::Relaxed) {
        // One probe round finishes within the deadline; a little slack on top.
        let limit = runtime.config().timing.connect_timeout + Duration::from_millis(250);
        wait_detached(py, limit, |slice| runtime.checker.wait_for_round(1, slice))?;
        runtime.informed.store(true, Ordering::Relaxed);
    }
    Ok((runtime, epoch))
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
        py.import("dbha.transactions")?
            .call_method0("track_transactions")?;
        Some(ReadPins {
            use_writer: py.import("dbha.routing")?.getattr("USE_WRITER")?.unbind(),
        })
    } else {
        None
    };
    let tracks_writes = replica_reads && config.reads.read_your_writes;
    let (events, queue) = py_events::open();
    let events = Arc::new(events);
    let python_events = py.import("dbha.events")?;
    py_events::follow_level(python_events.call_method0("log_level")?.extract()?);
    // Without the thread, events are dropped; health checking goes on.
    let events_thread = python_events
        .call_method1("start", (queue,))
        .map(Bound::unbind)
        .map_err(|e| e.write_unraisable(py, None))
        .ok();
    let prober = ScriptedProber {
        inner: NetworkProber,
        script: Arc::clone(&SCRIPT),
    };
    let checker = Checker::start(config, Arc::new(prober), events.clone(), seed).map_err(|e| {
        PyOSError::new_err(format!("dbha: cannot start the health checker thread: {e}"))
    })?;
    Ok(Runtime {
        generation,
        checker,
        aliases,
        model_routes,
        pins,
        tracks_writes,
        events,
        events_thread,
        informed: AtomicBool::new(seed.is_some()),
    })
}

/// Reads `settings.DATABASES`, `settings.DBHA` and the backends' vendors
/// through `dbha.conf`.
fn read_config(py: Python<'_>) -> PyResult<Config> {
    let (databases, dbha, vendors): (Bound<'_, PyAny>, Bound<'_, PyAny>, Bound<'_, PyAny>) = py
        .import("dbha.conf")?
        .call_method0("read_settings")?
        .extract()?;
    validate(&databases, &dbha, &vendors)
        .map_err(|(_, message)| ImproperlyConfigured::new_err(message))
}

/// What is wrong with the settings, as Django system checks: `(check id,
/// message)` for the first error and every warning.
pub fn problems(
    databases: &Bound<'_, PyAny>,
    dbha: &Bound<'_, PyAny>,
    vendors: &Bound<'_, PyAny>,
) -> Vec<(&'static str, String)> {
    let (plain_databases, plain_dbha) = (to_value(databases), to_value(dbha));
    let message = |e: &ConfigError| scrub(&format!("dbha: {e}"), &plain_databases, &plain_dbha);
    match validate(databases, dbha, vendors) {
        Ok(config) => config
            .warnings
            .iter()
            .map(|w| (w.code.check_id(), message(w)))
            .collect(),
        Err((e, text)) => vec![(e.code.check_id(), text)],
    }
}

/// The groups and their aliases these settings watch, in order; none if
/// they are invalid.
pub fn watched_groups(
    databases: &Bound<'_, PyAny>,
    dbha: &Bound<'_, PyAny>,
    vendors: &Bound<'_, PyAny>,
) -> Vec<(String, Vec<String>)> {
    validate(databases, dbha, vendors).map_or_else(
        |_| Vec::new(),
        |config| {
            let alias = |i: usize| config.nodes[i].alias.clone();
            config
                .groups
                .iter()
                .map(|group| {
                    (
                        group.name.clone(),
                        group.members.clone().map(alias).collect(),
                    )
                })
                .collect()
        },
    )
}

/// The configuration, or the error with its message (scrubbed of every
/// password).
fn validate(
    databases: &Bound<'_, PyAny>,
    dbha: &Bound<'_, PyAny>,
    vendors: &Bound<'_, PyAny>,
) -> Result<Config, (ConfigError, String)> {
    if let Some(alias) = super::value::invalid_alias(databases) {
        let error = ConfigError {
            code: crate::checker::config::Problem::BadDatabase,
            key: format!("DATABASES[{alias}]"),
            value: String::new(),
            problem: "an alias must be valid text (this one has a lone surrogate)".into(),
        };
        let message = format!("dbha: {}: {}", error.key, error.problem);
        return Err((error, message));
    }
    let (databases, dbha) = (to_value(databases), to_value(dbha));
    Config::from_django(&databases, &dbha, &to_value(vendors)).map_err(|e| {
        let message = scrub(&format!("dbha: {e}"), &databases, &dbha);
        (e, message)
    })
}

/// `message` with every password of the settings replaced by `***`,
/// wherever and of whatever type it was given: whatever path an error takes,
/// no password reaches it. (Texts shorter than 3 characters are left:
/// replacing them would garble the message.)
fn scrub(message: &str, databases: &Value, dbha: &Value) -> String {
    let mut secrets = Vec::new();
    passwords(databases, false, &mut secrets);
    passwords(dbha, false, &mut secrets);
    secrets.retain(|s| s.chars().count() >= 3);
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.iter().fold(message.to_owned(), |text, secret| {
        text.replace(secret.as_str(), "***")
    })
}

/// Every text under a `PASSWORD` key (`under` one already), as given and
/// as quoted.
fn passwords(value: &Value, under: bool, found: &mut Vec<String>) {
    match value {
        Value::Map(entries) => {
            for (key, value) in entries {
                if under {
                    // `PASSWORD={secret: ...}`: the key is the secret.
                    found.push(key.clone());
                }
                passwords(value, under || key.eq_ignore_ascii_case("PASSWORD"), found);
            }
        }
        Value::List(items) => items.iter().for_each(|item| passwords(item, under, found)),
        Value::None | Value::Bool(_) => {}
        scalar if under => {
            found.push(scalar.to_string());
            if let Value::Str(text) = scalar {
                found.push(text.clone());
            }
        }
        _ => {}
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
/// (`setting_changed`). With `join`, also stops its threads and waits for
/// them: without holding the start flag, so that a log handler that calls
/// dbha while its records are delivered gets an answer (from the runtime
/// being closed) instead of waiting for us forever.
pub fn reset(py: Python<'_>, join: bool) {
    let runtime = {
        let _start = lock_start(py);
        let Some(runtime) = RUNTIME.load_full() else {
            return;
        };
        if runtime.generation != FORK_GENERATION.load(Ordering::Relaxed) {
            // The parent's: its threads are not ours to stop.
            RUNTIME.store(None);
            EPOCH.fetch_add(1, Ordering::AcqRel);
            std::mem::forget(runtime);
            py_events::forget_after_fork();
            return;
        }
        if !join {
            RUNTIME.store(None);
            EPOCH.fetch_add(1, Ordering::AcqRel);
            runtime.checker.stop(false);
            runtime.events.close();
            return;
        }
        runtime
    };
    py.detach(|| runtime.checker.stop(true));
    runtime.events.close();
    if let Some(thread) = &runtime.events_thread {
        // Joined from Python, which lets go of the interpreter meanwhile; a
        // receiver that calls `close()` is not waited for by itself.
        if let Err(e) = py
            .import("dbha.events")
            .and_then(|events| events.call_method1("stop", (thread,)))
        {
            e.write_unraisable(py, None);
        }
    }
    let _start = lock_start(py);
    if RUNTIME
        .load()
        .as_ref()
        .is_some_and(|current| Arc::ptr_eq(current, &runtime))
    {
        RUNTIME.store(None);
        EPOCH.fetch_add(1, Ordering::AcqRel);
    }
}

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
    EPOCH.fetch_add(1, Ordering::AcqRel);
    // Whoever held it in the parent does not exist here.
    STARTING.store(false, Ordering::Release);
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

//! Hands the checker's events and `log` records to Python. The checker's
//! threads only queue them (they never wait for the interpreter); a Python
//! thread, `dbha-events` (`dbha/events.py`), takes them from the queue and
//! logs them, sends the Django signals and sets the level the core logs at.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Once};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use log::{Level, LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::checker::events::{Change, Event, Observer};

/// Messages queued beyond this are dropped rather than block the checker.
const QUEUE: usize = 1024;
/// At most this many messages per `take()`.
const BATCH: usize = 256;

enum Message {
    Record(Level, String),
    Event(Event),
    /// `close()`: the Python thread ends after what came before.
    Stop,
}

/// Where `log` records go: the queue of the current runtime.
static SENDER: ArcSwapOption<SyncSender<Message>> = ArcSwapOption::const_empty();

struct Bridge;

impl Log for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if let Some(sender) = &*SENDER.load() {
            let _ = sender.try_send(Message::Record(record.level(), record.args().to_string()));
        }
    }

    fn flush(&self) {}
}

/// A runtime's end of the queue: it sends events and, while it is the
/// current runtime, the `log` records.
pub struct Queue {
    sender: Arc<SyncSender<Message>>,
    closed: Arc<AtomicBool>,
}

/// The Python thread's end of the queue.
#[pyclass(frozen, module = "dbha._core")]
pub struct EventQueue {
    receiver: Mutex<Receiver<Message>>,
    /// Set by `Queue::close`, in case its `Stop` found the queue full.
    closed: Arc<AtomicBool>,
    stopped: AtomicBool,
}

/// Opens a queue; `log` records go to it from now on.
pub fn open() -> (Queue, EventQueue) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&Bridge).is_ok() {
            log::set_max_level(LevelFilter::Info);
        }
    });
    let (sender, receiver) = mpsc::sync_channel(QUEUE);
    let sender = Arc::new(sender);
    SENDER.store(Some(Arc::clone(&sender)));
    let closed = Arc::new(AtomicBool::new(false));
    (
        Queue {
            sender,
            closed: Arc::clone(&closed),
        },
        EventQueue {
            receiver: Mutex::new(receiver),
            closed,
            stopped: AtomicBool::new(false),
        },
    )
}

impl Queue {
    /// Sends `log` records elsewhere (if still ours) and tells the Python
    /// thread to end once it has delivered what is queued.
    pub fn close(&self) {
        let current = SENDER.load_full();
        if current
            .as_ref()
            .is_some_and(|sender| Arc::ptr_eq(sender, &self.sender))
        {
            SENDER.compare_and_swap(&current, None);
        }
        self.closed.store(true, Ordering::Release);
        // Never blocks (the interpreter may be held): a full queue's reader
        // sees `closed` at its next timeout instead.
        let _ = self.sender.try_send(Message::Stop);
    }
}

impl Observer for Queue {
    fn notify(&self, event: Event) {
        if let Err(TrySendError::Full(Message::Event(event))) =
            self.sender.try_send(Message::Event(event))
        {
            // The Python side is stuck (a slow signal receiver): routing
            // must not wait for it. The log line at least survives.
            log::error!("dbha event queue full; dropped: {}", event.message);
        }
    }
}

/// In a forked child: the parent's queue has no reader here. Its sender is
/// forgotten, not dropped: dropping it could wait on a lock a parent's
/// thread held at the fork.
pub fn forget_after_fork() {
    std::mem::forget(SENDER.swap(None));
}

/// Python's logging level (`logging.DEBUG`...) as the core's filter.
pub fn follow_level(python_level: i64) {
    log::set_max_level(match python_level {
        ..=5 => LevelFilter::Trace,
        6..=10 => LevelFilter::Debug,
        11..=20 => LevelFilter::Info,
        21..=30 => LevelFilter::Warn,
        31..=40 => LevelFilter::Error,
        _ => LevelFilter::Off,
    });
}

fn python_level(level: Level) -> i64 {
    match level {
        Level::Error => 40,
        Level::Warn => 30,
        Level::Info => 20,
        Level::Debug => 10,
        Level::Trace => 5,
    }
}

#[pymethods]
impl EventQueue {
    /// Waits up to `timeout` seconds (detached) for messages and returns
    /// them: `(kind, level, message, first, fields)` tuples, `kind` None
    /// for a plain log record. `None` once the queue is closed.
    fn take<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
    ) -> PyResult<Option<Vec<Bound<'py, PyTuple>>>> {
        if self.stopped.load(Ordering::Acquire) {
            return Ok(None);
        }
        let timeout = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::ZERO);
        let messages = py.detach(|| {
            let receiver = self.receiver.lock();
            let mut messages = Vec::new();
            match receiver.recv_timeout(timeout) {
                Ok(first) => messages.push(first),
                Err(RecvTimeoutError::Timeout) if !self.closed.load(Ordering::Acquire) => {
                    return Some(messages);
                }
                Err(_) => return None,
            }
            while messages.len() < BATCH {
                match receiver.try_recv() {
                    Ok(message) => messages.push(message),
                    Err(_) => break,
                }
            }
            Some(messages)
        });
        let Some(messages) = messages else {
            self.stopped.store(true, Ordering::Release);
            return Ok(None);
        };
        let mut taken = Vec::with_capacity(messages.len());
        for message in messages {
            match message {
                Message::Stop => {
                    self.stopped.store(true, Ordering::Release);
                    break;
                }
                Message::Record(level, text) => {
                    let fields = PyDict::new(py);
                    taken.push(PyTuple::new(
                        py,
                        [
                            py.None().into_bound(py),
                            python_level(level).into_pyobject(py)?.into_any(),
                            text.into_pyobject(py)?.into_any(),
                            false.into_pyobject(py)?.to_owned().into_any(),
                            fields.into_any(),
                        ],
                    )?);
                }
                Message::Event(event) => taken.push(event_tuple(py, event)?),
            }
        }
        Ok(Some(taken))
    }
}

fn event_tuple(py: Python<'_>, event: Event) -> PyResult<Bound<'_, PyTuple>> {
    let fields = PyDict::new(py);
    fields.set_item("group", &event.group)?;
    match &event.change {
        Change::NodeUp { alias } | Change::Unfenced { alias } => fields.set_item("alias", alias)?,
        Change::NodeDown { alias, reason } => {
            fields.set_item("alias", alias)?;
            fields.set_item("reason", reason)?;
        }
        Change::WriterChanged { old, new } => {
            fields.set_item("old", old)?;
            fields.set_item("new", new)?;
        }
        Change::NoWriter => {}
        Change::SplitBrain { fenced, writer } => {
            fields.set_item("aliases", fenced)?;
            fields.set_item("new", writer)?;
        }
    }
    PyTuple::new(
        py,
        [
            event.change.kind().into_pyobject(py)?.into_any(),
            python_level(event.level).into_pyobject(py)?.into_any(),
            event.message.into_pyobject(py)?.into_any(),
            event.first.into_pyobject(py)?.to_owned().into_any(),
            fields.into_any(),
        ],
    )
}

//! Forwards the core's `log` records to Python's `logging` (the `dbha`
//! logger) from a thread of its own, so that the checker never waits for the
//! interpreter: a record is queued and the checker goes on.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Once};
use std::thread::{self, JoinHandle};

use arc_swap::ArcSwapOption;
use log::{Level, LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// Records queued beyond this are dropped rather than block the checker.
const QUEUE: usize = 1024;

type Message = (Level, String);

/// Where records go: the forwarding thread of the current runtime.
static SENDER: ArcSwapOption<SyncSender<Message>> = ArcSwapOption::const_empty();

struct Bridge;

impl Log for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= Level::Info
    }

    fn log(&self, record: &Record<'_>) {
        if let Some(sender) = &*SENDER.load() {
            let _ = sender.try_send((record.level(), record.args().to_string()));
        }
    }

    fn flush(&self) {}
}

/// One runtime's forwarding thread. Owned by the runtime, not a global: a
/// forked child forgets the parent's runtime whole, so no lock of it, held
/// by a thread the child does not have, is ever waited on there.
pub struct LogThread {
    /// Identifies its sender in `SENDER`.
    sender: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Starts a forwarding thread and sends records to it from now on (a
/// previous one ends once it has delivered what it had).
pub fn start() -> Option<LogThread> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&Bridge).is_ok() {
            log::set_max_level(LevelFilter::Info);
        }
    });
    let (sender, receiver) = mpsc::sync_channel(QUEUE);
    // Without the thread, records are dropped; health checking goes on.
    let thread = thread::Builder::new()
        .name("dbha-log".into())
        .spawn(move || forward(&receiver))
        .ok()?;
    let sender = Arc::new(sender);
    let id = Arc::as_ptr(&sender) as usize;
    SENDER.store(Some(sender));
    Some(LogThread {
        sender: id,
        thread: Mutex::new(Some(thread)),
    })
}

impl LogThread {
    /// Stops sending records here and waits until what is queued is
    /// delivered. Call detached from the interpreter: the thread needs it.
    pub fn stop(&self) {
        let current = SENDER.load_full();
        if current
            .as_ref()
            .is_some_and(|sender| Arc::as_ptr(sender) as usize == self.sender)
        {
            // Still ours (a newer runtime's goes on): the channel closes,
            // and the thread ends, once this last handle is dropped.
            SENDER.compare_and_swap(&current, None);
        }
        drop(current);
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// In a forked child: the parent's forwarding thread does not exist here.
/// Its sender is forgotten, not dropped: dropping it could wait on a lock
/// that thread held at the fork.
pub fn forget_after_fork() {
    std::mem::forget(SENDER.swap(None));
}

fn forward(receiver: &Receiver<Message>) {
    static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    while let Ok((level, message)) = receiver.recv() {
        Python::attach(|py| {
            let logger = LOGGER.get_or_try_init(py, || {
                py.import("logging")?
                    .call_method1("getLogger", ("dbha",))
                    .map(Bound::unbind)
            });
            let level = match level {
                Level::Error => 40,
                Level::Warn => 30,
                Level::Info => 20,
                Level::Debug => 10,
                Level::Trace => 5,
            };
            if let Ok(logger) = logger {
                if let Err(e) = logger.call_method1(py, "log", (level, "%s", message)) {
                    e.write_unraisable(py, Some(logger.bind(py)));
                }
            }
        });
    }
}

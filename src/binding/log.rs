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

static SENDER: ArcSwapOption<SyncSender<Message>> = ArcSwapOption::const_empty();
static THREAD: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);

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

/// Starts the forwarding thread (again, after a fork or `close()`).
pub fn start() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&Bridge).is_ok() {
            log::set_max_level(LevelFilter::Info);
        }
    });
    let (sender, receiver) = mpsc::sync_channel(QUEUE);
    match thread::Builder::new()
        .name("dbha-log".into())
        .spawn(move || forward(&receiver))
    {
        Ok(thread) => {
            SENDER.store(Some(Arc::new(sender)));
            *THREAD.lock() = Some(thread);
        }
        // Without the thread, records are dropped; health checking goes on.
        Err(_) => SENDER.store(None),
    }
}

/// Stops the thread after it has delivered what is queued. Call detached
/// from the interpreter: the thread needs it to finish.
pub fn stop() {
    SENDER.store(None);
    if let Some(thread) = THREAD.lock().take() {
        let _ = thread.join();
    }
}

/// After a fork the thread is gone from the child: forget it, unjoined.
pub fn forget_after_fork() {
    if let Some(mut thread) = THREAD.try_lock() {
        std::mem::forget(thread.take());
    }
    SENDER.store(None);
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

pub fn running() -> bool {
    SENDER.load().is_some()
}

//! What the checker tells the application: every change of a node's health,
//! of a group's writer and of its fences, as a typed event with its log
//! message. The binding turns each into a log record, a Django signal and
//! metrics; the core's tests collect them.

use log::Level;

/// One change, with the names of what changed (never credentials).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    NodeUp {
        alias: String,
    },
    NodeDown {
        alias: String,
        reason: String,
    },
    /// Writes of the group go to `new` from now on; `old` is the writer
    /// before (possibly `new` itself, after a time without a writer).
    WriterChanged {
        old: Option<String>,
        new: String,
    },
    /// The group has no writer (`ON_ALL_DOWN` applies).
    NoWriter,
    /// Primaries kept out of writes while `writer` takes them: every write
    /// they took would be lost.
    SplitBrain {
        fenced: Vec<String>,
        writer: Option<String>,
    },
    /// A fenced primary reports standby, or the newest timeline.
    Unfenced {
        alias: String,
    },
}

impl Change {
    /// A stable name (the Python side's event kind).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NodeUp { .. } => "node_up",
            Self::NodeDown { .. } => "node_down",
            Self::WriterChanged { .. } => "writer_changed",
            Self::NoWriter => "no_writer",
            Self::SplitBrain { .. } => "split_brain",
            Self::Unfenced { .. } => "unfenced",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub group: String,
    pub change: Change,
    pub level: Level,
    pub message: String,
    /// A process's first finding (a node's first probe, a group's first
    /// choice) rather than a change seen happening: logged, not signalled.
    pub first: bool,
}

/// Receives the checker's events, on the scheduler thread: it must not
/// block (queue and return).
pub trait Observer: Send + Sync {
    fn notify(&self, event: Event);
}

/// Sends events to the `log` crate only (tools and tests without a binding).
pub struct LogObserver;

impl Observer for LogObserver {
    fn notify(&self, event: Event) {
        log::log!(event.level, "{}", event.message);
    }
}

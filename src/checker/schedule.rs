//! The background health checker: one scheduler thread per process and one
//! probe thread per node, publishing an immutable [`Snapshot`] after every
//! change for lock-free readers.
//!
//! Probes run in parallel, so a round with any number of dead or hung nodes
//! costs one deadline, and every answer takes effect as it arrives: a new
//! round (a failure report, `check_now`) starts at once even while a hung
//! node's probe is still waiting out its deadline. A probe stuck past its
//! deadline (only name resolution can do that) counts as a timeout, and its
//! node is not probed again until it returns.
//!
//! Between probes each probe thread waits on its kept session's socket, so a
//! server that ends the session (killed, shut down) is noticed at once. A
//! group without a healthy writer is probed every `FAST_INTERVAL`.

use std::collections::BTreeSet;
use std::os::fd::RawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, Guard};
use log::{error, Level};
use parking_lot::{Condvar, Mutex};

use super::config::{Config, Node, OnAllDown};
use super::events::{Change, Event, Observer};
use super::node::NodeProbe;
use super::reads::{choose_readers, fastest_reader, WriteLog};
use super::select::choose_writer;
use super::state::{Health, NodeHealth, ProbeOutcome};
use crate::engines::Observation;
use crate::net::wait::{doorbell, Bell, Ringer};
use crate::net::Failure;

/// How long past the probe deadline the scheduler waits for a probe thread.
const GRACE: Duration = Duration::from_millis(50);
/// Least time between two rounds of a group triggered by failure reports, so
/// that a burst of failing requests costs a few probes, not one each.
const REPORT_GAP: Duration = Duration::from_millis(50);
/// The longest `report_failure` waits for the scheduler to take it in.
const REPORT_WAIT: Duration = Duration::from_millis(50);
/// The longest `stop(join)` waits for the checker thread to end (it ends
/// within a few tens of milliseconds; probe threads end on their own).
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Pause before restarting a scheduler that panicked.
const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// How nodes are probed: over the network in production, scripted in tests.
pub trait Prober: Send + Sync + 'static {
    /// The prober of one node, owned by its probe thread: it may keep a
    /// connection open from one round to the next.
    fn for_node(&self, node: &Node) -> Box<dyn NodeProber>;
}

pub trait NodeProber: Send {
    /// One probe within `timeout`; with `check_new_sessions`, the server
    /// must also accept a fresh connection.
    fn probe(
        &mut self,
        timeout: Duration,
        check_new_sessions: bool,
    ) -> Result<Observation, Failure>;

    /// A socket to watch between probes (the kept session's).
    fn watched_socket(&self) -> Option<RawFd> {
        None
    }

    /// The watched socket became readable: `Some` when that ended the
    /// session, with what a fresh attempt found at once.
    fn on_readable(&mut self, timeout: Duration) -> Option<Result<Observation, Failure>> {
        let _ = timeout;
        None
    }
}

pub struct NetworkProber;

impl Prober for NetworkProber {
    fn for_node(&self, node: &Node) -> Box<dyn NodeProber> {
        Box::new(NodeProbe::new(node))
    }
}

impl NodeProber for NodeProbe {
    fn probe(
        &mut self,
        timeout: Duration,
        check_new_sessions: bool,
    ) -> Result<Observation, Failure> {
        NodeProbe::probe(self, timeout, check_new_sessions)
    }

    fn watched_socket(&self) -> Option<RawFd> {
        NodeProbe::watched_socket(self)
    }

    fn on_readable(&mut self, timeout: Duration) -> Option<Result<Observation, Failure>> {
        NodeProbe::on_readable(self, timeout)
    }
}

/// Everything known after a change; never mutated once published.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Completed rounds; 0 means nothing is known yet.
    pub rounds: u64,
    pub nodes: Vec<NodeHealth>,
    /// Per group: the healthy writer, if any.
    pub writers: Vec<Option<usize>>,
    /// Per group: the most recent writer, kept while all nodes are down.
    pub last_writers: Vec<Option<usize>>,
    /// Per node: a primary kept out of writes, because a promotion abandoned
    /// it (an older timeline) or another primary of its group has them
    /// (split brain), until it reports standby.
    pub fenced: Vec<bool>,
    /// Per group: the newest timeline its primaries have shown.
    pub newest_timelines: Vec<Option<u64>>,
    /// Per group: the nodes reads may go to, as a mask relative to the
    /// group's first node (see `reads::choose_readers`); 0 = the writer.
    pub readers: Vec<u64>,
    /// Per node: the highest writer probe number whose finding this standby
    /// has replayed (read-your-writes, see `reads::WriteLog`).
    pub caught_up: Vec<u64>,
    /// Per node: the application reported it failing while its own probes
    /// failed too, and no probe has succeeded since.
    pub reported_failing: Vec<bool>,
    /// Per node: failed probes so far, by [`Failure::kind_index`].
    pub probe_errors: Vec<[u64; Failure::KINDS.len()]>,
    /// Per node: failure reports the application made so far.
    pub reports: Vec<u64>,
    /// Per group: how often its writes moved to another node.
    pub writer_changes: Vec<u64>,
}

/// Where a group's writes should go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Healthy(usize),
    /// No writer: the last writer, or the first member if none ever was.
    AllDown(usize),
    /// No writer, and the application itself reported the last writer
    /// failing while dbha's probes failed too: a request sent there would
    /// only fail after the driver's connect timeout, so it fails at once.
    Failing(usize),
}

impl Route {
    /// One word, so that the hot path reads a route with one atomic load.
    fn pack(self) -> usize {
        match self {
            Self::AllDown(node) => node << 2,
            Self::Healthy(node) => node << 2 | 1,
            Self::Failing(node) => node << 2 | 2,
        }
    }

    fn unpack(word: usize) -> Self {
        match word & 3 {
            1 => Self::Healthy(word >> 2),
            2 => Self::Failing(word >> 2),
            _ => Self::AllDown(word >> 2),
        }
    }

    pub fn node(self) -> usize {
        match self {
            Self::Healthy(node) | Self::AllDown(node) | Self::Failing(node) => node,
        }
    }
}

impl Snapshot {
    fn unknown(config: &Config) -> Self {
        Self {
            rounds: 0,
            nodes: vec![NodeHealth::default(); config.nodes.len()],
            writers: vec![None; config.groups.len()],
            last_writers: vec![None; config.groups.len()],
            fenced: vec![false; config.nodes.len()],
            newest_timelines: vec![None; config.groups.len()],
            readers: vec![0; config.groups.len()],
            caught_up: vec![0; config.nodes.len()],
            reported_failing: vec![false; config.nodes.len()],
            probe_errors: vec![[0; Failure::KINDS.len()]; config.nodes.len()],
            reports: vec![0; config.nodes.len()],
            writer_changes: vec![0; config.groups.len()],
        }
    }

    /// Every member of `group` and why it is not the writer, for messages:
    /// `alias (endpoint): reason; ...`.
    pub fn describe_group(&self, config: &Config, group: usize) -> String {
        config.groups[group]
            .members
            .clone()
            .map(|i| {
                let node = &config.nodes[i];
                let fenced = if self.fenced[i] {
                    " (fenced: an older or rival primary)"
                } else if self.reported_failing[i] {
                    " (failing for the application too)"
                } else {
                    ""
                };
                format!(
                    "{} ({}): {}{fenced}",
                    node.alias,
                    node.server.endpoint,
                    self.nodes[i].describe()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn route(&self, config: &Config, group: usize) -> Route {
        match self.writers[group] {
            Some(writer) => Route::Healthy(writer),
            None => {
                let last = self.last_writers[group].unwrap_or(config.groups[group].members.start);
                if self.reported_failing[last] {
                    Route::Failing(last)
                } else {
                    Route::AllDown(last)
                }
            }
        }
    }

    /// No healthy writer, or one whose latest probe failed: the group is
    /// probed every `FAST_INTERVAL` until that is over.
    fn is_urgent(&self, group: usize) -> bool {
        self.writers[group].is_none_or(|w| self.nodes[w].failures > 0)
    }
}

struct Control {
    stop: bool,
    /// Per group: the earliest time a requested extra round may start.
    requested: Vec<Option<Instant>>,
    /// Per group: when its last round started (for `REPORT_GAP`).
    last_started: Vec<Option<Instant>>,
    /// Per node: the application reported a failure, so its next probe
    /// also checks that it takes new sessions.
    reported: Vec<bool>,
    /// Per node: reports made so far.
    report_counts: Vec<u64>,
    /// Per node: the ticket (a `reports_made` value) of its latest report,
    /// and the latest one a probe has answered.
    report_tickets: Vec<u64>,
    reports_checked: Vec<u64>,
    /// Failure reports made, and taken in by the scheduler.
    reports_made: u64,
    reports_taken: u64,
    /// The last round started (rounds are numbered from 1).
    started: u64,
    /// Every round below this one has completed ...
    completed_below: u64,
    /// ... and so have these (rounds complete out of order).
    completed: BTreeSet<u64>,
    /// The running scheduler's event queue, to wake it.
    waker: Option<Sender<Wakeup>>,
    /// The checker thread has ended (see `Checker::stop`).
    finished: bool,
    /// Makes the scheduler panic (tests of the restart).
    #[cfg(test)]
    panic_now: bool,
}

impl Control {
    fn new(groups: usize, nodes: usize) -> Self {
        Self {
            stop: false,
            requested: vec![None; groups],
            last_started: vec![None; groups],
            reported: vec![false; nodes],
            report_counts: vec![0; nodes],
            report_tickets: vec![0; nodes],
            reports_checked: vec![0; nodes],
            reports_made: 0,
            reports_taken: 0,
            started: 0,
            completed_below: 1,
            completed: BTreeSet::new(),
            waker: None,
            finished: false,
            #[cfg(test)]
            panic_now: false,
        }
    }

    fn is_complete(&self, round: u64) -> bool {
        round < self.completed_below || self.completed.contains(&round)
    }

    fn complete(&mut self, round: u64) {
        self.completed.insert(round);
        while self.completed.remove(&self.completed_below) {
            self.completed_below += 1;
        }
    }

    /// Rounds started but never completed (their scheduler panicked).
    fn incomplete(&self) -> Vec<u64> {
        (self.completed_below..=self.started)
            .filter(|round| !self.completed.contains(round))
            .collect()
    }

    fn wake(&self) {
        if let Some(waker) = &self.waker {
            let _ = waker.send(Wakeup::Wake);
        }
    }
}

struct Shared {
    config: Arc<Config>,
    prober: Arc<dyn Prober>,
    /// Told of every change, from the scheduler thread.
    observer: Arc<dyn Observer>,
    snapshot: ArcSwap<Snapshot>,
    /// Per group, the snapshot's [`Route`], packed: what the hot path reads.
    routes: Box<[AtomicUsize]>,
    /// Per group, the snapshot's reader mask.
    readers: Box<[AtomicU64]>,
    /// Per group, the reader with the lowest latency (`usize::MAX`: none).
    fastest: Box<[AtomicUsize]>,
    /// Per group, the number of probes sent to its writer so far.
    writer_probes: Box<[AtomicU64]>,
    /// Per node, the snapshot's `caught_up`.
    caught_up: Box<[AtomicU64]>,
    /// Per group, the least `caught_up` of its reader standbys.
    least_caught_up: Box<[AtomicU64]>,
    /// Per node, the wall-clock time (ms since the epoch) up to which it
    /// has replayed every commit: `u64::MAX` for a writer, 0 if unknown.
    replayed_through: Box<[AtomicU64]>,
    control: Mutex<Control>,
    /// Wakes the supervisor pausing before a restart (on stop).
    wake: Condvar,
    /// Wakes callers waiting for a round to complete.
    round_done: Condvar,
}

fn atomics<T>(count: usize, make: impl Fn(usize) -> T) -> Box<[T]> {
    (0..count).map(make).collect()
}

pub struct Checker {
    shared: Arc<Shared>,
}

impl Checker {
    /// Starts the checker thread. `seed` carries what an earlier checker
    /// knew (e.g. the parent's state after a fork) so that sticky writers
    /// and fences survive; without it the first round decides. `observer`
    /// hears of every change.
    pub fn start(
        config: Arc<Config>,
        prober: Arc<dyn Prober>,
        observer: Arc<dyn Observer>,
        seed: Option<&Snapshot>,
    ) -> std::io::Result<Self> {
        let (groups, nodes) = (config.groups.len(), config.nodes.len());
        let snapshot = match seed {
            Some(seed) if seed.nodes.len() == nodes && seed.writers.len() == groups => Snapshot {
                rounds: 0,
                // Counted against the earlier checker's writer probes.
                caught_up: vec![0; nodes],
                ..seed.clone()
            },
            _ => Snapshot::unknown(&config),
        };
        let routes = atomics(groups, |g| {
            AtomicUsize::new(snapshot.route(&config, g).pack())
        });
        let readers = atomics(groups, |g| AtomicU64::new(snapshot.readers[g]));
        let shared = Arc::new(Shared {
            routes,
            readers,
            fastest: atomics(groups, |_| AtomicUsize::new(usize::MAX)),
            writer_probes: atomics(groups, |_| AtomicU64::new(0)),
            caught_up: atomics(nodes, |_| AtomicU64::new(0)),
            least_caught_up: atomics(groups, |_| AtomicU64::new(0)),
            replayed_through: atomics(nodes, |_| AtomicU64::new(0)),
            control: Mutex::new(Control::new(groups, nodes)),
            wake: Condvar::new(),
            round_done: Condvar::new(),
            snapshot: ArcSwap::from_pointee(snapshot),
            config,
            prober,
            observer,
        });
        let supervisor = Arc::clone(&shared);
        // Detached at once: `stop` waits for `Control::finished`, never
        // `pthread_join`, which can fail (and std then panics) in a child
        // forked from a process with many threads.
        thread::Builder::new()
            .name("dbha-checker".into())
            .spawn(move || supervise(&supervisor))?;
        Ok(Self { shared })
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The latest published state (lock-free).
    pub fn snapshot(&self) -> Guard<Arc<Snapshot>> {
        self.shared.snapshot.load()
    }

    /// Where `group` writes go now: the hot path, one atomic load.
    #[inline]
    pub fn route(&self, group: usize) -> Route {
        Route::unpack(self.shared.routes[group].load(Ordering::Acquire))
    }

    /// The nodes `group` may read from, as a mask relative to its first
    /// node; 0 means "the writer". One atomic load.
    #[inline]
    pub fn readers(&self, group: usize) -> u64 {
        self.shared.readers[group].load(Ordering::Acquire)
    }

    /// The reader of `group` with the lowest probe latency.
    #[inline]
    pub fn fastest_reader(&self, group: usize) -> Option<usize> {
        Some(self.shared.fastest[group].load(Ordering::Acquire)).filter(|&n| n != usize::MAX)
    }

    /// How many probes `group`'s writer has been sent: a read that follows
    /// a write needs a standby caught up with the next one.
    #[inline]
    pub fn writer_probes(&self, group: usize) -> u64 {
        self.shared.writer_probes[group].load(Ordering::Acquire)
    }

    /// The highest writer probe number whose finding `node` has replayed.
    #[inline]
    pub fn caught_up(&self, node: usize) -> u64 {
        self.shared.caught_up[node].load(Ordering::Acquire)
    }

    /// The least [`Checker::caught_up`] among `group`'s readers.
    #[inline]
    pub fn least_caught_up(&self, group: usize) -> u64 {
        self.shared.least_caught_up[group].load(Ordering::Acquire)
    }

    /// The wall-clock time (ms since the epoch) up to which `node` has
    /// replayed every commit, as its last probe showed (see
    /// [`replayed_through`]).
    #[inline]
    pub fn replayed_through(&self, node: usize) -> u64 {
        self.shared.replayed_through[node].load(Ordering::Acquire)
    }

    /// Asks for a round of `group` (or all groups) now; returns the ticket
    /// to pass to [`Checker::wait_for_round`].
    pub fn request_round(&self, group: Option<usize>) -> u64 {
        let now = Instant::now();
        let mut control = self.shared.control.lock();
        for (g, requested) in control.requested.iter_mut().enumerate() {
            if group.is_none_or(|only| only == g) {
                *requested = Some(now);
            }
        }
        control.wake();
        control.started + 1
    }

    /// Passive feedback that `node` failed for the application: re-probes
    /// its group soon, checking that `node` still takes new sessions (one
    /// report alone never marks it down, but a failing probe then confirms
    /// it). Returns once the probe it asked for has answered (at most
    /// about `CONNECT_TIMEOUT`: a stuck server is waited for once), or at
    /// once if the scheduler does not take the report in within
    /// `REPORT_WAIT`: so that the application's next request, a retry
    /// most often, goes where dbha now knows to send it, or fails at once.
    pub fn report_failure(&self, node: usize) {
        let group = self.shared.config.nodes[node].group;
        let mut control = self.shared.control.lock();
        control.reported[node] = true;
        control.report_counts[node] += 1;
        control.reports_made += 1;
        let ticket = control.reports_made;
        control.report_tickets[node] = ticket;
        let earliest = control.last_started[group].map_or_else(Instant::now, |at| at + REPORT_GAP);
        let requested = &mut control.requested[group];
        *requested = Some(requested.map_or(earliest, |r| r.min(earliest)));
        control.wake();
        let taken_by = Instant::now() + REPORT_WAIT;
        while control.reports_taken < ticket && !control.stop {
            if self
                .shared
                .round_done
                .wait_until(&mut control, taken_by)
                .timed_out()
            {
                return;
            }
        }
        let checked_by =
            Instant::now() + REPORT_GAP + self.shared.config.timing.connect_timeout + GRACE;
        while control.reports_checked[node] < ticket && !control.stop {
            if self
                .shared
                .round_done
                .wait_until(&mut control, checked_by)
                .timed_out()
            {
                return;
            }
        }
    }

    /// Waits up to `timeout` until the round with `ticket` has completed.
    pub fn wait_for_round(&self, ticket: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut control = self.shared.control.lock();
        while !control.is_complete(ticket) {
            if self
                .shared
                .round_done
                .wait_until(&mut control, deadline)
                .timed_out()
            {
                return control.is_complete(ticket);
            }
        }
        true
    }

    /// Stops the checker; with `join`, waits for its thread (a few tens of
    /// milliseconds: probe threads still running finish on their own).
    pub fn stop(&self, join: bool) {
        let mut control = self.shared.control.lock();
        control.stop = true;
        control.wake();
        self.shared.wake.notify_all();
        if join {
            let deadline = Instant::now() + STOP_WAIT;
            while !control.finished {
                if self
                    .shared
                    .wake
                    .wait_until(&mut control, deadline)
                    .timed_out()
                {
                    break;
                }
            }
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop(false);
    }
}

/// Runs the scheduler, restarting it from the last published snapshot if it
/// panics: a bug must not leave the process without a health checker.
fn supervise(shared: &Arc<Shared>) {
    /// Tells `Checker::stop` the thread has ended, however it ends.
    struct Finished<'a>(&'a Shared);
    impl Drop for Finished<'_> {
        fn drop(&mut self) {
            self.0.control.lock().finished = true;
            self.0.wake.notify_all();
        }
    }
    let _finished = Finished(shared);
    loop {
        let run = panic::catch_unwind(AssertUnwindSafe(|| {
            Scheduler::new(Arc::clone(shared)).run();
        }));
        let Err(panic) = run else { return };
        error!(
            "health checker failed ({}); restarting it",
            panic_message(&*panic)
        );
        let mut control = shared.control.lock();
        if control.stop {
            return;
        }
        shared.wake.wait_for(&mut control, RESTART_PAUSE);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_owned())
}

/// What wakes the scheduler.
enum Wakeup {
    /// A probe thread's answer: to a request, or (`solicited` false) what
    /// it found when the server ended the kept session.
    Answer {
        node: usize,
        result: Result<Observation, Failure>,
        started: Instant,
        latency: Duration,
        solicited: bool,
    },
    /// A request or a stop (see `Control`).
    Wake,
}

/// One long-lived thread per node, so a probe stuck in name resolution ties
/// up only its own node.
struct ProbeThread {
    requests: Sender<bool>,
    ringer: Ringer,
    /// The probe in flight, if any.
    in_flight: Option<InFlight>,
    /// Its round gave up on it (recorded a timeout): drop its answer.
    abandoned: bool,
}

struct InFlight {
    sent: Instant,
    /// It also checked that the node takes new sessions.
    checks_sessions: bool,
    /// The ticket of the latest failure report of the node that this probe
    /// answers (0: none): if it fails too, two independent attempts agree.
    report: u64,
    /// Its number among the probes of the group's writer, if it was sent to
    /// the writer (read-your-writes).
    writer_probe: Option<u64>,
}

impl ProbeThread {
    fn busy(&self) -> bool {
        self.in_flight.is_some()
    }
}

/// A round waiting for answers.
struct OpenRound {
    id: u64,
    /// Rounds of a scheduler that panicked, completed with this one.
    orphans: Vec<u64>,
    deadline: Instant,
    /// Nodes whose answer it still waits for.
    waiting: Vec<usize>,
}

struct Scheduler {
    shared: Arc<Shared>,
    state: Snapshot,
    probe_threads: Vec<Option<ProbeThread>>,
    events: Receiver<Wakeup>,
    events_sender: Sender<Wakeup>,
    open: Vec<OpenRound>,
    /// Per group: when its next round is due.
    next_round: Vec<Instant>,
    /// Per group: when its writer must next show it takes new sessions.
    next_session_check: Vec<Option<Instant>>,
    /// Per node: its last new-session check failed, so every probe checks
    /// again until one passes (recovery is seen, and FALL counted, while it
    /// is no longer the writer too).
    sessions_suspect: Vec<bool>,
    /// Per group: a writer was chosen at least once (so "no writer" at the
    /// start is reported too).
    decided: Vec<bool>,
    /// Per group: its writer's probes, for read-your-writes.
    write_logs: Vec<WriteLog>,
    /// When a reader's lag bound runs out, so readers must be chosen again.
    readers_expire: Option<Instant>,
    /// Rounds a panicked scheduler left open, completed by our first round.
    orphans: Vec<u64>,
}

impl Scheduler {
    fn new(shared: Arc<Shared>) -> Self {
        let state = Snapshot::clone(&shared.snapshot.load());
        let (events_sender, events) = mpsc::channel();
        let orphans = {
            let mut control = shared.control.lock();
            control.waker = Some(events_sender.clone());
            control.incomplete()
        };
        let config = &shared.config;
        let now = Instant::now();
        let groups = config.groups.len();
        Self {
            probe_threads: config.nodes.iter().map(|_| None).collect(),
            next_round: vec![now; groups],
            next_session_check: vec![
                config.timing.listener_check_interval.map(|i| now + i);
                groups
            ],
            sessions_suspect: vec![false; config.nodes.len()],
            decided: vec![false; groups],
            write_logs: vec![WriteLog::default(); groups],
            readers_expire: None,
            orphans,
            state,
            events,
            events_sender,
            open: Vec::new(),
            shared,
        }
    }

    fn run(mut self) {
        while !self.shared.control.lock().stop {
            self.take_reports();
            if let Some((round, groups)) = self.due_round() {
                self.start_round(round, &groups);
            }
            self.expire_rounds();
            if self.readers_expire.is_some_and(|at| at <= Instant::now()) {
                self.settle();
            }
            let wake_at = self.next_wake();
            match self
                .events
                .recv_timeout(wake_at.saturating_duration_since(Instant::now()))
            {
                Ok(Wakeup::Answer {
                    node,
                    result,
                    started,
                    latency,
                    solicited,
                }) => self.on_answer(node, result, started, latency, solicited),
                Ok(Wakeup::Wake) | Err(RecvTimeoutError::Timeout) => {}
                // Impossible: we hold a sender.
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// The round due now, if any: its number and which groups it probes.
    fn due_round(&mut self) -> Option<(u64, Vec<bool>)> {
        let mut control = self.shared.control.lock();
        #[cfg(test)]
        assert!(
            !std::mem::take(&mut control.panic_now),
            "scripted scheduler panic"
        );
        let now = Instant::now();
        let groups: Vec<bool> = (0..self.next_round.len())
            .map(|g| now >= self.next_round[g] || control.requested[g].is_some_and(|at| at <= now))
            .collect();
        if !groups.contains(&true) {
            return None;
        }
        control.started += 1;
        for (g, &due) in groups.iter().enumerate() {
            if due {
                control.requested[g] = None;
                control.last_started[g] = Some(now);
                self.next_round[g] = now + self.interval(g);
            }
        }
        Some((control.started, groups))
    }

    /// Until the group's next periodic round: `FAST_INTERVAL` while it has
    /// no healthy writer, else `CHECK_INTERVAL`, each randomised by `JITTER`.
    fn interval(&self, group: usize) -> Duration {
        let timing = &self.shared.config.timing;
        let base = if self.decided[group] && self.is_urgent(group) {
            timing.fast_interval
        } else {
            timing.check_interval
        };
        let spread = timing.jitter * (2.0 * fastrand::f64() - 1.0);
        base.mul_f64(1.0 + spread)
    }

    /// The next periodic round, requested round, round deadline or reader
    /// expiry.
    fn next_wake(&self) -> Instant {
        let control = self.shared.control.lock();
        let requested = control.requested.iter().flatten().copied();
        let deadlines = self.open.iter().map(|round| round.deadline);
        self.next_round
            .iter()
            .copied()
            .chain(requested)
            .chain(deadlines)
            .chain(self.readers_expire)
            .fold(Instant::now() + Duration::from_secs(3600), Instant::min)
    }

    /// Probes the nodes of `groups`. A node whose probe is still in flight
    /// is not probed twice: the round waits for that answer.
    fn start_round(&mut self, id: u64, groups: &[bool]) {
        let config = Arc::clone(&self.shared.config);
        let now = Instant::now();
        // Per node, the ticket of the report this round's probe answers. A
        // probe in flight that checks no new sessions cannot answer one:
        // the report waits for the next probe (see `on_answer`).
        let reports: Vec<u64> = {
            let mut guard = self.shared.control.lock();
            let control = &mut *guard;
            config
                .nodes
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    let waits = matches!(
                        &self.probe_threads[i],
                        Some(t) if !t.abandoned
                            && t.in_flight.as_ref().is_some_and(|f| !f.checks_sessions)
                    );
                    if groups[node.group] && !waits && std::mem::take(&mut control.reported[i]) {
                        control.report_tickets[i]
                    } else {
                        0
                    }
                })
                .collect()
        };
        let mut waiting = Vec::new();
        // Reports answered at once (a probe that could not be sent).
        let mut checked = Vec::new();
        for (index, node) in config.nodes.iter().enumerate() {
            if !groups[node.group] {
                continue;
            }
            let check = reports[index] > 0 || self.session_check_due(index, now);
            match self.dispatch(index, check, reports[index]) {
                Ok(()) => waiting.push(index),
                Err(failure) => {
                    // Stuck past a deadline, or no thread: for a reported
                    // node, a second failure that agrees.
                    self.state.reported_failing[index] |= reports[index] > 0;
                    // A stuck probe's latency is how long it has been stuck.
                    let latency = self.probe_threads[index]
                        .as_ref()
                        .and_then(|thread| thread.in_flight.as_ref())
                        .map_or(Duration::ZERO, |probe| {
                            now.saturating_duration_since(probe.sent)
                        });
                    self.record(
                        index,
                        ProbeOutcome {
                            result: Err(failure),
                            latency,
                            confirmed: reports[index] > 0,
                            started: now,
                        },
                    );
                    checked.push((index, reports[index]));
                }
            }
        }
        let orphans = if groups.iter().all(|&g| g) {
            std::mem::take(&mut self.orphans)
        } else {
            Vec::new()
        };
        self.open.push(OpenRound {
            id,
            orphans,
            deadline: now + config.timing.connect_timeout + GRACE,
            waiting,
        });
        self.settle();
        for (node, report) in checked {
            self.report_checked(node, report);
        }
    }

    /// The probe that answers `node`'s report `ticket` (0: none) is
    /// recorded and published: `report_failure` may return.
    fn report_checked(&self, node: usize, ticket: u64) {
        if ticket == 0 {
            return;
        }
        let mut control = self.shared.control.lock();
        let checked = &mut control.reports_checked[node];
        *checked = (*checked).max(ticket);
        drop(control);
        self.shared.round_done.notify_all();
    }

    /// Takes in the failure reports made since the last look. A report of
    /// a node whose own last probe failed too is a confirmation (two
    /// independent attempts agree): the node is down now, not after FALL,
    /// and requests routed to it while no other node takes the writes fail
    /// at once (`Route::Failing`). When the network lost that probe's
    /// packets, FALL still decides when it is down (a lossy link must not
    /// flap), but from then on its requests fail at once too. The reports stay for the next round,
    /// which checks those nodes for new sessions.
    fn take_reports(&mut self) {
        let shared = Arc::clone(&self.shared);
        let mut guard = shared.control.lock();
        let control = &mut *guard;
        if control.reports_taken == control.reports_made {
            return;
        }
        let mut confirmed = false;
        let mut downed = Vec::new();
        self.state.reports.clone_from(&control.report_counts);
        for (node, &reported) in control.reported.iter().enumerate() {
            let failing = &self.state.nodes[node];
            if !reported || failing.failures == 0 {
                continue;
            }
            let corroborated = failing.last_error.as_ref().is_some_and(corroborates);
            confirmed |= !self.state.reported_failing[node];
            self.state.reported_failing[node] = true;
            if corroborated {
                // Decided already: the reporter need not wait for a probe.
                control.reports_checked[node] = control.report_tickets[node];
                let health = &mut self.state.nodes[node];
                if health.health == Health::Up {
                    health.health = Health::Down;
                    health.since = Some(SystemTime::now());
                    downed.push(node);
                }
            }
        }
        control.reports_taken = control.reports_made;
        drop(guard);
        for node in downed {
            self.node_changed(node, Health::Up);
        }
        if confirmed {
            self.settle();
        }
        // Wakes `report_failure`, which waits for this.
        self.shared.round_done.notify_all();
    }

    /// The group has no healthy writer, or its writer is being asked whether
    /// it takes new sessions (after a report, that may take a deadline): its
    /// other members are probed every `FAST_INTERVAL` meanwhile, so that a
    /// promotion is seen at once.
    fn is_urgent(&self, group: usize) -> bool {
        self.state.is_urgent(group)
            || self.state.writers[group].is_some_and(|w| {
                matches!(&self.probe_threads[w], Some(t) if t.in_flight.as_ref().is_some_and(|f| f.checks_sessions))
            })
    }

    /// Whether this probe of `node` must also open a fresh connection: its
    /// last such check failed, or it is its group's writer and
    /// `LISTENER_CHECK_INTERVAL` has passed.
    fn session_check_due(&mut self, node: usize, now: Instant) -> bool {
        if self.sessions_suspect[node] {
            return true;
        }
        let group = self.shared.config.nodes[node].group;
        if self.state.writers[group] != Some(node) {
            return false;
        }
        let Some(due) = self.next_session_check[group] else {
            return false;
        };
        if now < due {
            return false;
        }
        self.next_session_check[group] = self
            .shared
            .config
            .timing
            .listener_check_interval
            .map(|interval| now + interval);
        true
    }

    fn on_answer(
        &mut self,
        node: usize,
        result: Result<Observation, Failure>,
        started: Instant,
        latency: Duration,
        solicited: bool,
    ) {
        let mut started = started;
        // The server itself ended the session and a fresh connection
        // failed; or the application reported the node failing and this
        // probe failed too: two independent attempts agree.
        let mut confirmed = !solicited && result.is_err();
        let mut report = 0;
        if solicited {
            let Some(Some(thread)) = self.probe_threads.get_mut(node) else {
                return;
            };
            let in_flight = thread.in_flight.take();
            if std::mem::take(&mut thread.abandoned) {
                return;
            }
            if let Some(in_flight) = in_flight {
                // The lag was measured no earlier than the request was sent.
                started = in_flight.sent;
                if in_flight.report > 0 && result.is_err() {
                    // Once it is down, requests routed there fail at once
                    // (`Route::Failing`); it is down now only if this
                    // failure is more than the network's loss.
                    self.state.reported_failing[node] = true;
                    confirmed = result.as_ref().is_err_and(corroborates);
                }
                report = in_flight.report;
                if in_flight.checks_sessions {
                    self.sessions_suspect[node] = matches!(result, Err(Failure::NoNewSessions(_)));
                }
                let group = self.shared.config.nodes[node].group;
                if let (Some(number), Ok(observation)) = (in_flight.writer_probe, &result) {
                    if self.state.writers[group] == Some(node) {
                        self.write_logs[group].record(number, observation.position, in_flight.sent);
                    }
                }
            }
        }
        self.record(
            node,
            ProbeOutcome {
                result,
                latency,
                confirmed,
                started,
            },
        );
        self.settle();
        self.report_checked(node, report);
        if solicited {
            // A report that waited for this probe to end gets its own now.
            let group = self.shared.config.nodes[node].group;
            let mut control = self.shared.control.lock();
            if control.reported[node] {
                control.requested[group] = Some(Instant::now());
            }
        }
    }

    /// Rounds past their deadline count their missing answers as timeouts:
    /// those probes are stuck (in name resolution).
    fn expire_rounds(&mut self) {
        let now = Instant::now();
        if self.open.iter().all(|round| round.deadline > now) {
            return;
        }
        let timeout = self.shared.config.timing.connect_timeout;
        let expired: Vec<usize> = self
            .open
            .iter()
            .filter(|round| round.deadline <= now)
            .flat_map(|round| round.waiting.iter().copied())
            .collect();
        let mut checked = Vec::new();
        for node in expired {
            let mut report = 0;
            if let Some(Some(thread)) = self.probe_threads.get_mut(node) {
                if !thread.busy() || thread.abandoned {
                    continue; // already recorded
                }
                thread.abandoned = true;
                report = thread.in_flight.as_ref().map_or(0, |f| f.report);
            }
            // A hung probe of a node the application reported failing.
            self.state.reported_failing[node] |= report > 0;
            self.record(
                node,
                ProbeOutcome {
                    result: Err(Failure::Timeout),
                    latency: timeout,
                    confirmed: report > 0,
                    started: now.checked_sub(timeout).unwrap_or(now),
                },
            );
            checked.push((node, report));
        }
        for round in &mut self.open {
            if round.deadline <= now {
                round.waiting.clear();
            }
        }
        self.settle();
        for (node, report) in checked {
            self.report_checked(node, report);
        }
    }

    /// Records one outcome in the state machine; the rounds waiting for it
    /// stop waiting.
    fn record(&mut self, index: usize, outcome: ProbeOutcome) {
        let config = &self.shared.config;
        let timing = config.timing;
        match &outcome.result {
            Ok(_) => self.state.reported_failing[index] = false,
            Err(failure) => self.state.probe_errors[index][failure.kind_index()] += 1,
        }
        let health = &mut self.state.nodes[index];
        let before = health.health;
        if log::log_enabled!(Level::Debug) {
            log::debug!(
                "{} ({}): {} in {:.1} ms",
                config.nodes[index].alias,
                config.nodes[index].server.endpoint,
                match &outcome.result {
                    Ok(observation) => observation.to_string(),
                    Err(failure) => failure.to_string(),
                },
                outcome.latency.as_secs_f64() * 1000.0
            );
        }
        if health
            .record(outcome, timing.rise, timing.fall, SystemTime::now())
            .is_some()
        {
            self.node_changed(index, before);
        }
        for round in &mut self.open {
            round.waiting.retain(|&n| n != index);
        }
    }

    /// Chooses writers and readers from what is known now, publishes, and
    /// completes the rounds that have all their answers.
    fn settle(&mut self) {
        let config = Arc::clone(&self.shared.config);
        let now = Instant::now();
        let mut expire: Option<Instant> = None;
        for (g, group) in config.groups.iter().enumerate() {
            let members = group.members.clone();
            if members.clone().any(|i| self.undecided(i)) {
                continue;
            }
            self.select_writer(g, members.clone());
            self.decided[g] = true;
            let readers = choose_readers(
                members.clone(),
                &self.state.nodes,
                self.state.writers[g],
                &self.write_logs[g],
                &config.reads,
                now,
            );
            self.state.readers[g] = readers.mask;
            expire = earliest(expire, readers.expires);
            for i in members {
                // The writer has its own writes (`READS = "any"`).
                self.state.caught_up[i] = if self.state.writers[g] == Some(i) {
                    u64::MAX
                } else {
                    self.write_logs[g].caught_up(&self.state.nodes[i])
                };
            }
            if self.is_urgent(g) {
                // Do not wait out a long interval already scheduled.
                let soon = now + config.timing.fast_interval;
                self.next_round[g] = self.next_round[g].min(soon);
            }
        }
        self.readers_expire = expire;
        let done: Vec<OpenRound> = {
            let (done, open) = std::mem::take(&mut self.open)
                .into_iter()
                .partition(|round| round.waiting.is_empty());
            self.open = open;
            done
        };
        self.state.rounds += done.len() as u64;
        self.publish();
        if !done.is_empty() {
            let mut control = self.shared.control.lock();
            for round in done {
                control.complete(round.id);
                for orphan in round.orphans {
                    control.complete(orphan);
                }
            }
            self.shared.round_done.notify_all();
        }
    }

    /// Whether the group's choice should wait for this node: it never
    /// answered yet, or it looked healthy and its answer is on its way. Not
    /// waited for: a node already failing (its answer is likely a timeout,
    /// and a promotion must not wait for that), or one being asked whether
    /// it takes new sessions (after a report, that may take a deadline).
    fn undecided(&self, node: usize) -> bool {
        let health = &self.state.nodes[node];
        let awaited = matches!(
            &self.probe_threads[node],
            Some(thread) if !thread.abandoned
                && thread.in_flight.as_ref().is_some_and(|f| !f.checks_sessions)
        );
        health.health == Health::Unknown || (awaited && health.is_up() && !health.is_suspect())
    }

    fn publish(&self) {
        let config = &self.shared.config;
        let shared = &self.shared;
        shared.snapshot.store(Arc::new(self.state.clone()));
        for (i, &caught_up) in self.state.caught_up.iter().enumerate() {
            shared.caught_up[i].store(caught_up, Ordering::Release);
            let writer = self.state.writers[config.nodes[i].group] == Some(i);
            let through = replayed_through(&self.state.nodes[i], writer);
            shared.replayed_through[i].store(through, Ordering::Release);
        }
        for (g, group) in config.groups.iter().enumerate() {
            let readers = self.state.readers[g];
            let members = group.members.clone();
            let fastest = fastest_reader(members.clone(), &self.state.nodes, readers);
            let least_caught_up = members
                .clone()
                .filter(|&i| readers & (1 << (i - members.start)) != 0)
                .filter(|&i| Some(i) != self.state.writers[g])
                .map(|i| self.state.caught_up[i])
                .min()
                .unwrap_or(u64::MAX);
            shared.least_caught_up[g].store(least_caught_up, Ordering::Release);
            shared.routes[g].store(self.state.route(config, g).pack(), Ordering::Release);
            shared.readers[g].store(readers, Ordering::Release);
            shared.fastest[g].store(fastest.unwrap_or(usize::MAX), Ordering::Release);
        }
    }

    fn select_writer(&mut self, group: usize, members: std::ops::Range<usize>) {
        let config = Arc::clone(&self.shared.config);
        let before = self.state.writers[group];
        let fenced_before = self.state.fenced.clone();
        let after = choose_writer(
            members.clone(),
            &self.state.nodes,
            &mut self.state.fenced,
            &mut self.state.newest_timelines[group],
            before,
            config.failback,
        );
        let alias = |i: usize| config.nodes[i].alias.clone();
        for (change, level, message) in self.fence_changes(members, &fenced_before, after) {
            self.notify(group, change, level, &message, false);
        }
        // The first choice reports even "no writer", so a process that
        // starts with every database down says so.
        if after == before && (after.is_some() || self.decided[group]) {
            return;
        }
        let first = !self.decided[group] && before.is_none();
        self.state.writers[group] = after;
        let Some(new) = after else {
            let policy = match config.on_all_down {
                OnAllDown::Last => "routing to the last writer",
                OnAllDown::Raise => "raising NoHealthyDatabase",
            };
            let members = self.state.describe_group(&config, group);
            let message = format!("no writer ({members}); {policy}");
            self.notify(group, Change::NoWriter, Level::Error, &message, first);
            return;
        };
        let previous = before.or(self.state.last_writers[group]);
        if previous != Some(new) {
            // Another server: its data positions do not compare with the
            // old one's.
            self.write_logs[group].clear();
        }
        let (level, message) = match previous {
            Some(old) if old != new => {
                self.state.writer_changes[group] += 1;
                (
                    Level::Warn,
                    format!("writes move from {} to {}", alias(old), alias(new)),
                )
            }
            Some(_) => (Level::Info, format!("writes resume on {}", alias(new))),
            None => (Level::Info, format!("writes go to {}", alias(new))),
        };
        let change = Change::WriterChanged {
            old: previous.map(alias),
            new: alias(new),
        };
        self.notify(group, change, level, &message, first && previous.is_none());
        self.state.last_writers[group] = Some(new);
    }

    /// The events for primaries fenced or let go since `fenced_before`,
    /// with `after` taking the writes.
    fn fence_changes(
        &self,
        members: std::ops::Range<usize>,
        fenced_before: &[bool],
        after: Option<usize>,
    ) -> Vec<(Change, Level, String)> {
        let config = &self.shared.config;
        let alias = |i: usize| config.nodes[i].alias.clone();
        let timeline = |i: usize| {
            self.state.nodes[i]
                .timeline
                .map_or("?".to_owned(), |t| t.to_string())
        };
        let mut events = Vec::new();
        for i in members.clone() {
            match (fenced_before[i], self.state.fenced[i]) {
                (false, true) => {
                    let writer = after.map_or("?".to_owned(), alias);
                    let newer = after.is_some_and(|w| {
                        matches!(
                            (self.state.nodes[i].timeline, self.state.nodes[w].timeline),
                            (Some(t), Some(n)) if n > t
                        )
                    });
                    let message = if newer {
                        format!(
                            "split brain: {} is primary on timeline {}, but {writer} was \
                             promoted since (timeline {}): every write {} takes is lost; \
                             writes go to {writer}, and {} gets none until it is rewound \
                             and rejoined as a standby",
                            alias(i),
                            timeline(i),
                            after.map_or("?".to_owned(), timeline),
                            alias(i),
                            alias(i),
                        )
                    } else {
                        format!(
                            "split brain: {} reports primary (timeline {}) while {writer} \
                             (timeline {}) takes the writes; writes stay on {writer}, and {} \
                             gets none until it is rewound or rejoined as a standby",
                            alias(i),
                            timeline(i),
                            after.map_or("?".to_owned(), timeline),
                            alias(i),
                        )
                    };
                    let fenced = members
                        .clone()
                        .filter(|&n| self.state.fenced[n])
                        .map(alias)
                        .collect();
                    events.push((
                        Change::SplitBrain {
                            fenced,
                            writer: after.map(alias),
                        },
                        Level::Error,
                        message,
                    ));
                }
                (true, false) => {
                    let message = if self.state.nodes[i].role == Some(crate::engines::Role::Standby)
                    {
                        format!("{} reports standby: no longer fenced", alias(i))
                    } else {
                        format!(
                            "{} is primary on timeline {}, the newest: no longer fenced",
                            alias(i),
                            timeline(i)
                        )
                    };
                    events.push((Change::Unfenced { alias: alias(i) }, Level::Info, message));
                }
                _ => {}
            }
        }
        events
    }

    /// Tells the observer of a change in `group`: `group 'main': <message>`.
    fn notify(&self, group: usize, change: Change, level: Level, message: &str, first: bool) {
        let name = &self.shared.config.groups[group].name;
        self.shared.observer.notify(Event {
            group: name.clone(),
            change,
            level,
            message: format!("group '{name}': {message}"),
            first,
        });
    }

    /// Tells the observer that `node`'s health changed from `before`.
    fn node_changed(&self, node: usize, before: Health) {
        let config = &self.shared.config;
        let health = &self.state.nodes[node];
        let name = &config.nodes[node];
        let alias = name.alias.clone();
        let (change, level, message) = match (health.health, &health.last_error) {
            (Health::Down, failure) => {
                let reason = failure
                    .as_ref()
                    .map_or("down".to_owned(), ToString::to_string);
                let message = format!("{} ({}) is down: {reason}", alias, name.server.endpoint);
                (Change::NodeDown { alias, reason }, Level::Warn, message)
            }
            _ => {
                let latency = health.latency.unwrap_or_default().as_secs_f64() * 1000.0;
                let message = format!(
                    "{} ({}) is up ({latency:.1} ms)",
                    alias, name.server.endpoint
                );
                (Change::NodeUp { alias }, Level::Info, message)
            }
        };
        self.shared.observer.notify(Event {
            group: config.groups[name.group].name.clone(),
            change,
            level,
            message,
            first: before == Health::Unknown,
        });
    }

    /// Hands a probe of `node` to its thread, starting the thread if
    /// needed. A node whose probe is in flight is left to answer that one
    /// (which then also answers the report, if `reported`).
    fn dispatch(
        &mut self,
        node: usize,
        check_new_sessions: bool,
        report: u64,
    ) -> Result<(), Failure> {
        if let Some(thread) = &mut self.probe_threads[node] {
            if let Some(in_flight) = &mut thread.in_flight {
                in_flight.report = in_flight.report.max(report);
                return if thread.abandoned {
                    // Stuck past a deadline already: another timeout.
                    Err(Failure::Timeout)
                } else {
                    Ok(())
                };
            }
        }
        let sent = match &self.probe_threads[node] {
            Some(thread) => thread.requests.send(check_new_sessions).is_ok(),
            None => false,
        };
        if !sent {
            let thread = self
                .spawn_probe_thread(node)
                .map_err(|e| Failure::Internal(format!("cannot start a probe thread: {e}")))?;
            if thread.requests.send(check_new_sessions).is_err() {
                return Err(Failure::Internal("probe thread exited".into()));
            }
            self.probe_threads[node] = Some(thread);
        }
        let group = self.shared.config.nodes[node].group;
        // Numbered before it is sent: it finds every commit made before this.
        let writer_probe = (self.state.writers[group] == Some(node))
            .then(|| self.shared.writer_probes[group].fetch_add(1, Ordering::AcqRel) + 1);
        if let Some(thread) = &mut self.probe_threads[node] {
            thread.in_flight = Some(InFlight {
                sent: Instant::now(),
                checks_sessions: check_new_sessions,
                report,
                writer_probe,
            });
            thread.ringer.ring();
        }
        Ok(())
    }

    fn spawn_probe_thread(&self, index: usize) -> std::io::Result<ProbeThread> {
        let (requests, inbox) = mpsc::channel::<bool>();
        let (ringer, bell) = doorbell()?;
        let events = self.events_sender.clone();
        let shared = Arc::clone(&self.shared);
        thread::Builder::new()
            .name("dbha-probe".into())
            .spawn(move || probe_thread(&shared, index, &inbox, &bell, &events))?;
        Ok(ProbeThread {
            requests,
            ringer,
            in_flight: None,
            abandoned: false,
        })
    }
}

/// A probe thread's life: wait for a request or for the kept session's
/// socket; answer requests one by one; report at once when the server ends
/// the session. It ends when the scheduler drops its ringer.
fn probe_thread(
    shared: &Shared,
    index: usize,
    inbox: &Receiver<bool>,
    bell: &Bell,
    events: &Sender<Wakeup>,
) {
    crate::net::block_sigpipe();
    let node = &shared.config.nodes[index];
    let timeout = shared.config.timing.connect_timeout;
    let mut prober = shared.prober.for_node(node);
    let send = |result, started: Instant, solicited| {
        let answer = Wakeup::Answer {
            node: index,
            result,
            started,
            latency: started.elapsed(),
            solicited,
        };
        events.send(answer).is_ok()
    };
    loop {
        let Ok(woken) = bell.wait(prober.watched_socket()) else {
            // poll() itself failed: there is nothing left to wait on.
            return;
        };
        if woken.hung_up {
            return;
        }
        if woken.socket && !woken.rung {
            let started = Instant::now();
            match guarded(|| prober.on_readable(timeout)) {
                Ok(None) => {}
                Ok(Some(result)) => {
                    if !send(result, started, false) {
                        return;
                    }
                }
                Err(failure) => {
                    prober = shared.prober.for_node(node);
                    if !send(Err(failure), started, false) {
                        return;
                    }
                }
            }
        }
        while let Ok(check_new_sessions) = inbox.try_recv() {
            let started = Instant::now();
            let result =
                guarded(|| prober.probe(timeout, check_new_sessions)).unwrap_or_else(|failure| {
                    // Whatever it held (a connection) is suspect now.
                    prober = shared.prober.for_node(node);
                    Err(failure)
                });
            if !send(result, started, true) {
                return;
            }
        }
    }
}

/// Whether a failed probe of a node the application reported failing
/// confirms the report. Not when the network lost the probe's packets (a
/// connect unanswered, a read timed out while TCP was resending): on a lossy
/// link that is the same loss the application met, not a second witness,
/// and `FALL` decides. A hung server's kernel answers TCP for it: its
/// timeouts confirm.
fn corroborates(failure: &Failure) -> bool {
    match failure {
        Failure::Unreachable => false,
        Failure::NoNewSessions(inner) => corroborates(inner),
        _ => true,
    }
}

/// Runs a probe step, turning a panic (a bug) into an `Internal` failure.
fn guarded<T>(step: impl FnOnce() -> T) -> Result<T, Failure> {
    panic::catch_unwind(AssertUnwindSafe(step))
        .map_err(|panic| Failure::Internal(format!("probe panicked: {}", panic_message(&*panic))))
}

/// Up to when (ms since the epoch) `health`'s node has replayed every
/// commit: when its last probe began, less its lag then, less a second for
/// what was still on its way to it; `u64::MAX` for the writer; 0 if unknown.
fn replayed_through(health: &NodeHealth, writer: bool) -> u64 {
    const IN_FLIGHT: Duration = Duration::from_secs(1);
    if writer {
        return u64::MAX;
    }
    let (Some(checked), Some(lag), true) = (health.checked_at, health.lag, health.is_up()) else {
        return 0;
    };
    let began = checked.checked_sub(health.latency.unwrap_or_default());
    began
        .and_then(|t| t.checked_sub(lag + IN_FLIGHT))
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::events::LogObserver;
    use crate::checker::value::Value;
    use crate::engines::Role;
    use parking_lot::{Mutex, RwLock};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// What each alias answers, changeable while the checker runs.
    #[derive(Default)]
    struct Script {
        answers: RwLock<HashMap<String, Answer>>,
        probes: AtomicUsize,
        /// Per alias, how many probes came and how many checked new sessions.
        seen: Mutex<HashMap<String, (usize, usize)>>,
    }

    #[derive(Clone, Copy)]
    enum Answer {
        Up,
        Primary,
        /// A primary on this timeline, at this position.
        PrimaryAt(u64, u64),
        Standby(u64),
        /// A standby with this lag (seconds) that has replayed this position.
        StandbyAt(u64, u64),
        /// The kept session answers; a new connection would fail.
        NoNewSessions,
        /// The kept session answers (a primary on timeline 1); a new
        /// connection hangs until the deadline.
        NoNewSessionsHang,
        /// The kept session answers; a new connection's SYNs get no answer
        /// (a lossy link).
        NoNewSessionsUnreachable,
        Refused,
        /// The network loses the probe's packets: its connect or its
        /// question gets no answer.
        Unreachable,
        Hang,
        Panic,
    }

    impl Script {
        fn set(&self, alias: &str, answer: Answer) {
            self.answers.write().insert(alias.to_owned(), answer);
        }

        /// (probes, probes that checked new sessions) of `alias` so far.
        fn seen(&self, alias: &str) -> (usize, usize) {
            self.seen.lock().get(alias).copied().unwrap_or_default()
        }
    }

    struct Scripted {
        alias: String,
        script: Arc<Script>,
    }

    impl Prober for Arc<Script> {
        fn for_node(&self, node: &Node) -> Box<dyn NodeProber> {
            Box::new(Scripted {
                alias: node.alias.clone(),
                script: Arc::clone(self),
            })
        }
    }

    impl NodeProber for Scripted {
        fn probe(&mut self, timeout: Duration, check: bool) -> Result<Observation, Failure> {
            self.script.probes.fetch_add(1, Ordering::SeqCst);
            {
                let mut seen = self.script.seen.lock();
                let counts = seen.entry(self.alias.clone()).or_default();
                counts.0 += 1;
                counts.1 += usize::from(check);
            }
            let answer = self
                .script
                .answers
                .read()
                .get(&self.alias)
                .copied()
                .unwrap_or(Answer::Up);
            let role = |role, lag| Observation {
                role: Some(role),
                lag,
                ..Observation::default()
            };
            match answer {
                Answer::Up => Ok(Observation::default()),
                Answer::NoNewSessions if check => {
                    Err(Failure::NoNewSessions(Box::new(Failure::Timeout)))
                }
                Answer::NoNewSessionsHang if check => {
                    thread::sleep(timeout);
                    Err(Failure::NoNewSessions(Box::new(Failure::Timeout)))
                }
                Answer::NoNewSessionsUnreachable if check => {
                    Err(Failure::NoNewSessions(Box::new(Failure::Unreachable)))
                }
                Answer::NoNewSessionsHang => Ok(Observation {
                    timeline: Some(1),
                    ..role(Role::Primary, None)
                }),
                Answer::Primary | Answer::NoNewSessions | Answer::NoNewSessionsUnreachable => {
                    Ok(role(Role::Primary, None))
                }
                Answer::PrimaryAt(timeline, position) => Ok(Observation {
                    timeline: Some(timeline),
                    position: Some(position),
                    ..role(Role::Primary, None)
                }),
                Answer::Standby(lag) => Ok(role(Role::Standby, Some(Duration::from_secs(lag)))),
                Answer::StandbyAt(lag, position) => Ok(Observation {
                    position: Some(position),
                    ..role(Role::Standby, Some(Duration::from_secs(lag)))
                }),
                Answer::Refused => Err(Failure::Refused),
                Answer::Unreachable => Err(Failure::Unreachable),
                Answer::Hang => {
                    thread::sleep(timeout);
                    Err(Failure::Timeout)
                }
                Answer::Panic => panic!("scripted panic"),
            }
        }
    }

    /// `DATABASES` with a PostgreSQL server for each alias (a group's
    /// aliases may not share one).
    fn databases(aliases: &[&str]) -> Value {
        Value::Map(
            aliases
                .iter()
                .zip(5432..)
                .map(|(alias, port)| {
                    let entry = Value::Map(vec![
                        ("ENGINE".into(), Value::str("django.db.backends.postgresql")),
                        ("PORT".into(), Value::Int(port)),
                    ]);
                    ((*alias).to_owned(), entry)
                })
                .collect(),
        )
    }

    fn config(aliases: &[&str], dbha: &[(&str, Value)]) -> Arc<Config> {
        let databases = databases(aliases);
        let mut settings = vec![
            ("CHECK_INTERVAL".to_owned(), Value::Float(0.05)),
            // Generous: a loaded machine (tests in parallel, backtraces printed)
            // must not turn a scripted answer into a timeout.
            ("CONNECT_TIMEOUT".to_owned(), Value::Float(1.0)),
            ("RISE".to_owned(), Value::Int(1)),
            ("FALL".to_owned(), Value::Int(1)),
        ];
        for (key, value) in dbha {
            settings.retain(|(k, _)| k != key);
            settings.push(((*key).to_owned(), value.clone()));
        }
        Arc::new(Config::from_settings(&databases, &Value::Map(settings)).unwrap())
    }

    /// The route, once the atomic the hot path reads agrees with the
    /// snapshot (they are published one after the other).
    fn writer(checker: &Checker) -> Route {
        for _ in 0..100 {
            let route = checker.route(0);
            if route == checker.snapshot().route(checker.config(), 0) {
                return route;
            }
            thread::sleep(Duration::from_millis(1));
        }
        panic!("the published route and snapshot disagree");
    }

    /// Runs fresh rounds and returns the route after them. Two: the first
    /// may take the answer of a probe sent before the script changed.
    fn settle(checker: &Checker) -> Route {
        for _ in 0..2 {
            let ticket = checker.request_round(None);
            assert!(checker.wait_for_round(ticket, Duration::from_secs(5)));
        }
        writer(checker)
    }

    /// Waits (bounded by `by`) until `checker` routes `group` 0 to `route`.
    fn await_route(checker: &Checker, route: Route, by: Instant, what: &str) {
        while writer(checker) != route {
            assert!(Instant::now() < by, "{what}: {:?}", writer(checker));
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn start(aliases: &[&str], dbha: &[(&str, Value)], script: &Arc<Script>) -> Checker {
        let prober: Arc<dyn Prober> = Arc::new(Arc::clone(script));
        let checker =
            Checker::start(config(aliases, dbha), prober, Arc::new(LogObserver), None).unwrap();
        assert!(checker.wait_for_round(1, Duration::from_secs(5)));
        checker
    }

    const ABC: [&str; 3] = ["a", "b", "c"];

    #[test]
    fn failover_and_sticky_writer() {
        let script = Arc::new(Script::default());
        let checker = start(&ABC, &[], &script);
        assert_eq!(writer(&checker), Route::Healthy(0));
        script.set("a", Answer::Refused);
        assert_eq!(settle(&checker), Route::Healthy(1));
        script.set("a", Answer::Up);
        assert_eq!(settle(&checker), Route::Healthy(1), "sticky: no failback");
        assert!(checker.snapshot().nodes[0].is_up());
        checker.stop(true);
    }

    #[test]
    fn auto_failback() {
        let script = Arc::new(Script::default());
        let checker = start(&ABC, &[("FAILBACK", Value::str("auto"))], &script);
        script.set("a", Answer::Refused);
        assert_eq!(settle(&checker), Route::Healthy(1));
        script.set("a", Answer::Up);
        assert_eq!(settle(&checker), Route::Healthy(0));
        checker.stop(true);
    }

    #[test]
    fn all_down_keeps_the_last_writer() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Refused);
        let checker = start(&ABC, &[], &script);
        assert_eq!(writer(&checker), Route::Healthy(1));
        script.set("b", Answer::Refused);
        script.set("c", Answer::Refused);
        assert_eq!(settle(&checker), Route::AllDown(1));
        checker.stop(true);
    }

    #[test]
    fn never_up_falls_back_to_the_first_alias() {
        let script = Arc::new(Script::default());
        for alias in ABC {
            script.set(alias, Answer::Refused);
        }
        let checker = start(&ABC, &[], &script);
        assert_eq!(writer(&checker), Route::AllDown(0));
        let nodes = &checker.snapshot().nodes;
        assert!(nodes.iter().all(|n| n.last_error == Some(Failure::Refused)));
        checker.stop(true);
    }

    #[test]
    fn hung_nodes_are_probed_in_parallel() {
        let script = Arc::new(Script::default());
        for alias in ["a", "b", "c", "d", "e"] {
            script.set(alias, Answer::Hang);
        }
        let dbha = [
            ("CHECK_INTERVAL", Value::Int(60)),
            ("CONNECT_TIMEOUT", Value::Float(0.3)),
        ];
        let started = Instant::now();
        let checker = start(&["a", "b", "c", "d", "e", "f"], &dbha, &script);
        let took = started.elapsed();
        // Five hung nodes cost one deadline (0.3 s), not five (1.5 s).
        assert!(
            took < Duration::from_millis(900),
            "first round took {took:?}"
        );
        assert_eq!(writer(&checker), Route::Healthy(5));
        checker.stop(true);
    }

    #[test]
    fn a_stuck_probe_does_not_stall_the_schedule() {
        struct Stuck;
        struct StuckNode(bool);
        impl Prober for Stuck {
            fn for_node(&self, node: &Node) -> Box<dyn NodeProber> {
                Box::new(StuckNode(node.alias == "a"))
            }
        }
        impl NodeProber for StuckNode {
            fn probe(&mut self, _: Duration, _: bool) -> Result<Observation, Failure> {
                if self.0 {
                    // Like getaddrinfo() on a dead resolver: ignores the deadline.
                    thread::sleep(Duration::from_secs(2));
                }
                Ok(Observation::default())
            }
        }
        let dbha = [("CONNECT_TIMEOUT", Value::Float(0.2))];
        let checker = Checker::start(
            config(&["a", "b"], &dbha),
            Arc::new(Stuck),
            Arc::new(LogObserver),
            None,
        )
        .unwrap();
        assert!(checker.wait_for_round(1, Duration::from_secs(1)));
        assert_eq!(writer(&checker), Route::Healthy(1));
        let started = Instant::now();
        assert!(checker.wait_for_round(3, Duration::from_secs(1)));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            checker.snapshot().nodes[0].last_error,
            Some(Failure::Timeout)
        );
        checker.stop(true);
    }

    #[test]
    fn a_panicking_probe_marks_the_node_down() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Panic);
        let checker = start(&ABC, &[], &script);
        assert_eq!(writer(&checker), Route::Healthy(1));
        let error = checker.snapshot().nodes[0].last_error.clone();
        assert!(matches!(error, Some(Failure::Internal(m)) if m.contains("scripted panic")));
        // The probe thread survived the panic and still answers.
        script.set("a", Answer::Up);
        settle(&checker);
        assert!(checker.snapshot().nodes[0].is_up());
        checker.stop(true);
    }

    #[test]
    fn a_panicking_scheduler_is_restarted_with_its_state() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Refused);
        let checker = start(&ABC, &[], &script);
        assert_eq!(writer(&checker), Route::Healthy(1));
        script.set("a", Answer::Up);
        {
            let mut control = checker.shared.control.lock();
            control.panic_now = true;
            control.wake();
        }
        thread::sleep(Duration::from_millis(200));
        let route = settle(&checker);
        assert_eq!(
            route,
            Route::Healthy(1),
            "the restarted scheduler kept the sticky writer"
        );
        checker.stop(true);
    }

    #[test]
    fn failure_reports_trigger_a_prompt_reprobe() {
        let script = Arc::new(Script::default());
        let dbha = [("CHECK_INTERVAL", Value::Int(60))];
        let checker = start(&ABC, &dbha, &script);
        let before = script.probes.load(Ordering::SeqCst);
        script.set("a", Answer::Refused);
        // A burst: 100 requests failing at once, each reporting.
        thread::scope(|scope| {
            for _ in 0..100 {
                scope.spawn(|| checker.report_failure(0));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(2);
        while writer(&checker) != Route::Healthy(1) {
            assert!(Instant::now() < deadline, "no re-probe");
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(150));
        let probes = script.probes.load(Ordering::SeqCst) - before;
        let rounds = checker.shared.control.lock().started;
        assert!(
            probes <= 6,
            "100 reports cost {probes} probes, rounds {rounds}"
        );
        checker.stop(true);
    }

    #[test]
    fn rounds_can_cover_one_group() {
        let script = Arc::new(Script::default());
        let databases = databases(&["a", "b", "r"]);
        let groups = Value::Map(vec![
            (
                "main".into(),
                Value::List(vec![Value::str("a"), Value::str("b")]),
            ),
            ("reports".into(), Value::List(vec![Value::str("r")])),
        ]);
        let dbha = Value::Map(vec![
            ("GROUPS".into(), groups),
            ("CHECK_INTERVAL".into(), Value::Int(60)),
            ("FALL".into(), Value::Int(1)),
        ]);
        let config = Arc::new(Config::from_settings(&databases, &dbha).unwrap());
        let prober: Arc<dyn Prober> = Arc::new(Arc::clone(&script));
        let checker = Checker::start(config, prober, Arc::new(LogObserver), None).unwrap();
        assert!(checker.wait_for_round(1, Duration::from_secs(5)));
        script.set("a", Answer::Refused);
        script.set("r", Answer::Refused);
        let ticket = checker.request_round(Some(0));
        assert!(checker.wait_for_round(ticket, Duration::from_secs(5)));
        let snapshot = checker.snapshot();
        assert_eq!(checker.route(0), Route::Healthy(1));
        assert!(snapshot.nodes[2].is_up(), "group 'reports' was not probed");
        checker.stop(true);
    }

    #[test]
    fn seed_carries_sticky_writers() {
        let script = Arc::new(Script::default());
        let config = config(&ABC, &[]);
        let mut seed = Snapshot::unknown(&config);
        seed.writers[0] = Some(2);
        seed.last_writers[0] = Some(2);
        seed.nodes[2].health = Health::Up;
        let prober: Arc<dyn Prober> = Arc::new(Arc::clone(&script));
        let checker = Checker::start(config, prober, Arc::new(LogObserver), Some(&seed)).unwrap();
        assert_eq!(checker.snapshot().rounds, 0);
        assert_eq!(
            checker.route(0),
            Route::Healthy(2),
            "answers from the seed at once"
        );
        assert!(checker.wait_for_round(1, Duration::from_secs(5)));
        assert_eq!(writer(&checker), Route::Healthy(2));
        checker.stop(true);
    }

    #[test]
    fn a_promotion_is_followed_without_waiting_for_fall() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Primary);
        script.set("b", Answer::Standby(0));
        script.set("c", Answer::Standby(0));
        let checker = start(&ABC, &[("FALL", Value::Int(5))], &script);
        assert_eq!(writer(&checker), Route::Healthy(0));
        script.set("a", Answer::Refused);
        script.set("c", Answer::Primary);
        // One failed probe of the writer, not five, once another node is primary.
        assert_eq!(settle(&checker), Route::Healthy(2));
        assert!(checker.snapshot().nodes[0].is_up(), "FALL not reached yet");
        checker.stop(true);
    }

    #[test]
    fn a_promotion_is_not_held_up_by_a_hung_writer() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Primary);
        script.set("b", Answer::Standby(0));
        let dbha = [
            ("FALL", Value::Int(3)),
            ("CHECK_INTERVAL", Value::Int(60)),
            ("CONNECT_TIMEOUT", Value::Float(0.5)),
        ];
        let checker = start(&["a", "b"], &dbha, &script);
        script.set("a", Answer::Hang);
        settle(&checker); // one timeout: a is failing but still up
        assert_eq!(writer(&checker), Route::Healthy(0));
        script.set("b", Answer::Primary);
        let started = Instant::now();
        thread::scope(|scope| {
            let reporter = scope.spawn(|| checker.report_failure(0));
            await_route(
                &checker,
                Route::Healthy(1),
                started + Duration::from_secs(2),
                "no switch",
            );
            // Well within the hung probe's 0.5 s deadline.
            let switched = started.elapsed();
            assert!(switched < Duration::from_millis(250), "{switched:?}");
            reporter.join().unwrap();
            // a's own probe had failed: the report is confirmed at once,
            // and the reporter does not wait for another probe.
            let waited = started.elapsed();
            assert!(waited < Duration::from_millis(250), "{waited:?}");
        });
        checker.stop(true);
    }

    #[test]
    fn the_newest_timeline_takes_the_writes_from_a_healthy_primary() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::PrimaryAt(1, 100));
        script.set("b", Answer::StandbyAt(0, 100));
        script.set("c", Answer::StandbyAt(0, 100));
        let checker = start(&ABC, &[("FALL", Value::Int(5))], &script);
        assert_eq!(writer(&checker), Route::Healthy(0));
        // c promoted while a keeps running and answering.
        script.set("c", Answer::PrimaryAt(2, 120));
        assert_eq!(settle(&checker), Route::Healthy(2));
        let snapshot = checker.snapshot();
        assert_eq!(snapshot.fenced, [true, false, false]);
        assert!(snapshot.nodes[0].is_up() && snapshot.nodes[0].failures == 0);
        // A process that starts now picks the newest too.
        checker.stop(true);
        let fresh = start(&ABC, &[], &script);
        assert_eq!(writer(&fresh), Route::Healthy(2));
        fresh.stop(true);
    }

    #[test]
    fn split_brain_is_fenced_and_published() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Refused);
        script.set("b", Answer::Primary);
        script.set("c", Answer::Standby(0));
        let checker = start(&ABC, &[], &script);
        assert_eq!(writer(&checker), Route::Healthy(1));
        script.set("a", Answer::Primary); // back un-rewound
        for _ in 0..3 {
            assert_eq!(settle(&checker), Route::Healthy(1));
        }
        assert_eq!(checker.snapshot().fenced, [true, false, false]);
        script.set("a", Answer::Standby(0)); // rejoined
        settle(&checker);
        assert_eq!(checker.snapshot().fenced, [false; 3]);
        checker.stop(true);
    }

    /// Collects the checker's events.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Event>>);

    impl Observer for Recorder {
        fn notify(&self, event: Event) {
            self.0.lock().push(event);
        }
    }

    impl Recorder {
        /// (kind, first) of every event so far, and forgets them.
        fn take(&self) -> Vec<(&'static str, bool)> {
            std::mem::take(&mut *self.0.lock())
                .iter()
                .map(|e| (e.change.kind(), e.first))
                .collect()
        }
    }

    #[test]
    fn every_transition_is_one_event() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::PrimaryAt(1, 0));
        script.set("b", Answer::Standby(0));
        script.set("c", Answer::Refused);
        let recorder = Arc::new(Recorder::default());
        let prober: Arc<dyn Prober> = Arc::new(Arc::clone(&script));
        let observer: Arc<dyn Observer> = recorder.clone();
        let checker = Checker::start(config(&ABC, &[]), prober, observer, None).unwrap();
        assert!(checker.wait_for_round(1, Duration::from_secs(5)));
        let mut first = recorder.take();
        first.sort_unstable();
        assert_eq!(
            first,
            [
                ("node_down", true),
                ("node_up", true),
                ("node_up", true),
                ("writer_changed", true)
            ],
            "a process's first findings"
        );
        settle(&checker);
        assert_eq!(recorder.take(), [], "nothing changed, nothing told");

        script.set("a", Answer::Refused);
        settle(&checker);
        assert_eq!(
            recorder.take(),
            [("node_down", false), ("no_writer", false)]
        );
        script.set("b", Answer::PrimaryAt(2, 0));
        settle(&checker);
        assert_eq!(recorder.take(), [("writer_changed", false)]);
        let snapshot = checker.snapshot();
        assert_eq!(snapshot.writer_changes, [1]);
        // Rounds come every 50 ms besides ours: at least our two failed.
        assert!(snapshot.probe_errors[0][Failure::Refused.kind_index()] >= 2);
        assert_eq!(snapshot.probe_errors[1].iter().sum::<u64>(), 0);

        script.set("a", Answer::PrimaryAt(1, 0)); // back, un-rewound
        settle(&checker);
        assert_eq!(
            recorder.take(),
            [("node_up", false), ("split_brain", false)]
        );
        script.set("a", Answer::Standby(0)); // rewound and rejoined
        settle(&checker);
        assert_eq!(recorder.take(), [("unfenced", false)]);
        checker.stop(true);
    }

    #[test]
    fn split_brain_events_name_the_fenced_and_the_writer() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Refused);
        script.set("b", Answer::PrimaryAt(2, 0));
        script.set("c", Answer::Standby(0));
        let recorder = Arc::new(Recorder::default());
        let prober: Arc<dyn Prober> = Arc::new(Arc::clone(&script));
        let observer: Arc<dyn Observer> = recorder.clone();
        let checker = Checker::start(config(&ABC, &[]), prober, observer, None).unwrap();
        assert!(checker.wait_for_round(1, Duration::from_secs(5)));
        script.set("a", Answer::PrimaryAt(1, 0));
        settle(&checker);
        let events = std::mem::take(&mut *recorder.0.lock());
        let split: Vec<_> = events
            .iter()
            .filter(|e| e.change.kind() == "split_brain")
            .collect();
        assert_eq!(split.len(), 1);
        assert_eq!(
            split[0].change,
            Change::SplitBrain {
                fenced: vec!["a".into()],
                writer: Some("b".into())
            }
        );
        assert_eq!(split[0].level, Level::Error);
        assert!(
            split[0].message.contains("timeline 1"),
            "{}",
            split[0].message
        );
        checker.stop(true);
    }

    #[test]
    fn reports_are_counted_per_node() {
        let script = Arc::new(Script::default());
        let checker = start(&ABC, &[], &script);
        checker.report_failure(1);
        checker.report_failure(1);
        settle(&checker);
        assert_eq!(checker.snapshot().reports, [0, 2, 0]);
        checker.stop(true);
    }

    #[test]
    fn replayed_through_is_the_probe_time_less_lag_and_a_second() {
        let epoch = SystemTime::UNIX_EPOCH;
        let standby = NodeHealth {
            health: Health::Up,
            checked_at: Some(epoch + Duration::from_secs(100)),
            latency: Some(Duration::from_secs(1)),
            lag: Some(Duration::from_secs(3)),
            ..NodeHealth::default()
        };
        assert_eq!(replayed_through(&standby, false), 95_000);
        assert_eq!(replayed_through(&standby, true), u64::MAX);
        let unknown_lag = NodeHealth {
            lag: None,
            ..standby.clone()
        };
        assert_eq!(replayed_through(&unknown_lag, false), 0);
        let down = NodeHealth {
            health: Health::Down,
            ..standby
        };
        assert_eq!(replayed_through(&down, false), 0);
    }

    #[test]
    fn readers_exclude_lagging_standbys() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Primary);
        script.set("b", Answer::Standby(0));
        script.set("c", Answer::Standby(60));
        let dbha = [
            ("READS", Value::str("replicas")),
            ("MAX_REPLICA_LAG", Value::Int(10)),
        ];
        let checker = start(&ABC, &dbha, &script);
        assert_eq!(checker.readers(0), 0b010);
        assert_eq!(checker.fastest_reader(0), Some(1));
        script.set("c", Answer::Standby(1));
        settle(&checker);
        assert_eq!(checker.readers(0), 0b110);
        script.set("b", Answer::Refused);
        script.set("c", Answer::Refused);
        settle(&checker);
        assert_eq!(
            checker.readers(0),
            0,
            "no fresh standby: read from the writer"
        );
        assert_eq!(checker.fastest_reader(0), None);
        checker.stop(true);
    }

    #[test]
    fn a_group_without_a_writer_is_probed_every_fast_interval() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Refused);
        script.set("b", Answer::Standby(0));
        let dbha = [
            ("CHECK_INTERVAL", Value::Int(60)),
            ("FAST_INTERVAL", Value::Float(0.05)),
        ];
        let checker = start(&["a", "b"], &dbha, &script);
        assert_eq!(writer(&checker), Route::AllDown(0));
        let before = script.seen("b").0;
        thread::sleep(Duration::from_millis(500));
        let probes = script.seen("b").0 - before;
        // 10 rounds in 0.5 s at 0.05 s (± jitter), against 0 at 60 s.
        assert!((6..=14).contains(&probes), "{probes} probes");
        // A promotion is seen within one fast interval, with no report.
        script.set("b", Answer::Primary);
        let started = Instant::now();
        await_route(
            &checker,
            Route::Healthy(1),
            started + Duration::from_secs(2),
            "not followed",
        );
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        // Healthy again: back to the long interval.
        let quiet = script.seen("b").0;
        thread::sleep(Duration::from_millis(300));
        assert!(script.seen("b").0 - quiet <= 1);
        checker.stop(true);
    }

    #[test]
    fn the_writer_shows_it_takes_new_sessions_when_reported_and_periodically() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Primary);
        script.set("b", Answer::Standby(0));
        let dbha = [
            ("CHECK_INTERVAL", Value::Float(0.05)),
            ("LISTENER_CHECK_INTERVAL", Value::Int(1)),
            ("FALL", Value::Int(2)),
        ];
        let checker = start(&["a", "b"], &dbha, &script);
        thread::sleep(Duration::from_millis(1300));
        let (probes, checks) = script.seen("a");
        assert!(probes >= 15, "{probes}");
        assert_eq!(checks, 1, "once a second, not every round");
        assert_eq!(script.seen("b").1, 0, "only the writer");
        // A stuck postmaster: the kept session answers, new ones hang.
        script.set("a", Answer::NoNewSessions);
        checker.report_failure(0);
        let started = Instant::now();
        while checker.snapshot().nodes[0].is_up() {
            assert!(started.elapsed() < Duration::from_secs(2), "never down");
            thread::sleep(Duration::from_millis(5));
        }
        let snapshot = checker.snapshot();
        let reason = snapshot.nodes[0].last_error.as_ref().unwrap().to_string();
        assert!(
            reason.starts_with("new connections fail (timeout)"),
            "{reason}"
        );
        // The report and the check agree: requests fail at once (once b's
        // answer in flight, if any, is in too).
        await_route(
            &checker,
            Route::Failing(0),
            started + Duration::from_secs(2),
            "not failing fast",
        );
        // No flapping back while new sessions still fail: every probe checks.
        thread::sleep(Duration::from_millis(500));
        assert_eq!(writer(&checker), Route::Failing(0));
        script.set("a", Answer::Primary);
        let started = Instant::now();
        await_route(
            &checker,
            Route::Healthy(0),
            started + Duration::from_secs(2),
            "never back",
        );
        checker.stop(true);
    }

    #[test]
    fn a_promotion_is_seen_while_a_reported_writer_is_being_checked() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::NoNewSessionsHang);
        script.set("b", Answer::Standby(0));
        let dbha = [
            ("CHECK_INTERVAL", Value::Int(60)),
            ("CONNECT_TIMEOUT", Value::Float(1.0)),
        ];
        let checker = start(&["a", "b"], &dbha, &script);
        assert_eq!(writer(&checker), Route::Healthy(0));
        checker.report_failure(0);
        thread::sleep(Duration::from_millis(100));
        // Promoted while a's new-session check waits out its deadline.
        script.set("b", Answer::PrimaryAt(2, 0));
        let promoted = Instant::now();
        while writer(&checker) != Route::Healthy(1) {
            assert!(promoted.elapsed() < Duration::from_secs(3), "not followed");
            thread::sleep(Duration::from_millis(2));
        }
        // Probed every FAST_INTERVAL meanwhile, not after the 1 s check.
        assert!(
            promoted.elapsed() < Duration::from_millis(500),
            "{:?}",
            promoted.elapsed()
        );
        checker.stop(true);
    }

    #[test]
    fn a_failure_the_application_reports_and_probes_confirm_fails_fast() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Primary);
        script.set("b", Answer::Standby(0));
        let dbha = [
            ("CHECK_INTERVAL", Value::Float(0.05)),
            ("CONNECT_TIMEOUT", Value::Float(0.3)),
            ("FALL", Value::Int(1000)),
        ];
        let checker = start(&["a", "b"], &dbha, &script);
        // A report alone (a's probes pass) marks nothing.
        checker.report_failure(0);
        settle(&checker);
        assert_eq!(writer(&checker), Route::Healthy(0));
        script.set("a", Answer::Refused);
        let started = Instant::now();
        while checker.snapshot().nodes[0].failures == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "no failed probe"
            );
            thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(writer(&checker), Route::Healthy(0), "suspect, FALL is 1000");
        // The application's failure report agrees: down now, and fail fast
        // (report_failure waits up to 50 ms for that; a loaded test machine
        // may take longer).
        checker.report_failure(0);
        await_route(
            &checker,
            Route::Failing(0),
            started + Duration::from_secs(2),
            "not confirmed",
        );
        assert!(checker.snapshot().nodes[0].failures < 1000);
        // It answers again: back to normal.
        script.set("a", Answer::Primary);
        await_route(
            &checker,
            Route::Healthy(0),
            started + Duration::from_secs(3),
            "not back",
        );
        checker.stop(true);
    }

    #[test]
    fn a_report_that_the_probe_it_triggers_confirms_fails_fast() {
        // A stuck postmaster: the kept session answers, new connections
        // hang. The application's connect timed out (its report), and the
        // probe that report asks for times out on a fresh connection too.
        let script = Arc::new(Script::default());
        script.set("a", Answer::Primary);
        script.set("b", Answer::Standby(0));
        let dbha = [
            ("CHECK_INTERVAL", Value::Float(0.05)),
            ("CONNECT_TIMEOUT", Value::Float(0.3)),
            ("FALL", Value::Int(1000)),
            ("LISTENER_CHECK_INTERVAL", Value::Int(0)),
        ];
        let checker = start(&["a", "b"], &dbha, &script);
        script.set("a", Answer::NoNewSessionsHang);
        settle(&checker);
        assert_eq!(
            writer(&checker),
            Route::Healthy(0),
            "nothing asks for a new session"
        );
        let started = Instant::now();
        checker.report_failure(0);
        await_route(
            &checker,
            Route::Failing(0),
            started + Duration::from_secs(3),
            "not confirmed",
        );
        // One check, not FALL = 1000 of them.
        assert_eq!(checker.snapshot().nodes[0].failures, 1);
        assert!(!checker.snapshot().nodes[0].is_up());
        checker.stop(true);
    }

    #[test]
    fn a_fresh_connection_lost_on_the_way_does_not_confirm_a_report() {
        // A lossy link: the application's connect and dbha's fresh one may
        // both time out, while the kept session answers. One loss, twice
        // seen: FALL decides, not the report.
        let script = Arc::new(Script::default());
        script.set("a", Answer::Primary);
        script.set("b", Answer::Standby(0));
        let dbha = [
            ("CHECK_INTERVAL", Value::Float(0.05)),
            ("FALL", Value::Int(1000)),
            ("LISTENER_CHECK_INTERVAL", Value::Int(0)),
        ];
        let checker = start(&["a", "b"], &dbha, &script);
        script.set("a", Answer::NoNewSessionsUnreachable);
        for _ in 0..3 {
            checker.report_failure(0);
        }
        settle(&checker);
        let node = &checker.snapshot().nodes[0];
        assert!(node.is_up(), "{node:?}");
        assert!(node.failures >= 1, "the checks failed");
        assert_eq!(writer(&checker), Route::Healthy(0));
        checker.stop(true);
    }

    #[test]
    fn a_report_on_a_link_losing_everything_waits_for_fall_then_fails_fast() {
        // A partition: every probe is lost on the way. The reports do not
        // take the writer down before FALL; once FALL has, requests to it
        // fail at once instead of waiting out a connect timeout.
        let script = Arc::new(Script::default());
        script.set("a", Answer::Primary);
        script.set("b", Answer::Standby(0));
        let dbha = [
            ("CHECK_INTERVAL", Value::Float(0.05)),
            ("FALL", Value::Int(3)),
            ("LISTENER_CHECK_INTERVAL", Value::Int(0)),
        ];
        let checker = start(&["a", "b"], &dbha, &script);
        settle(&checker);
        script.set("a", Answer::Unreachable);
        checker.report_failure(0);
        let node = &checker.snapshot().nodes[0];
        if node.failures < 3 {
            assert!(node.is_up(), "down before FALL: {node:?}");
        }
        let by = Instant::now() + Duration::from_secs(5);
        await_route(
            &checker,
            Route::Failing(0),
            by,
            "down by FALL, failing fast",
        );
        checker.stop(true);
    }

    #[test]
    fn with_the_periodic_check_off_only_reports_check_new_sessions() {
        let script = Arc::new(Script::default());
        let dbha = [
            ("CHECK_INTERVAL", Value::Float(0.05)),
            ("LISTENER_CHECK_INTERVAL", Value::Int(0)),
        ];
        let checker = start(&["a"], &dbha, &script);
        thread::sleep(Duration::from_millis(300));
        assert_eq!(script.seen("a").1, 0);
        checker.report_failure(0);
        thread::sleep(Duration::from_millis(150));
        assert_eq!(script.seen("a").1, 1);
        checker.stop(true);
    }

    /// Watches one end of a socket pair: the test closes the other end, as
    /// a server ends a session.
    struct Watched {
        socket: Mutex<Option<std::os::unix::net::UnixStream>>,
        reconnect: Answer,
        script: Arc<Script>,
    }

    /// Node "a" watches the socket; the others only answer probes.
    struct WatchedNode(Arc<Watched>, String);

    impl Prober for Arc<Watched> {
        fn for_node(&self, node: &Node) -> Box<dyn NodeProber> {
            Box::new(WatchedNode(Arc::clone(self), node.alias.clone()))
        }
    }

    impl NodeProber for WatchedNode {
        fn probe(&mut self, timeout: Duration, check: bool) -> Result<Observation, Failure> {
            Scripted {
                alias: self.1.clone(),
                script: Arc::clone(&self.0.script),
            }
            .probe(timeout, check)
        }

        fn watched_socket(&self) -> Option<RawFd> {
            use std::os::fd::AsRawFd;
            let socket = self.0.socket.lock();
            socket
                .as_ref()
                .filter(|_| self.1 == "a")
                .map(AsRawFd::as_raw_fd)
        }

        fn on_readable(&mut self, _: Duration) -> Option<Result<Observation, Failure>> {
            self.0.socket.lock().take();
            Some(match self.0.reconnect {
                Answer::Refused => Err(Failure::Refused),
                _ => Ok(Observation::default()),
            })
        }
    }

    #[test]
    fn a_session_the_server_ends_is_noticed_at_once() {
        for (reconnect, down) in [(Answer::Refused, true), (Answer::Up, false)] {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let watched = Arc::new(Watched {
                socket: Mutex::new(Some(ours)),
                reconnect,
                script: Arc::new(Script::default()),
            });
            let dbha = [("CHECK_INTERVAL", Value::Int(60)), ("FALL", Value::Int(3))];
            let prober: Arc<dyn Prober> = Arc::new(Arc::clone(&watched));
            let checker = Checker::start(
                config(&["a", "b"], &dbha),
                prober,
                Arc::new(LogObserver),
                None,
            )
            .unwrap();
            assert!(checker.wait_for_round(1, Duration::from_secs(5)));
            assert_eq!(writer(&checker), Route::Healthy(0));
            let closed = Instant::now();
            drop(theirs);
            if down {
                // Confirmed by a fresh connection: down at once, not after FALL rounds.
                while writer(&checker) != Route::Healthy(1) {
                    assert!(closed.elapsed() < Duration::from_secs(2), "not noticed");
                    thread::sleep(Duration::from_millis(2));
                }
                assert!(closed.elapsed() < Duration::from_millis(200));
                assert_eq!(checker.snapshot().nodes[0].failures, 1);
            } else {
                // A terminated backend whose server takes a new session: no false down.
                thread::sleep(Duration::from_millis(200));
                assert_eq!(writer(&checker), Route::Healthy(0));
                assert!(checker.snapshot().nodes[0].successes >= 2);
            }
            checker.stop(true);
        }
    }

    #[test]
    fn readers_are_dropped_when_their_lag_bound_runs_out_between_probes() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Primary);
        script.set("b", Answer::Standby(0));
        script.set("c", Answer::StandbyAt(1, 0));
        let dbha = [
            ("READS", Value::str("replicas")),
            ("MAX_REPLICA_LAG", Value::Float(1.3)),
            ("CHECK_INTERVAL", Value::Int(60)),
        ];
        let checker = start(&ABC, &dbha, &script);
        assert_eq!(checker.readers(0), 0b110);
        let probed = Instant::now();
        // No probe for 60 s: c (1 s behind) may pass 1.3 s after 0.3 s.
        while checker.readers(0) != 0b010 {
            assert!(probed.elapsed() < Duration::from_secs(1), "never dropped");
            thread::sleep(Duration::from_millis(2));
        }
        let dropped = probed.elapsed();
        assert!(dropped < Duration::from_millis(300), "{dropped:?}");
        checker.stop(true);
    }

    #[test]
    fn standbys_catch_up_with_the_writer_probes_they_replayed() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::PrimaryAt(1, 500));
        script.set("b", Answer::StandbyAt(0, 500));
        script.set("c", Answer::StandbyAt(0, 400));
        let dbha = [
            ("READS", Value::str("replicas")),
            ("CHECK_INTERVAL", Value::Int(60)),
        ];
        let checker = start(&ABC, &dbha, &script);
        settle(&checker);
        let sent = checker.writer_probes(0);
        assert!(sent >= 1, "the first round had no writer yet");
        assert_eq!(checker.caught_up(1), sent, "b has all the writer had");
        assert_eq!(checker.caught_up(2), 0, "c is behind every writer probe");
        assert_eq!(checker.least_caught_up(0), 0);
        script.set("c", Answer::StandbyAt(0, 500));
        settle(&checker);
        assert_eq!(checker.caught_up(2), checker.writer_probes(0));
        checker.stop(true);
    }

    #[test]
    fn rounds_open_when_the_scheduler_panicked_still_complete() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Hang);
        let dbha = [
            ("CONNECT_TIMEOUT", Value::Float(0.5)),
            ("CHECK_INTERVAL", Value::Int(60)),
        ];
        let checker = start(&ABC, &dbha, &script);
        let ticket = checker.request_round(None);
        thread::sleep(Duration::from_millis(50));
        {
            let mut control = checker.shared.control.lock();
            control.panic_now = true;
            control.wake();
        }
        assert!(
            checker.wait_for_round(ticket, Duration::from_secs(3)),
            "orphaned"
        );
        for _ in 0..5 {
            settle(&checker);
        }
        assert!(checker.shared.control.lock().completed.len() <= 2);
        checker.stop(true);
    }

    #[test]
    fn stop_joins_promptly() {
        let script = Arc::new(Script::default());
        let checker = start(&ABC, &[("CHECK_INTERVAL", Value::Int(60))], &script);
        let started = Instant::now();
        checker.stop(true);
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn stop_does_not_wait_for_hung_probes() {
        let script = Arc::new(Script::default());
        script.set("a", Answer::Hang);
        let dbha = [("CONNECT_TIMEOUT", Value::Int(5))];
        let prober: Arc<dyn Prober> = Arc::new(Arc::clone(&script));
        let checker =
            Checker::start(config(&ABC, &dbha), prober, Arc::new(LogObserver), None).unwrap();
        thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        checker.stop(true);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
}

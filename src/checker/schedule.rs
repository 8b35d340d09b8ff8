//! The background health checker: one scheduler thread per process and one
//! probe thread per node, publishing an immutable [`Snapshot`] after every
//! round for lock-free readers.
//!
//! Probes run in parallel, so a round with any number of dead or hung nodes
//! costs one deadline, and every answer takes effect as it arrives: a new
//! round (a failure report, `check_now`) starts at once even while a hung
//! node's probe is still waiting out its deadline. A probe stuck past its
//! deadline (only name resolution can do that) counts as a timeout, and its
//! node is not probed again until it returns.

use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, Guard};
use log::{error, info, warn};
use parking_lot::{Condvar, Mutex};

use super::config::{Config, Node, OnAllDown};
use super::node::NodeProbe;
use super::select::{choose_readers, choose_writer, fastest_reader};
use super::state::{Health, NodeHealth, ProbeOutcome};
use crate::engines::Observation;
use crate::net::Failure;

/// How long past the probe deadline the scheduler waits for a probe thread.
const GRACE: Duration = Duration::from_millis(50);
/// Least time between two rounds of a group triggered by failure reports, so
/// that a burst of failing requests costs a few probes, not one each.
const REPORT_GAP: Duration = Duration::from_millis(50);
/// Pause before restarting a scheduler that panicked.
const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// How nodes are probed: over the network in production, scripted in tests.
pub trait Prober: Send + Sync + 'static {
    /// The prober of one node, owned by its probe thread: it may keep a
    /// connection open from one round to the next.
    fn for_node(&self, node: &Node) -> Box<dyn NodeProber>;
}

pub trait NodeProber: Send {
    fn probe(&mut self, timeout: Duration) -> Result<Observation, Failure>;
}

pub struct NetworkProber;

impl Prober for NetworkProber {
    fn for_node(&self, node: &Node) -> Box<dyn NodeProber> {
        Box::new(NodeProbe::new(node))
    }
}

impl NodeProber for NodeProbe {
    fn probe(&mut self, timeout: Duration) -> Result<Observation, Failure> {
        NodeProbe::probe(self, timeout, false)
    }
}

/// Everything known after a round; never mutated once published.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Completed rounds; 0 means nothing is known yet.
    pub rounds: u64,
    pub nodes: Vec<NodeHealth>,
    /// Per group: the healthy writer, if any.
    pub writers: Vec<Option<usize>>,
    /// Per group: the most recent writer, kept while all nodes are down.
    pub last_writers: Vec<Option<usize>>,
    /// Per node: a primary kept out of writes because another primary of its
    /// group has them (split brain), until it reports standby.
    pub fenced: Vec<bool>,
    /// Per group: the nodes reads may go to, as a mask relative to the
    /// group's first node (see `select::choose_readers`); 0 = the writer.
    pub readers: Vec<u64>,
}

/// Where a group's writes should go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Healthy(usize),
    /// No node is up: the last writer, or the first member if none ever was.
    AllDown(usize),
}

impl Route {
    /// One word, so that the hot path reads a route with one atomic load.
    fn pack(self) -> usize {
        match self {
            Self::Healthy(node) => node << 1 | 1,
            Self::AllDown(node) => node << 1,
        }
    }

    fn unpack(word: usize) -> Self {
        if word & 1 == 1 {
            Self::Healthy(word >> 1)
        } else {
            Self::AllDown(word >> 1)
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
            readers: vec![0; config.groups.len()],
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
                    " (fenced: split brain)"
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
            None => Route::AllDown(
                self.last_writers[group].unwrap_or(config.groups[group].members.start),
            ),
        }
    }
}

struct Control {
    stop: bool,
    /// Per group: the earliest time a requested extra round may start.
    requested: Vec<Option<Instant>>,
    /// Per group: when its last round started (for `REPORT_GAP`).
    last_started: Vec<Option<Instant>>,
    /// The last round started (rounds are numbered from 1).
    started: u64,
    /// Every round below this one has completed ...
    completed_below: u64,
    /// ... and so have these (rounds complete out of order).
    completed: BTreeSet<u64>,
    /// The running scheduler's event queue, to wake it.
    waker: Option<Sender<Event>>,
}

impl Control {
    fn new(groups: usize) -> Self {
        Self {
            stop: false,
            requested: vec![None; groups],
            last_started: vec![None; groups],
            started: 0,
            completed_below: 1,
            completed: BTreeSet::new(),
            waker: None,
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

    fn wake(&self) {
        if let Some(waker) = &self.waker {
            let _ = waker.send(Event::Wake);
        }
    }
}

struct Shared {
    config: Arc<Config>,
    prober: Arc<dyn Prober>,
    snapshot: ArcSwap<Snapshot>,
    /// Per group, the snapshot's [`Route`], packed: what the hot path reads.
    routes: Box<[AtomicUsize]>,
    /// Per group, the snapshot's reader mask.
    readers: Box<[AtomicU64]>,
    /// Per group, the reader with the lowest latency (`usize::MAX`: none).
    fastest: Box<[AtomicUsize]>,
    control: Mutex<Control>,
    /// Wakes the supervisor pausing before a restart (on stop).
    wake: Condvar,
    /// Wakes callers waiting for a round to complete.
    round_done: Condvar,
}

pub struct Checker {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Checker {
    /// Starts the checker thread. `seed` carries what an earlier checker
    /// knew (e.g. the parent's state after a fork) so that sticky writers
    /// survive; without it the first round decides.
    pub fn start(
        config: Arc<Config>,
        prober: Arc<dyn Prober>,
        seed: Option<&Snapshot>,
    ) -> std::io::Result<Self> {
        let groups = config.groups.len();
        let snapshot = match seed {
            Some(seed)
                if seed.nodes.len() == config.nodes.len() && seed.writers.len() == groups =>
            {
                Snapshot {
                    rounds: 0,
                    ..seed.clone()
                }
            }
            _ => Snapshot::unknown(&config),
        };
        let routes = (0..groups)
            .map(|g| AtomicUsize::new(snapshot.route(&config, g).pack()))
            .collect();
        let readers = snapshot
            .readers
            .iter()
            .map(|&mask| AtomicU64::new(mask))
            .collect();
        let fastest = (0..groups).map(|_| AtomicUsize::new(usize::MAX)).collect();
        let shared = Arc::new(Shared {
            config,
            prober,
            snapshot: ArcSwap::from_pointee(snapshot),
            routes,
            readers,
            fastest,
            control: Mutex::new(Control::new(groups)),
            wake: Condvar::new(),
            round_done: Condvar::new(),
        });
        let supervisor = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("dbha-checker".into())
            .spawn(move || supervise(&supervisor))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
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
    /// its group soon (not marking it down on one report).
    pub fn report_failure(&self, node: usize) {
        let group = self.shared.config.nodes[node].group;
        let mut control = self.shared.control.lock();
        let earliest = control.last_started[group].map_or_else(Instant::now, |at| at + REPORT_GAP);
        let requested = &mut control.requested[group];
        *requested = Some(requested.map_or(earliest, |r| r.min(earliest)));
        control.wake();
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
        drop(control);
        self.shared.wake.notify_all();
        if join {
            if let Some(thread) = self.thread.lock().take() {
                let _ = thread.join();
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
enum Event {
    /// A probe thread's answer.
    Answer { node: usize, outcome: ProbeOutcome },
    /// A request or a stop (see `Control`).
    Wake,
}

/// One long-lived thread per node, so a probe stuck in name resolution ties
/// up only its own node.
struct ProbeThread {
    requests: Sender<()>,
    /// A probe is in flight.
    busy: bool,
    /// Its round gave up on it (recorded a timeout): drop its answer.
    abandoned: bool,
}

/// A round waiting for answers.
struct OpenRound {
    id: u64,
    deadline: Instant,
    /// Nodes whose answer it still waits for.
    waiting: Vec<usize>,
}

struct Scheduler {
    shared: Arc<Shared>,
    state: Snapshot,
    probe_threads: Vec<Option<ProbeThread>>,
    events: Receiver<Event>,
    events_sender: Sender<Event>,
    open: Vec<OpenRound>,
    next_periodic: Instant,
    /// Per group: a writer was chosen at least once (so "no writer" at the
    /// start is reported too).
    decided: Vec<bool>,
}

impl Scheduler {
    fn new(shared: Arc<Shared>) -> Self {
        let state = Snapshot::clone(&shared.snapshot.load());
        let (events_sender, events) = mpsc::channel();
        shared.control.lock().waker = Some(events_sender.clone());
        let probe_threads = shared.config.nodes.iter().map(|_| None).collect();
        let decided = vec![false; shared.config.groups.len()];
        Self {
            shared,
            state,
            probe_threads,
            events,
            events_sender,
            open: Vec::new(),
            next_periodic: Instant::now(),
            decided,
        }
    }

    fn run(mut self) {
        while !self.shared.control.lock().stop {
            if let Some((round, groups)) = self.due_round() {
                self.start_round(round, &groups);
            }
            self.expire_rounds();
            let wake_at = self.next_wake();
            match self
                .events
                .recv_timeout(wake_at.saturating_duration_since(Instant::now()))
            {
                Ok(Event::Answer { node, outcome }) => self.on_answer(node, outcome),
                Ok(Event::Wake) | Err(RecvTimeoutError::Timeout) => {}
                // Impossible: we hold a sender.
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// The round due now, if any: its number and which groups it probes.
    fn due_round(&mut self) -> Option<(u64, Vec<bool>)> {
        let mut control = self.shared.control.lock();
        let now = Instant::now();
        let periodic = now >= self.next_periodic;
        let groups: Vec<bool> = control
            .requested
            .iter()
            .map(|r| periodic || r.is_some_and(|at| at <= now))
            .collect();
        if !groups.contains(&true) {
            return None;
        }
        control.started += 1;
        for (g, &due) in groups.iter().enumerate() {
            if due {
                control.requested[g] = None;
                control.last_started[g] = Some(now);
            }
        }
        if periodic {
            self.next_periodic = now + self.jittered_interval();
        }
        Some((control.started, groups))
    }

    /// The next periodic round, requested round or round deadline.
    fn next_wake(&self) -> Instant {
        let control = self.shared.control.lock();
        let requested = control.requested.iter().flatten().copied();
        let deadlines = self.open.iter().map(|round| round.deadline);
        requested
            .chain(deadlines)
            .fold(self.next_periodic, Instant::min)
    }

    fn jittered_interval(&self) -> Duration {
        let timing = &self.shared.config.timing;
        let spread = timing.jitter * (2.0 * fastrand::f64() - 1.0);
        timing.check_interval.mul_f64(1.0 + spread)
    }

    /// Probes the nodes of `groups`. A node whose probe is still in flight
    /// is not probed twice: the round waits for that answer.
    fn start_round(&mut self, id: u64, groups: &[bool]) {
        let config = Arc::clone(&self.shared.config);
        let mut waiting = Vec::new();
        for (index, node) in config.nodes.iter().enumerate() {
            if !groups[node.group] {
                continue;
            }
            match self.dispatch(index) {
                Ok(()) => waiting.push(index),
                Err(failure) => self.record(
                    index,
                    ProbeOutcome {
                        result: Err(failure),
                        latency: Duration::ZERO,
                    },
                ),
            }
        }
        let deadline = Instant::now() + config.timing.connect_timeout + GRACE;
        self.open.push(OpenRound {
            id,
            deadline,
            waiting,
        });
        self.settle();
    }

    fn on_answer(&mut self, node: usize, outcome: ProbeOutcome) {
        if let Some(Some(thread)) = self.probe_threads.get_mut(node) {
            thread.busy = false;
            if std::mem::take(&mut thread.abandoned) {
                return;
            }
        }
        self.record(node, outcome);
        self.settle();
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
        for node in expired {
            if let Some(Some(thread)) = self.probe_threads.get_mut(node) {
                if !thread.busy || thread.abandoned {
                    continue; // already recorded
                }
                thread.abandoned = true;
            }
            self.record(
                node,
                ProbeOutcome {
                    result: Err(Failure::Timeout),
                    latency: timeout,
                },
            );
        }
        for round in &mut self.open {
            if round.deadline <= now {
                round.waiting.clear();
            }
        }
        self.settle();
    }

    /// Records one outcome in the state machine; the rounds waiting for it
    /// stop waiting.
    fn record(&mut self, index: usize, outcome: ProbeOutcome) {
        let config = &self.shared.config;
        let timing = config.timing;
        let health = &mut self.state.nodes[index];
        if let Some(change) = health.record(outcome, timing.rise, timing.fall, SystemTime::now()) {
            log_change(&config.nodes[index], health, change);
        }
        for round in &mut self.open {
            round.waiting.retain(|&n| n != index);
        }
    }

    /// Chooses writers and readers from what is known now, publishes, and
    /// completes the rounds that have all their answers.
    fn settle(&mut self) {
        let config = Arc::clone(&self.shared.config);
        for (g, group) in config.groups.iter().enumerate() {
            let members = group.members.clone();
            if members.clone().any(|i| self.undecided(i)) {
                continue;
            }
            self.select_writer(g, members.clone());
            self.decided[g] = true;
            self.state.readers[g] = choose_readers(
                members,
                &self.state.nodes,
                self.state.writers[g],
                &config.reads,
            );
        }
        let done: Vec<u64> = self
            .open
            .iter()
            .filter(|round| round.waiting.is_empty())
            .map(|round| round.id)
            .collect();
        self.open.retain(|round| !round.waiting.is_empty());
        self.state.rounds += done.len() as u64;
        self.publish();
        if !done.is_empty() {
            let mut control = self.shared.control.lock();
            for id in done {
                control.complete(id);
            }
            self.shared.round_done.notify_all();
        }
    }

    /// Whether the group's choice should wait for this node: it never
    /// answered yet, or it looked healthy and its answer is on its way (a
    /// node already failing is not waited for: its answer is likely a
    /// timeout, and a promotion must not wait for that).
    fn undecided(&self, node: usize) -> bool {
        let health = &self.state.nodes[node];
        let in_flight = matches!(
            &self.probe_threads[node],
            Some(ProbeThread {
                busy: true,
                abandoned: false,
                ..
            })
        );
        health.health == Health::Unknown || (in_flight && health.is_up() && !health.is_suspect())
    }

    fn publish(&self) {
        let config = &self.shared.config;
        self.shared.snapshot.store(Arc::new(self.state.clone()));
        for (g, group) in config.groups.iter().enumerate() {
            let readers = self.state.readers[g];
            let fastest = fastest_reader(group.members.clone(), &self.state.nodes, readers);
            self.shared.routes[g].store(self.state.route(config, g).pack(), Ordering::Release);
            self.shared.readers[g].store(readers, Ordering::Release);
            self.shared.fastest[g].store(fastest.unwrap_or(usize::MAX), Ordering::Release);
        }
    }

    fn select_writer(&mut self, group: usize, members: std::ops::Range<usize>) {
        let config = &self.shared.config;
        let before = self.state.writers[group];
        let fenced_before = self.state.fenced.clone();
        let after = choose_writer(
            members.clone(),
            &self.state.nodes,
            &mut self.state.fenced,
            before,
            config.failback,
        );
        for i in members {
            let alias = &config.nodes[i].alias;
            match (fenced_before[i], self.state.fenced[i]) {
                (false, true) => error!(
                    "group '{}': split brain: {alias} reports primary while {} takes the \
                     writes; writes stay on {}, and {alias} gets none until it is \
                     rewound or rejoined as a standby",
                    config.groups[group].name,
                    after.map_or("?", |w| config.nodes[w].alias.as_str()),
                    after.map_or("?", |w| config.nodes[w].alias.as_str()),
                ),
                (true, false) => info!("{alias} reports standby: no longer fenced"),
                _ => {}
            }
        }
        // The first choice reports even "no writer", so a process that
        // starts with every database down says so.
        if after == before && (after.is_some() || self.decided[group]) {
            return;
        }
        self.state.writers[group] = after;
        let name = &config.groups[group].name;
        let Some(new) = after else {
            let policy = match config.on_all_down {
                OnAllDown::Last => "routing to the last writer",
                OnAllDown::Raise => "raising NoHealthyDatabase",
            };
            let members = self.state.describe_group(config, group);
            error!("group '{name}': no writer ({members}); {policy}");
            return;
        };
        let alias = &config.nodes[new].alias;
        match before.or(self.state.last_writers[group]) {
            Some(old) if old != new => {
                let old = &config.nodes[old].alias;
                warn!("group '{name}': writes move from {old} to {alias}");
            }
            Some(_) => info!("group '{name}': writes resume on {alias}"),
            None => info!("group '{name}': writes go to {alias}"),
        }
        self.state.last_writers[group] = Some(new);
    }

    /// Hands a probe of `node` to its thread, starting the thread if
    /// needed. A node whose probe is in flight is left to answer that one.
    fn dispatch(&mut self, node: usize) -> Result<(), Failure> {
        if let Some(thread) = &self.probe_threads[node] {
            if thread.busy {
                return if thread.abandoned {
                    // Stuck past a deadline already: another timeout.
                    Err(Failure::Timeout)
                } else {
                    Ok(())
                };
            }
        }
        let sent = match &self.probe_threads[node] {
            Some(thread) => thread.requests.send(()).is_ok(),
            None => false,
        };
        if !sent {
            let thread = self
                .spawn_probe_thread(node)
                .map_err(|e| Failure::Internal(format!("cannot start a probe thread: {e}")))?;
            if thread.requests.send(()).is_err() {
                return Err(Failure::Internal("probe thread exited".into()));
            }
            self.probe_threads[node] = Some(thread);
        }
        if let Some(thread) = &mut self.probe_threads[node] {
            thread.busy = true;
        }
        Ok(())
    }

    fn spawn_probe_thread(&self, index: usize) -> std::io::Result<ProbeThread> {
        let (requests, inbox) = mpsc::channel::<()>();
        let events = self.events_sender.clone();
        let shared = Arc::clone(&self.shared);
        thread::Builder::new()
            .name("dbha-probe".into())
            .spawn(move || {
                let node = &shared.config.nodes[index];
                let timeout = shared.config.timing.connect_timeout;
                let mut prober = shared.prober.for_node(node);
                // Ends when the scheduler drops its sender.
                while inbox.recv().is_ok() {
                    let started = Instant::now();
                    let result = panic::catch_unwind(AssertUnwindSafe(|| prober.probe(timeout)))
                        .unwrap_or_else(|panic| {
                            // Whatever it held (a connection) is suspect now.
                            prober = shared.prober.for_node(node);
                            Err(Failure::Internal(format!(
                                "probe panicked: {}",
                                panic_message(&*panic)
                            )))
                        });
                    let outcome = ProbeOutcome {
                        result,
                        latency: started.elapsed(),
                    };
                    let answer = Event::Answer {
                        node: index,
                        outcome,
                    };
                    if events.send(answer).is_err() {
                        return;
                    }
                }
            })?;
        Ok(ProbeThread {
            requests,
            busy: false,
            abandoned: false,
        })
    }
}

fn log_change(node: &Node, health: &NodeHealth, change: Health) {
    let latency = health.latency.unwrap_or_default().as_secs_f64() * 1000.0;
    match (change, &health.last_error) {
        (Health::Down, Some(failure)) => {
            warn!(
                "{} ({}) is down: {failure}",
                node.alias, node.server.endpoint
            );
        }
        _ => info!(
            "{} ({}) is {} ({latency:.1} ms)",
            node.alias,
            node.server.endpoint,
            change.as_str()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::value::Value;
    use crate::engines::Role;
    use parking_lot::RwLock;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// What each alias answers, changeable while the checker runs.
    #[derive(Default)]
    struct Script {
        answers: RwLock<HashMap<String, Answer>>,
        probes: AtomicUsize,
    }

    #[derive(Clone, Copy)]
    enum Answer {
        Up,
        Primary,
        Standby(u64),
        Refused,
        Hang,
        Panic,
    }

    impl Script {
        fn set(&self, alias: &str, answer: Answer) {
            self.answers.write().insert(alias.to_owned(), answer);
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
        fn probe(&mut self, timeout: Duration) -> Result<Observation, Failure> {
            self.script.probes.fetch_add(1, Ordering::SeqCst);
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
                Answer::Primary => Ok(role(Role::Primary, None)),
                Answer::Standby(lag) => Ok(role(Role::Standby, Some(Duration::from_secs(lag)))),
                Answer::Refused => Err(Failure::Refused),
                Answer::Hang => {
                    thread::sleep(timeout);
                    Err(Failure::Timeout)
                }
                Answer::Panic => panic!("scripted panic"),
            }
        }
    }

    fn config(aliases: &[&str], dbha: &[(&str, Value)]) -> Arc<Config> {
        let pg = Value::Map(vec![(
            "ENGINE".into(),
            Value::str("django.db.backends.postgresql"),
        )]);
        let databases = Value::Map(
            aliases
                .iter()
                .map(|a| ((*a).to_owned(), pg.clone()))
                .collect(),
        );
        let mut settings = vec![
            ("CHECK_INTERVAL".to_owned(), Value::Float(0.05)),
            ("CONNECT_TIMEOUT".to_owned(), Value::Float(0.2)),
            ("RISE".to_owned(), Value::Int(1)),
            ("FALL".to_owned(), Value::Int(1)),
        ];
        for (key, value) in dbha {
            settings.retain(|(k, _)| k != key);
            settings.push(((*key).to_owned(), value.clone()));
        }
        Arc::new(Config::from_settings(&databases, &Value::Map(settings)).unwrap())
    }

    fn writer(checker: &Checker) -> Route {
        let route = checker.route(0);
        assert_eq!(route, checker.snapshot().route(checker.config(), 0));
        route
    }

    /// Runs a fresh round and returns the route after it.
    fn settle(checker: &Checker) -> Route {
        let ticket = checker.request_round(None);
        assert!(checker.wait_for_round(ticket, Duration::from_secs(5)));
        writer(checker)
    }

    fn start(aliases: &[&str], dbha: &[(&str, Value)], script: &Arc<Script>) -> Checker {
        let prober: Arc<dyn Prober> = Arc::new(Arc::clone(script));
        let checker = Checker::start(config(aliases, dbha), prober, None).unwrap();
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
            fn probe(&mut self, _: Duration) -> Result<Observation, Failure> {
                if self.0 {
                    // Like getaddrinfo() on a dead resolver: ignores the deadline.
                    thread::sleep(Duration::from_secs(2));
                }
                Ok(Observation::default())
            }
        }
        let checker = Checker::start(config(&["a", "b"], &[]), Arc::new(Stuck), None).unwrap();
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
        // A group index past the end makes the scheduler itself panic.
        checker
            .shared
            .control
            .lock()
            .requested
            .push(Some(Instant::now()));
        checker.shared.wake.notify_one();
        thread::sleep(Duration::from_millis(200));
        checker.shared.control.lock().requested.pop();
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
        for _ in 0..100 {
            checker.report_failure(0);
        }
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
        let pg = Value::Map(vec![(
            "ENGINE".into(),
            Value::str("django.db.backends.postgresql"),
        )]);
        let databases = Value::Map(
            ["a", "b", "r"]
                .iter()
                .map(|a| ((*a).to_owned(), pg.clone()))
                .collect(),
        );
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
        let checker = Checker::start(config, prober, None).unwrap();
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
        let checker = Checker::start(config, prober, Some(&seed)).unwrap();
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
        checker.report_failure(0);
        while writer(&checker) != Route::Healthy(1) {
            assert!(started.elapsed() < Duration::from_secs(2), "no switch");
            thread::sleep(Duration::from_millis(1));
        }
        // Well within the hung probe's 0.5 s deadline.
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        checker.stop(true);
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
        let checker = Checker::start(config(&ABC, &dbha), prober, None).unwrap();
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

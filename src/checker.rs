//! The background health checker: one scheduler thread per process and one
//! probe thread per node, publishing an immutable [`Snapshot`] after every
//! round for lock-free readers.
//!
//! Probes run in parallel, so a round with any number of dead or hung nodes
//! costs one deadline. A probe stuck past its deadline (only name resolution
//! can do that) is counted as a timeout and its node is skipped until it
//! returns, so the schedule never waits on it.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, Guard};
use log::{error, info, warn};
use parking_lot::{Condvar, Mutex};

use crate::config::{Config, Node, OnAllDown};
use crate::probe::{Failure, NodeProbe, Observation};
use crate::select::{choose_readers, choose_writer, fastest_reader};
use crate::state::{Health, NodeHealth, ProbeOutcome};

/// How long past the probe deadline the scheduler waits for a probe thread.
const GRACE: Duration = Duration::from_millis(50);
/// Least time between two rounds of a group triggered by failure reports, so
/// that a burst of failing requests costs a few probes, not one each.
const REPORT_GAP: Duration = Duration::from_millis(50);
/// How often a round waiting on slow probes checks whether to stop.
const STOP_POLL: Duration = Duration::from_millis(50);
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
        Box::new(NodeProbe::new(node.clone()))
    }
}

impl NodeProber for NodeProbe {
    fn probe(&mut self, timeout: Duration) -> Result<Observation, Failure> {
        NodeProbe::probe(self, timeout)
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
                    node.endpoint,
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

#[derive(Default)]
struct Control {
    stop: bool,
    /// Per group: the earliest time a requested extra round may start.
    requested: Vec<Option<Instant>>,
    /// Per group: when its last round started (for `REPORT_GAP`).
    last_started: Vec<Option<Instant>>,
    started: u64,
    completed: u64,
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
    /// Wakes the scheduler: a request or stop.
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
            control: Mutex::new(Control {
                requested: vec![None; groups],
                last_started: vec![None; groups],
                ..Control::default()
            }),
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
        self.shared.wake.notify_one();
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
        self.shared.wake.notify_one();
    }

    /// Waits up to `timeout` until the round with `ticket` has completed.
    pub fn wait_for_round(&self, ticket: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut control = self.shared.control.lock();
        while control.completed < ticket {
            if self
                .shared
                .round_done
                .wait_until(&mut control, deadline)
                .timed_out()
            {
                return control.completed >= ticket;
            }
        }
        true
    }

    /// Stops the checker; with `join`, waits for its thread (a few tens of
    /// milliseconds: probe threads still running finish on their own).
    pub fn stop(&self, join: bool) {
        self.shared.control.lock().stop = true;
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

/// A probe thread's answer.
struct ProbeResult {
    node: usize,
    round: u64,
    outcome: ProbeOutcome,
}

/// One long-lived thread per node, so a probe stuck in name resolution ties
/// up only its own node.
struct ProbeThread {
    requests: Sender<u64>,
    busy: bool,
}

struct Scheduler {
    shared: Arc<Shared>,
    state: Snapshot,
    probe_threads: Vec<Option<ProbeThread>>,
    results: Receiver<ProbeResult>,
    results_sender: Sender<ProbeResult>,
}

impl Scheduler {
    fn new(shared: Arc<Shared>) -> Self {
        let state = Snapshot::clone(&shared.snapshot.load());
        let (results_sender, results) = mpsc::channel();
        let probe_threads = shared.config.nodes.iter().map(|_| None).collect();
        Self {
            shared,
            state,
            probe_threads,
            results,
            results_sender,
        }
    }

    fn run(mut self) {
        let mut next_periodic = Instant::now();
        while let Some((round, groups, periodic)) = self.next_round(next_periodic) {
            let started = Instant::now();
            self.run_round(round, &groups);
            if periodic {
                next_periodic = started + self.jittered_interval();
            }
        }
    }

    /// Waits for the next round to be due; `None` when asked to stop.
    /// Returns the round number, which groups to probe and whether it is the
    /// periodic round.
    fn next_round(&self, next_periodic: Instant) -> Option<(u64, Vec<bool>, bool)> {
        let mut control = self.shared.control.lock();
        loop {
            if control.stop {
                return None;
            }
            let now = Instant::now();
            let periodic = now >= next_periodic;
            let groups: Vec<bool> = control
                .requested
                .iter()
                .map(|r| periodic || r.is_some_and(|at| at <= now))
                .collect();
            if groups.contains(&true) {
                control.started += 1;
                for (g, &due) in groups.iter().enumerate() {
                    if due {
                        control.requested[g] = None;
                        control.last_started[g] = Some(now);
                    }
                }
                return Some((control.started, groups, periodic));
            }
            let wake_at = control
                .requested
                .iter()
                .flatten()
                .copied()
                .fold(next_periodic, Instant::min);
            self.shared.wake.wait_until(&mut control, wake_at);
        }
    }

    fn jittered_interval(&self) -> Duration {
        let timing = &self.shared.config.timing;
        let spread = timing.jitter * (2.0 * fastrand::f64() - 1.0);
        timing.check_interval.mul_f64(1.0 + spread)
    }

    fn run_round(&mut self, round: u64, groups: &[bool]) {
        let config = Arc::clone(&self.shared.config);
        let timeout = config.timing.connect_timeout;
        let mut outcomes: Vec<Option<ProbeOutcome>> = vec![None; config.nodes.len()];
        let mut pending = 0;
        for (index, node) in config.nodes.iter().enumerate() {
            if !groups[node.group] {
                continue;
            }
            match self.dispatch(index, round) {
                Ok(()) => pending += 1,
                Err(failure) => {
                    outcomes[index] = Some(ProbeOutcome {
                        result: Err(failure),
                        latency: Duration::ZERO,
                    });
                }
            }
        }

        let deadline = Instant::now() + timeout + GRACE;
        while pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.results.recv_timeout(left.min(STOP_POLL)) {
                Ok(result) => {
                    if let Some(Some(thread)) = self.probe_threads.get_mut(result.node) {
                        thread.busy = false;
                    }
                    if result.round == round {
                        outcomes[result.node] = Some(result.outcome);
                        pending -= 1;
                    }
                }
                // Not worth finishing a round nobody will read.
                Err(RecvTimeoutError::Timeout) if self.shared.control.lock().stop => return,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }

        let now = SystemTime::now();
        let timing = config.timing;
        for (index, node) in config.nodes.iter().enumerate() {
            if !groups[node.group] {
                continue;
            }
            // No answer by the deadline: the probe thread is stuck (in DNS).
            let outcome = outcomes[index].take().unwrap_or(ProbeOutcome {
                result: Err(Failure::Timeout),
                latency: timeout,
            });
            let health = &mut self.state.nodes[index];
            if let Some(change) = health.record(outcome, timing.rise, timing.fall, now) {
                log_change(node, health, change);
            }
        }
        for (g, group) in config.groups.iter().enumerate() {
            if groups[g] {
                self.select_writer(g, group.members.clone());
                self.state.readers[g] = choose_readers(
                    group.members.clone(),
                    &self.state.nodes,
                    self.state.writers[g],
                    &config.reads,
                );
            }
        }
        self.state.rounds += 1;
        self.shared.snapshot.store(Arc::new(self.state.clone()));
        for (g, group) in config.groups.iter().enumerate() {
            let readers = self.state.readers[g];
            let fastest = fastest_reader(group.members.clone(), &self.state.nodes, readers);
            self.shared.routes[g].store(self.state.route(&config, g).pack(), Ordering::Release);
            self.shared.readers[g].store(readers, Ordering::Release);
            self.shared.fastest[g].store(fastest.unwrap_or(usize::MAX), Ordering::Release);
        }

        let mut control = self.shared.control.lock();
        control.completed = round;
        self.shared.round_done.notify_all();
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
        // The first round reports even "no writer", so a process that starts
        // with every database down says so.
        if after == before && (after.is_some() || self.state.rounds > 0) {
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

    /// Hands the probe of `node` to its thread, starting the thread if needed.
    fn dispatch(&mut self, node: usize, round: u64) -> Result<(), Failure> {
        if let Some(thread) = &self.probe_threads[node] {
            if thread.busy {
                return Err(Failure::Timeout);
            }
        }
        let sent = match &self.probe_threads[node] {
            Some(thread) => thread.requests.send(round).is_ok(),
            None => false,
        };
        if !sent {
            let thread = self
                .spawn_probe_thread(node)
                .map_err(|e| Failure::Internal(format!("cannot start a probe thread: {e}")))?;
            if thread.requests.send(round).is_err() {
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
        let (requests, inbox) = mpsc::channel::<u64>();
        let results = self.results_sender.clone();
        let shared = Arc::clone(&self.shared);
        thread::Builder::new()
            .name("dbha-probe".into())
            .spawn(move || {
                let node = &shared.config.nodes[index];
                let timeout = shared.config.timing.connect_timeout;
                let mut prober = shared.prober.for_node(node);
                // Ends when the scheduler drops its sender.
                while let Ok(round) = inbox.recv() {
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
                    if results
                        .send(ProbeResult {
                            node: index,
                            round,
                            outcome,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })?;
        Ok(ProbeThread {
            requests,
            busy: false,
        })
    }
}

fn log_change(node: &Node, health: &NodeHealth, change: Health) {
    let latency = health.latency.unwrap_or_default().as_secs_f64() * 1000.0;
    match (change, &health.last_error) {
        (Health::Down, Some(failure)) => {
            warn!("{} ({}) is down: {failure}", node.alias, node.endpoint);
        }
        _ => info!(
            "{} ({}) is {} ({latency:.1} ms)",
            node.alias,
            node.endpoint,
            change.as_str()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Role;
    use crate::value::Value;
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
                timeline: None,
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
        let completed = checker.shared.control.lock().completed;
        assert!(checker.wait_for_round(completed + 1, Duration::from_secs(2)));
        assert_eq!(writer(&checker), Route::Healthy(1));
        thread::sleep(Duration::from_millis(150));
        let probes = script.probes.load(Ordering::SeqCst) - before;
        let rounds = checker.shared.control.lock().completed;
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

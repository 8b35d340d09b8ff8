//! Per-node health: `unknown` → `up`/`down`, with RISE/FALL hysteresis.

use std::time::{Duration, Instant, SystemTime};

use crate::engines::{Observation, Role};
use crate::net::Failure;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet.
    Unknown,
    Up,
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub result: Result<Observation, Failure>,
    pub latency: Duration,
    /// A failure two independent attempts agree on (the server ended the
    /// kept session and a fresh connection failed too): the node is down at
    /// once, without waiting for FALL.
    pub confirmed: bool,
    /// When the probe began: its lag was measured no earlier.
    pub started: Instant,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NodeHealth {
    pub health: Health,
    /// Consecutive successful probes (0 after a failure).
    pub successes: u32,
    /// Consecutive failed probes (0 after a success).
    pub failures: u32,
    /// Duration of the last probe, successful or not.
    pub latency: Option<Duration>,
    /// Why the last probe failed; `None` when it succeeded.
    pub last_error: Option<Failure>,
    pub checked_at: Option<SystemTime>,
    /// When `health` last changed.
    pub since: Option<SystemTime>,
    /// Role, lag, timeline and position from the last successful probe
    /// (all `None` unless the node uses the `role` probe).
    pub role: Option<Role>,
    pub lag: Option<Duration>,
    pub timeline: Option<u64>,
    pub position: Option<u64>,
    /// A standby's upstream timeline (see [`Observation::upstream_timeline`]).
    pub upstream_timeline: Option<u64>,
    /// When the last successful probe began: its lag is a bound only for
    /// that moment, and grows by the time since.
    pub measured_at: Option<Instant>,
}

impl Default for NodeHealth {
    fn default() -> Self {
        Self {
            health: Health::Unknown,
            successes: 0,
            failures: 0,
            latency: None,
            last_error: None,
            checked_at: None,
            since: None,
            role: None,
            lag: None,
            timeline: None,
            position: None,
            upstream_timeline: None,
            measured_at: None,
        }
    }
}

impl NodeHealth {
    /// Records a probe outcome; returns the new health if it changed.
    ///
    /// The first outcome decides an unknown node at once, so that a process
    /// gets an informed answer after one round; after that a node changes
    /// only after `rise` successes or `fall` failures in a row, so that one
    /// lost packet does not move writes. A confirmed failure is not a lost
    /// packet: it takes the node down at once.
    pub fn record(
        &mut self,
        outcome: ProbeOutcome,
        rise: u32,
        fall: u32,
        at: SystemTime,
    ) -> Option<Health> {
        self.latency = Some(outcome.latency);
        self.checked_at = Some(at);
        let before = self.health;
        match outcome.result {
            Ok(observation) => {
                self.role = observation.role;
                self.lag = observation.lag;
                self.timeline = observation.timeline;
                self.position = observation.position;
                self.upstream_timeline = observation.upstream_timeline;
                self.measured_at = Some(outcome.started);
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                self.last_error = None;
                if before == Health::Unknown || (before == Health::Down && self.successes >= rise) {
                    self.health = Health::Up;
                }
            }
            Err(failure) => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                self.last_error = Some(failure);
                if before == Health::Unknown
                    || (before == Health::Up && (self.failures >= fall || outcome.confirmed))
                {
                    self.health = Health::Down;
                }
            }
        }
        let changed = self.health != before;
        if changed {
            self.since = Some(at);
        }
        changed.then_some(self.health)
    }

    pub fn is_up(&self) -> bool {
        self.health == Health::Up
    }

    /// A short account for messages: why the last probe failed, else the
    /// health and role (`up, standby`).
    pub fn describe(&self) -> String {
        match (&self.last_error, self.role) {
            (Some(failure), _) => failure.to_string(),
            (None, Some(Role::Primary)) => format!("{}, primary", self.health.as_str()),
            (None, Some(Role::Standby)) => format!("{}, standby", self.health.as_str()),
            (None, None) => self.health.as_str().to_owned(),
        }
    }

    /// Up, and its last probe said primary.
    pub fn is_primary(&self) -> bool {
        self.is_up() && self.role == Some(Role::Primary)
    }

    /// Up, but its latest probe failed: on its way down, perhaps.
    pub fn is_suspect(&self) -> bool {
        self.is_up() && self.failures > 0
    }

    /// The lag bound that holds now: the measured lag plus the time since
    /// it was measured (replay may have stopped the moment after).
    pub fn lag_bound(&self, now: Instant) -> Option<Duration> {
        Some(self.lag? + now.saturating_duration_since(self.measured_at?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(result: Result<Observation, Failure>) -> ProbeOutcome {
        ProbeOutcome {
            result,
            latency: Duration::from_millis(1),
            confirmed: false,
            started: Instant::now(),
        }
    }

    fn ok() -> ProbeOutcome {
        outcome(Ok(Observation::default()))
    }

    fn refused() -> ProbeOutcome {
        outcome(Err(Failure::Refused))
    }

    fn run(node: &mut NodeHealth, outcome: ProbeOutcome) -> Option<Health> {
        node.record(outcome, 2, 3, SystemTime::now())
    }

    #[test]
    fn first_outcome_decides_unknown() {
        let mut up = NodeHealth::default();
        assert_eq!(run(&mut up, ok()), Some(Health::Up));
        let mut down = NodeHealth::default();
        assert_eq!(run(&mut down, refused()), Some(Health::Down));
        assert_eq!(down.last_error, Some(Failure::Refused));
    }

    #[test]
    fn fall_needs_consecutive_failures() {
        let mut node = NodeHealth::default();
        run(&mut node, ok());
        assert_eq!(run(&mut node, refused()), None);
        assert_eq!(run(&mut node, refused()), None);
        assert_eq!(run(&mut node, ok()), None, "a success resets the count");
        assert_eq!(node.failures, 0);
        run(&mut node, refused());
        run(&mut node, refused());
        assert_eq!(run(&mut node, refused()), Some(Health::Down));
        assert_eq!(node.failures, 3);
    }

    #[test]
    fn rise_needs_consecutive_successes() {
        let mut node = NodeHealth::default();
        run(&mut node, refused());
        assert_eq!(run(&mut node, ok()), None);
        assert_eq!(node.last_error, None);
        assert_eq!(run(&mut node, refused()), None);
        assert_eq!(run(&mut node, ok()), None);
        assert_eq!(run(&mut node, ok()), Some(Health::Up));
        assert_eq!(node.successes, 2);
    }

    #[test]
    fn records_latency_and_time() {
        let mut node = NodeHealth::default();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(7);
        let started = Instant::now();
        node.record(
            ProbeOutcome {
                result: Ok(Observation {
                    lag: Some(Duration::from_secs(2)),
                    ..Observation::default()
                }),
                latency: Duration::from_millis(3),
                confirmed: false,
                started,
            },
            1,
            1,
            at,
        );
        assert_eq!(node.latency, Some(Duration::from_millis(3)));
        assert_eq!(node.checked_at, Some(at));
        assert_eq!(node.measured_at, Some(started));
        // The bound grows with the time since the measurement.
        let later = started + Duration::from_millis(1500);
        assert_eq!(node.lag_bound(later), Some(Duration::from_millis(3500)));
    }

    #[test]
    fn a_confirmed_failure_takes_the_node_down_at_once() {
        let mut node = NodeHealth::default();
        run(&mut node, ok());
        let confirmed = ProbeOutcome {
            confirmed: true,
            ..refused()
        };
        assert_eq!(run(&mut node, confirmed), Some(Health::Down));
        assert_eq!(node.failures, 1, "FALL is 3");
    }
}

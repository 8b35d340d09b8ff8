//! Where reads go: standbys whose lag bound holds right now, how reads are
//! spread over them, which standbys have a context's own writes
//! (read-your-writes), and which group a model's queries belong to.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use super::config::{Balance, Config, ReadMode, Reads};
use super::state::NodeHealth;
use crate::engines::Role;

/// A standby stops serving reads this long before its lag bound would pass
/// `MAX_REPLICA_LAG`, so that a read routed the instant before the checker
/// republishes still lands within the bound.
pub const LAG_MARGIN: Duration = Duration::from_millis(20);

/// The nodes that may serve reads now, and when that must be decided again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readers {
    /// Bits relative to the group's first node; empty means "the writer".
    pub mask: u64,
    /// The moment the first of them stops qualifying unless probed again.
    pub expires: Option<Instant>,
}

/// Standbys that are up and whose lag bound (the measured lag plus the time
/// since it was measured) is within `max_lag` now; a lag the probe could not
/// measure does not qualify. With `ReadMode::Any` the writer too.
///
/// A standby's own account of its lag is not the last word: one cut off
/// from its primary by a network partition still has a WAL receiver, and
/// reports lag 0 until the receiver times out. So its lag is at least how
/// long ago the writer's `log` shows a position it had not replayed when
/// it was probed; and one whose upstream timeline is older than the
/// writer's follows a primary a promotion left behind.
pub fn choose_readers(
    members: Range<usize>,
    nodes: &[NodeHealth],
    writer: Option<usize>,
    log: &WriteLog,
    reads: &Reads,
    now: Instant,
) -> Readers {
    if reads.mode == ReadMode::Writer {
        return Readers::default();
    }
    let limit = reads.max_lag.saturating_sub(LAG_MARGIN);
    let writer_timeline = writer.and_then(|w| nodes[w].timeline);
    members.clone().fold(Readers::default(), |mut readers, i| {
        let node = &nodes[i];
        let writer_too = reads.mode == ReadMode::Any && Some(i) == writer;
        let left_behind = matches!(
            (node.upstream_timeline, writer_timeline),
            (Some(upstream), Some(newest)) if upstream < newest
        );
        let fresh_until = match (
            node.is_up() && node.role == Some(Role::Standby) && !left_behind,
            node.lag,
            node.measured_at,
        ) {
            (true, Some(lag), Some(at)) => limit
                .checked_sub(lag.max(log.behind(node)))
                .map(|left| at + left),
            _ => None,
        }
        .filter(|until| *until > now);
        if let Some(until) = fresh_until {
            readers.expires = Some(readers.expires.map_or(until, |e| e.min(until)));
        }
        if fresh_until.is_some() || writer_too {
            readers.mask |= 1 << (i - members.start);
        }
        readers
    })
}

/// The reader with the lowest latency in its last probe.
pub fn fastest_reader(members: Range<usize>, nodes: &[NodeHealth], mask: u64) -> Option<usize> {
    members
        .clone()
        .filter(|&i| mask & (1 << (i - members.start)) != 0)
        .min_by_key(|&i| nodes[i].latency.unwrap_or(Duration::MAX))
}

/// The bit of `mask` (not empty) to read from: the `turn`th for round robin,
/// the `random`th for random, `fastest` (if still in the mask) for latency.
pub fn pick_reader(
    mask: u64,
    balance: Balance,
    turn: u32,
    random: u32,
    fastest: Option<u32>,
) -> u32 {
    let count = mask.count_ones();
    match balance {
        Balance::RoundRobin => nth_set_bit(mask, turn % count),
        Balance::Random => nth_set_bit(mask, random % count),
        Balance::Latency => fastest
            .filter(|&bit| mask & (1 << bit) != 0)
            .unwrap_or_else(|| mask.trailing_zeros()),
    }
}

/// The position of the `n`th set bit of `mask` (`n` < its count of ones).
fn nth_set_bit(mut mask: u64, n: u32) -> u32 {
    for _ in 0..n {
        mask &= mask - 1;
    }
    mask.trailing_zeros()
}

/// The bits of `mask` whose standby has replayed at least the writer's
/// probe number `needed` (see [`WriteLog`]).
pub fn caught_up_mask(mask: u64, needed: u64, caught_up: impl Fn(u32) -> u64) -> u64 {
    let mut kept = 0;
    let mut rest = mask;
    while rest != 0 {
        let bit = rest.trailing_zeros();
        rest &= rest - 1;
        if caught_up(bit) >= needed {
            kept |= 1 << bit;
        }
    }
    kept
}

/// Read-your-writes, measured: the writer's probes, numbered as they are
/// sent, with the data position (or, without one, the time) each found.
///
/// A context that wrote and then reads needs a standby that has every
/// commit made before the read. Any writer probe sent after that read
/// finds a position past those commits; a standby whose position has
/// reached it has them all. So the read notes the number the next writer
/// probe will get, and a standby qualifies for it once [`caught_up`] of the
/// standby reaches that number.
///
/// [`caught_up`]: WriteLog::caught_up
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteLog {
    /// `(probe number, position, when the probe was sent)`, oldest first.
    entries: VecDeque<(u64, Option<u64>, Instant)>,
}

/// Enough for a standby a few minutes behind at one probe a second.
const WRITE_LOG_KEPT: usize = 256;
/// Without data positions, the time a standby has replayed up to is only
/// known to the second (MySQL's `Seconds_Behind_Source`).
const TIME_MARGIN: Duration = Duration::from_secs(1);

impl WriteLog {
    /// The writer answered probe `number` (sent at `sent`) with `position`.
    pub fn record(&mut self, number: u64, position: Option<u64>, sent: Instant) {
        if self.entries.len() == WRITE_LOG_KEPT {
            self.entries.pop_front();
        }
        self.entries.push_back((number, position, sent));
    }

    /// How far behind `standby` may have been when probed, as the writer's
    /// positions show. Zero while it had replayed every position the writer
    /// showed before its probe (a writer probe sent in the same instant
    /// proves nothing: the standby replays it a moment later). Otherwise
    /// it lacked commits made after the last writer probe whose position it
    /// had replayed: as long ago as that probe (all of time, if none).
    pub fn behind(&self, standby: &NodeHealth) -> Duration {
        /// Writer probes this close before the standby's are concurrent.
        const CONCURRENT: Duration = Duration::from_millis(100);
        let (Some(replayed), Some(at)) = (standby.position, standby.measured_at) else {
            return Duration::ZERO;
        };
        let lacks = self.entries.iter().any(|(_, written, sent)| {
            *sent + CONCURRENT <= at && written.is_some_and(|written| written > replayed)
        });
        if !lacks {
            return Duration::ZERO;
        }
        self.entries
            .iter()
            .rev()
            .find(|(_, written, _)| written.is_some_and(|written| written <= replayed))
            .map_or(Duration::MAX, |(_, _, sent)| {
                at.saturating_duration_since(*sent)
            })
    }

    /// A new writer: its positions do not compare with the old one's.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The highest writer probe number whose finding `standby` has replayed:
    /// its position has reached that probe's position, or (no positions)
    /// what it has replayed is from after that probe was sent. 0 for none.
    pub fn caught_up(&self, standby: &NodeHealth) -> u64 {
        let replayed_until = standby
            .lag
            .zip(standby.measured_at)
            .and_then(|(lag, at)| at.checked_sub(lag + TIME_MARGIN));
        self.entries
            .iter()
            .rev()
            .find(|(_, position, sent)| match (standby.position, position) {
                (Some(replayed), Some(written)) => replayed >= *written,
                _ => replayed_until.is_some_and(|until| until >= *sent),
            })
            .map_or(0, |(number, ..)| *number)
    }
}

/// Where a model's queries go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelRoute {
    pub group: usize,
    /// `WRITER_READS`: its reads stay on the writer (sessions, auth).
    pub writer_reads: bool,
}

/// The route of the model `label` (`"app_label.modelname"`) of app
/// `app_label`, both lower-case: the model's own `ROUTES` entry, else its
/// app's, else the first group.
pub fn model_route(config: &Config, label: &str, app_label: &str) -> ModelRoute {
    let group = config
        .routes
        .get(label)
        .or_else(|| config.routes.get(app_label))
        .copied()
        .unwrap_or(0);
    let writer_reads = config
        .reads
        .writer_only
        .iter()
        .any(|l| l == label || l == app_label);
    ModelRoute {
        group,
        writer_reads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::state::Health;

    fn standby(lag: Option<u64>, measured_at: Instant) -> NodeHealth {
        NodeHealth {
            health: Health::Up,
            role: Some(Role::Standby),
            lag: lag.map(Duration::from_secs),
            measured_at: Some(measured_at),
            ..NodeHealth::default()
        }
    }

    fn primary() -> NodeHealth {
        NodeHealth {
            health: Health::Up,
            role: Some(Role::Primary),
            ..NodeHealth::default()
        }
    }

    fn reads(mode: ReadMode) -> Reads {
        Reads {
            mode,
            max_lag: Duration::from_secs(5),
            balance: Balance::RoundRobin,
            writer_only: Vec::new(),
            read_your_writes: true,
        }
    }

    #[test]
    fn readers_are_standbys_within_the_lag_bound_now() {
        let now = Instant::now();
        let n = [
            primary(),
            standby(Some(0), now),
            standby(Some(9), now),
            standby(None, now),
        ];
        let replicas = choose_readers(
            0..4,
            &n,
            Some(0),
            &WriteLog::default(),
            &reads(ReadMode::Replicas),
            now,
        );
        assert_eq!(replicas.mask, 0b0010);
        assert_eq!(
            replicas.expires,
            // MAX_REPLICA_LAG less LAG_MARGIN.
            Some(now + Duration::from_millis(4980))
        );
        assert_eq!(
            choose_readers(
                0..4,
                &n,
                Some(0),
                &WriteLog::default(),
                &reads(ReadMode::Any),
                now
            )
            .mask,
            0b0011
        );
        assert_eq!(
            choose_readers(
                0..4,
                &n,
                Some(0),
                &WriteLog::default(),
                &reads(ReadMode::Writer),
                now
            )
            .mask,
            0
        );
        // Offsets are relative to the group.
        assert_eq!(
            choose_readers(
                1..4,
                &n,
                Some(0),
                &WriteLog::default(),
                &reads(ReadMode::Replicas),
                now
            )
            .mask,
            0b001
        );
    }

    #[test]
    fn a_standby_cut_off_from_its_primary_is_as_far_behind_as_the_writer_shows() {
        let start = Instant::now();
        let second = |n: u64| start + Duration::from_secs(n);
        // The writer's positions grow each second; the standby, cut off,
        // stays at 100 and (its receiver not knowing yet) reports lag 0.
        let mut log = WriteLog::default();
        for n in 0..8 {
            log.record(n + 1, Some(100 + n * 10), second(n));
        }
        let mut cut_off = standby(Some(0), second(7));
        cut_off.position = Some(100);
        let mut streaming = standby(Some(0), second(7));
        streaming.position = Some(170);
        // It has what the writer had at 0 s, and lacks what it had at 1 s.
        assert_eq!(log.behind(&cut_off), Duration::from_secs(7));
        assert_eq!(log.behind(&streaming), Duration::ZERO);
        let mut lost = standby(Some(0), second(7));
        lost.position = Some(50);
        assert_eq!(log.behind(&lost), Duration::MAX, "behind all the log shows");
        let n = [primary(), cut_off, streaming];
        let replicas = reads(ReadMode::Replicas);
        let readers = choose_readers(0..3, &n, Some(0), &log, &replicas, second(7));
        assert_eq!(
            readers.mask, 0b100,
            "7 s behind, past MAX_REPLICA_LAG = 5 s"
        );
        // Probed before the writer's later probes: only those before count,
        // and the one sent with its own probe is concurrent.
        let mut probed_early = n[1].clone();
        probed_early.measured_at = Some(second(3));
        assert_eq!(log.behind(&probed_early), Duration::from_secs(3));
        let mut in_step = n[1].clone();
        in_step.measured_at = Some(second(1));
        assert_eq!(
            log.behind(&in_step),
            Duration::ZERO,
            "the writer's probe at 1 s is concurrent"
        );
    }

    #[test]
    fn a_standby_following_a_primary_left_behind_serves_no_reads() {
        let now = Instant::now();
        let mut writer = primary();
        writer.timeline = Some(2);
        let mut behind = standby(Some(0), now);
        behind.upstream_timeline = Some(1);
        let mut following = standby(Some(0), now);
        following.upstream_timeline = Some(2);
        let n = [writer, behind, following, standby(Some(0), now)];
        let readers = choose_readers(
            0..4,
            &n,
            Some(0),
            &WriteLog::default(),
            &reads(ReadMode::Replicas),
            now,
        );
        assert_eq!(
            readers.mask, 0b1100,
            "timeline 1 under a writer on 2; unknown ones stay"
        );
    }

    #[test]
    fn the_lag_bound_grows_between_probes() {
        let measured = Instant::now();
        // Measured 4 s behind: it qualifies for 1 s (less the margin) only.
        let n = [
            primary(),
            standby(Some(4), measured),
            standby(Some(1), measured),
        ];
        let at_once = choose_readers(
            0..3,
            &n,
            Some(0),
            &WriteLog::default(),
            &reads(ReadMode::Replicas),
            measured,
        );
        assert_eq!(at_once.mask, 0b110);
        assert_eq!(at_once.expires, Some(measured + Duration::from_millis(980)));
        let later = measured + Duration::from_secs(1);
        let then = choose_readers(
            0..3,
            &n,
            Some(0),
            &WriteLog::default(),
            &reads(ReadMode::Replicas),
            later,
        );
        assert_eq!(then.mask, 0b100, "its lag could be 5 s by now");
        assert_eq!(then.expires, Some(measured + Duration::from_millis(3980)));
        let much_later = measured + Duration::from_secs(10);
        let none = choose_readers(
            0..3,
            &n,
            Some(0),
            &WriteLog::default(),
            &reads(ReadMode::Replicas),
            much_later,
        );
        assert_eq!(none, Readers::default());
    }

    #[test]
    fn a_down_standby_is_no_reader() {
        let now = Instant::now();
        let mut n = [primary(), standby(Some(0), now)];
        n[1].health = Health::Down;
        assert_eq!(
            choose_readers(
                0..2,
                &n,
                Some(0),
                &WriteLog::default(),
                &reads(ReadMode::Replicas),
                now
            )
            .mask,
            0
        );
    }

    #[test]
    fn fastest_reader_by_latency() {
        let now = Instant::now();
        let mut n = [primary(), standby(Some(0), now), standby(Some(0), now)];
        n[1].latency = Some(Duration::from_millis(5));
        n[2].latency = Some(Duration::from_millis(1));
        assert_eq!(fastest_reader(0..3, &n, 0b110), Some(2));
        assert_eq!(fastest_reader(0..3, &n, 0b010), Some(1));
        assert_eq!(fastest_reader(0..3, &n, 0), None);
    }

    #[test]
    fn balancing() {
        let mask = 0b1011;
        let turns: Vec<u32> = (0..4)
            .map(|t| pick_reader(mask, Balance::RoundRobin, t, 0, None))
            .collect();
        assert_eq!(turns, [0, 1, 3, 0]);
        assert_eq!(pick_reader(mask, Balance::Random, 0, 7, None), 1);
        assert_eq!(pick_reader(mask, Balance::Latency, 0, 0, Some(3)), 3);
        // The fastest is no longer a reader: the first one is.
        assert_eq!(pick_reader(mask, Balance::Latency, 0, 0, Some(2)), 0);
        assert_eq!(pick_reader(mask, Balance::Latency, 0, 0, None), 0);
    }

    #[test]
    fn read_your_writes_by_position() {
        let start = Instant::now();
        let mut log = WriteLog::default();
        log.record(1, Some(100), start);
        log.record(2, Some(180), start + Duration::from_secs(1));
        let mut s = standby(Some(0), start);
        s.position = Some(150);
        assert_eq!(log.caught_up(&s), 1);
        s.position = Some(180);
        assert_eq!(log.caught_up(&s), 2);
        s.position = Some(99);
        assert_eq!(log.caught_up(&s), 0);
        assert_eq!(
            caught_up_mask(0b111, 2, |bit| [0, 2, 1][bit as usize]),
            0b010
        );
        log.clear();
        s.position = Some(1000);
        assert_eq!(log.caught_up(&s), 0, "a new writer's positions start over");
    }

    #[test]
    fn read_your_writes_by_time_without_positions() {
        let start = Instant::now();
        let mut log = WriteLog::default();
        log.record(1, None, start);
        log.record(2, None, start + Duration::from_secs(5));
        // Measured at +4 s, 2 s behind: replayed what was committed by +2 s,
        // less the second of uncertainty: past probe 1, not probe 2.
        let s = standby(Some(2), start + Duration::from_secs(4));
        assert_eq!(log.caught_up(&s), 1);
        let behind = standby(Some(4), start + Duration::from_secs(4));
        assert_eq!(log.caught_up(&behind), 0);
    }

    #[test]
    fn model_routes() {
        use crate::checker::value::Value;
        let pg = Value::Map(vec![(
            "ENGINE".into(),
            Value::str("django.db.backends.postgresql"),
        )]);
        let databases = Value::Map(vec![("a".into(), pg.clone()), ("b".into(), pg)]);
        let dbha = Value::Map(vec![
            (
                "GROUPS".into(),
                Value::Map(vec![
                    ("main".into(), Value::List(vec![Value::str("a")])),
                    ("reports".into(), Value::List(vec![Value::str("b")])),
                ]),
            ),
            (
                "ROUTES".into(),
                Value::Map(vec![
                    ("shop".into(), Value::str("reports")),
                    ("shop.Order".into(), Value::str("main")),
                ]),
            ),
        ]);
        let config = Config::from_settings(&databases, &dbha).unwrap();
        let route = |label, app| model_route(&config, label, app);
        assert_eq!(route("shop.order", "shop").group, 0);
        assert_eq!(route("shop.cart", "shop").group, 1);
        assert_eq!(route("blog.post", "blog").group, 0);
        assert!(route("auth.user", "auth").writer_reads);
        assert!(route("sessions.session", "sessions").writer_reads);
        assert!(!route("shop.cart", "shop").writer_reads);
    }
}

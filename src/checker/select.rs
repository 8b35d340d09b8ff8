//! Writer selection: which node of a group takes writes, and which other
//! primaries are fenced off as split-brain rivals.

use std::ops::Range;

use super::config::{Failback, ReadMode, Reads};
use super::state::NodeHealth;
use crate::engines::Role;

/// The group's writer after a probe round, or `None` when there is none.
///
/// Nodes probed with `role` take writes only while they report primary; a
/// standby never does. Writes are sticky: they stay on the current writer
/// while it is up, even when a higher-priority node comes back, because that
/// node may hold stale or diverged data. Two rules move them sooner:
///
/// - a writer that failed its latest probe (or was demoted) gives way at once,
///   without waiting for FALL, to another node that reports primary: that is
///   a promotion;
/// - of several primaries, a healthy writer keeps the writes (they never flip
///   between two primaries) and the others are fenced in `fenced` until they
///   report standby. A rival with a higher PostgreSQL timeline was promoted
///   after the writer, so it is not fenced: it takes over if the writer fails.
///
/// Nodes without role information (`tcp`, `handshake` probes) take writes
/// only when no node reports primary; `Failback::Auto` returns those to the
/// highest-priority node that is up.
pub fn choose_writer(
    members: Range<usize>,
    nodes: &[NodeHealth],
    fenced: &mut [bool],
    current: Option<usize>,
    failback: Failback,
) -> Option<usize> {
    for i in members.clone() {
        if nodes[i].role == Some(Role::Standby) {
            fenced[i] = false;
        }
    }
    let writer = pick(members.clone(), nodes, fenced, current, failback);
    if let Some(writer) = writer.filter(|&w| nodes[w].is_primary()) {
        for i in members {
            let older = nodes[i]
                .timeline
                .is_none_or(|t| nodes[writer].timeline.is_none_or(|w| t <= w));
            if i != writer && nodes[i].is_primary() && older {
                fenced[i] = true;
            }
        }
    }
    writer
}

fn pick(
    members: Range<usize>,
    nodes: &[NodeHealth],
    fenced: &[bool],
    current: Option<usize>,
    failback: Failback,
) -> Option<usize> {
    let primaries = || {
        members
            .clone()
            .filter(|&i| nodes[i].is_primary() && !fenced[i] && Some(i) != current)
    };
    if let Some(writer) = current {
        let node = &nodes[writer];
        if node.is_primary() {
            if node.is_suspect() {
                if let Some(promoted) = newest(nodes, primaries()) {
                    return Some(promoted);
                }
            }
            return Some(writer);
        }
        if failback == Failback::Sticky && node.is_up() && node.role.is_none() {
            return Some(writer);
        }
    }
    newest(nodes, primaries()).or_else(|| {
        members
            .clone()
            .find(|&i| nodes[i].is_up() && nodes[i].role.is_none())
    })
}

/// The nodes that may serve reads, as a mask of bits relative to the group's
/// first node: standbys that are up and at most `max_lag` behind (a lag the
/// probe could not measure does not qualify), plus the writer with
/// `ReadMode::Any`. Empty means "read from the writer".
pub fn choose_readers(
    members: Range<usize>,
    nodes: &[NodeHealth],
    writer: Option<usize>,
    reads: &Reads,
) -> u64 {
    if reads.mode == ReadMode::Writer {
        return 0;
    }
    members.clone().fold(0, |mask, i| {
        let node = &nodes[i];
        let fresh_standby = node.is_up()
            && node.role == Some(Role::Standby)
            && node.lag.is_some_and(|lag| lag <= reads.max_lag);
        let writer_too = reads.mode == ReadMode::Any && Some(i) == writer;
        if fresh_standby || writer_too {
            mask | 1 << (i - members.start)
        } else {
            mask
        }
    })
}

/// The reader with the lowest latency in its last probe.
pub fn fastest_reader(members: Range<usize>, nodes: &[NodeHealth], readers: u64) -> Option<usize> {
    members
        .clone()
        .filter(|&i| readers & (1 << (i - members.start)) != 0)
        .min_by_key(|&i| nodes[i].latency.unwrap_or(std::time::Duration::MAX))
}

/// The primary promoted last (highest timeline), else the first in priority.
fn newest(nodes: &[NodeHealth], candidates: impl Iterator<Item = usize>) -> Option<usize> {
    candidates.fold(None, |best: Option<usize>, i| match best {
        Some(b) if nodes[i].timeline.unwrap_or(0) <= nodes[b].timeline.unwrap_or(0) => Some(b),
        _ => Some(i),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::state::Health;

    use Health::{Down, Unknown, Up};

    fn nodes(states: &[Health]) -> Vec<NodeHealth> {
        states
            .iter()
            .map(|&health| NodeHealth {
                health,
                ..NodeHealth::default()
            })
            .collect()
    }

    fn choose(n: &[NodeHealth], current: Option<usize>, failback: Failback) -> Option<usize> {
        choose_writer(0..n.len(), n, &mut vec![false; n.len()], current, failback)
    }

    /// Role-probed nodes: `P` primary, `S` standby, `D` down (was primary),
    /// `F` primary whose latest probe failed (still up: FALL not reached).
    fn cluster(roles: &str) -> Vec<NodeHealth> {
        roles
            .chars()
            .map(|c| {
                let (health, role, failures) = match c {
                    'P' => (Up, Role::Primary, 0),
                    'S' => (Up, Role::Standby, 0),
                    'F' => (Up, Role::Primary, 1),
                    _ => (Down, Role::Primary, 2),
                };
                NodeHealth {
                    health,
                    role: Some(role),
                    failures,
                    ..NodeHealth::default()
                }
            })
            .collect()
    }

    #[test]
    fn first_up_in_priority_order() {
        let n = nodes(&[Down, Up, Up]);
        assert_eq!(choose(&n, None, Failback::Sticky), Some(1));
        let n = nodes(&[Unknown, Down, Up]);
        assert_eq!(choose(&n, None, Failback::Sticky), Some(2));
    }

    #[test]
    fn sticky_writer_stays_when_primary_returns() {
        let n = nodes(&[Up, Up, Up]);
        assert_eq!(choose(&n, Some(1), Failback::Sticky), Some(1));
    }

    #[test]
    fn sticky_writer_moves_when_it_fails() {
        let n = nodes(&[Up, Down, Up]);
        assert_eq!(choose(&n, Some(1), Failback::Sticky), Some(0));
    }

    #[test]
    fn auto_failback_returns_to_priority() {
        let n = nodes(&[Up, Up, Up]);
        assert_eq!(choose(&n, Some(1), Failback::Auto), Some(0));
    }

    #[test]
    fn all_down_has_no_writer() {
        let n = nodes(&[Down, Down, Unknown]);
        assert_eq!(choose(&n, Some(0), Failback::Sticky), None);
        assert_eq!(choose(&n, None, Failback::Auto), None);
    }

    #[test]
    fn only_the_group_members_count() {
        let n = nodes(&[Up, Down, Up]);
        assert_eq!(
            choose_writer(1..3, &n, &mut [false; 3], None, Failback::Sticky),
            Some(2)
        );
    }

    #[test]
    fn a_standby_never_takes_writes() {
        assert_eq!(choose(&cluster("DSS"), Some(0), Failback::Sticky), None);
        assert_eq!(choose(&cluster("SSS"), None, Failback::Auto), None);
        // Demoted: it stops taking writes at once.
        assert_eq!(choose(&cluster("SSP"), Some(0), Failback::Sticky), Some(2));
    }

    #[test]
    fn the_primary_is_found_by_role_not_priority() {
        assert_eq!(choose(&cluster("SSP"), None, Failback::Sticky), Some(2));
        assert_eq!(choose(&cluster("DSP"), Some(0), Failback::Sticky), Some(2));
    }

    #[test]
    fn a_failing_writer_gives_way_to_a_promoted_node_without_waiting_for_fall() {
        assert_eq!(choose(&cluster("FSP"), Some(0), Failback::Sticky), Some(2));
        // With no promoted node, one failed probe moves nothing.
        assert_eq!(choose(&cluster("FSS"), Some(0), Failback::Sticky), Some(0));
    }

    #[test]
    fn split_brain_keeps_the_writer_and_fences_the_rival() {
        let n = cluster("PSP");
        let mut fenced = [false; 3];
        assert_eq!(
            choose_writer(0..3, &n, &mut fenced, Some(2), Failback::Auto),
            Some(2)
        );
        assert_eq!(fenced, [true, false, false]);
        // The writer fails: the fenced rival never gets the writes.
        let n = cluster("PSD");
        assert_eq!(
            choose_writer(0..3, &n, &mut fenced, Some(2), Failback::Sticky),
            None
        );
        // It rejoins as a standby: the fence lifts.
        let n = cluster("SSP");
        assert_eq!(
            choose_writer(0..3, &n, &mut fenced, Some(2), Failback::Sticky),
            Some(2)
        );
        assert_eq!(fenced, [false; 3]);
    }

    #[test]
    fn a_rival_with_a_newer_timeline_is_not_fenced() {
        let mut n = cluster("PSP");
        n[0].timeline = Some(1);
        n[2].timeline = Some(2);
        let mut fenced = [false; 3];
        // A stale writer keeps the writes while healthy (no flip) ...
        assert_eq!(
            choose_writer(0..3, &n, &mut fenced, Some(0), Failback::Sticky),
            Some(0)
        );
        assert_eq!(fenced, [false; 3]);
        // ... and a fresh process picks the newest promotion, fencing the other.
        assert_eq!(
            choose_writer(0..3, &n, &mut fenced, None, Failback::Sticky),
            Some(2)
        );
        assert_eq!(fenced, [true, false, false]);
    }

    fn reads(mode: ReadMode) -> Reads {
        Reads {
            mode,
            max_lag: std::time::Duration::from_secs(5),
            balance: crate::checker::config::Balance::RoundRobin,
            writer_only: Vec::new(),
        }
    }

    #[test]
    fn readers_are_fresh_standbys() {
        use std::time::Duration;
        let mut n = cluster("PSSS");
        n[1].lag = Some(Duration::ZERO);
        n[2].lag = Some(Duration::from_secs(9));
        n[3].lag = None;
        assert_eq!(
            choose_readers(0..4, &n, Some(0), &reads(ReadMode::Replicas)),
            0b0010
        );
        assert_eq!(
            choose_readers(0..4, &n, Some(0), &reads(ReadMode::Any)),
            0b0011
        );
        assert_eq!(
            choose_readers(0..4, &n, Some(0), &reads(ReadMode::Writer)),
            0
        );
        n[1].health = Down;
        assert_eq!(
            choose_readers(0..4, &n, Some(0), &reads(ReadMode::Replicas)),
            0
        );
        // Offsets are relative to the group.
        let mut two = cluster("SPS");
        two[0].lag = Some(Duration::ZERO);
        two[2].lag = Some(Duration::ZERO);
        assert_eq!(
            choose_readers(1..3, &two, Some(1), &reads(ReadMode::Any)),
            0b11
        );
    }

    #[test]
    fn fastest_reader_by_latency() {
        use std::time::Duration;
        let mut n = cluster("PSS");
        n[1].latency = Some(Duration::from_millis(5));
        n[2].latency = Some(Duration::from_millis(1));
        assert_eq!(fastest_reader(0..3, &n, 0b110), Some(2));
        assert_eq!(fastest_reader(0..3, &n, 0b010), Some(1));
        assert_eq!(fastest_reader(0..3, &n, 0), None);
    }

    #[test]
    fn role_unknown_nodes_are_writers_only_without_a_primary() {
        let mut n = cluster("SP");
        n.push(NodeHealth {
            health: Up,
            ..NodeHealth::default()
        });
        assert_eq!(choose(&n, None, Failback::Sticky), Some(1));
        n[1].health = Down;
        assert_eq!(choose(&n, None, Failback::Sticky), Some(2));
    }
}

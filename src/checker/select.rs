//! Writer selection: which node of a group takes writes, and which other
//! primaries are fenced off: abandoned by a promotion, or split-brain rivals.

use std::ops::Range;

use super::config::Failback;
use super::state::NodeHealth;
use crate::engines::Role;

/// The group's writer after a probe round, or `None` when there is none.
///
/// Nodes probed with `role` take writes only while they report primary; a
/// standby never does. Of several primaries:
///
/// - the newest timeline wins: a primary on a higher timeline than another
///   was promoted after it, and the other was abandoned by that promotion
///   (every write it takes is lost). The newest takes the writes as soon as
///   a probe sees it, whoever had them; the older ones are fenced until they
///   report standby, or a timeline above every other primary's;
/// - on equal (or unknown) timelines, a healthy writer keeps the writes
///   (they never flip between two primaries) and the others are fenced: a
///   split brain;
/// - a writer that failed its latest probe (or was demoted) gives way at
///   once, without waiting for FALL, to another node that reports primary:
///   that is a promotion.
///
/// Writes are sticky otherwise: they stay on the current writer while it is
/// up, even when a higher-priority node comes back, because that node may
/// hold stale or diverged data. Nodes without role information (`tcp`,
/// `handshake` probes) take writes only when no node reports primary;
/// `Failback::Auto` returns those to the highest-priority node that is up.
pub fn choose_writer(
    members: Range<usize>,
    nodes: &[NodeHealth],
    fenced: &mut [bool],
    newest_timeline: &mut Option<u64>,
    current: Option<usize>,
    failback: Failback,
) -> Option<usize> {
    let primaries: Vec<usize> = members.clone().filter(|&i| nodes[i].is_primary()).collect();
    for i in members.clone() {
        if nodes[i].role == Some(Role::Standby) {
            fenced[i] = false;
        }
    }
    update_newest_timeline(members.clone(), nodes, &primaries, newest_timeline);
    if let Some(newest) = *newest_timeline {
        let on_newest: Vec<usize> = primaries
            .iter()
            .copied()
            .filter(|&i| nodes[i].timeline == Some(newest))
            .collect();
        // Alone on the newest timeline: the latest promotion, fenced or not.
        if let [alone] = on_newest[..] {
            fenced[alone] = false;
        }
        for &i in &primaries {
            if nodes[i].timeline.is_some_and(|t| t < newest) {
                fenced[i] = true;
            }
        }
    }
    let writer = pick(members, nodes, fenced, current, failback);
    // Split brain: other primaries that are not newer than the writer.
    if let Some(writer) = writer.filter(|&w| nodes[w].is_primary()) {
        for &i in &primaries {
            let newer = matches!(
                (nodes[i].timeline, nodes[writer].timeline),
                (Some(t), Some(w)) if t > w
            );
            if i != writer && !newer {
                fenced[i] = true;
            }
        }
    }
    writer
}

/// The newest timeline the group's primaries have shown. It is remembered
/// while its primary is down, so that an older primary coming back does not
/// look newest; it is forgotten only when every member answers and none is
/// a primary on it (the cluster was deliberately taken back, or rebuilt).
fn update_newest_timeline(
    members: Range<usize>,
    nodes: &[NodeHealth],
    primaries: &[usize],
    newest: &mut Option<u64>,
) {
    let seen = primaries.iter().filter_map(|&i| nodes[i].timeline).max();
    let all_answer = members
        .clone()
        .all(|i| nodes[i].is_up() && nodes[i].failures == 0);
    let top_gone =
        newest.is_some_and(|top| !primaries.iter().any(|&i| nodes[i].timeline == Some(top)));
    *newest = if all_answer && top_gone {
        seen
    } else {
        (*newest).max(seen)
    };
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
    if let Some(writer) = current.filter(|&w| !fenced[w]) {
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
        choose_writer(
            0..n.len(),
            n,
            &mut vec![false; n.len()],
            &mut None,
            current,
            failback,
        )
    }

    /// Chooses with remembered fences and newest timeline, as the checker does.
    struct Group {
        fenced: Vec<bool>,
        newest: Option<u64>,
    }

    impl Group {
        fn new(size: usize) -> Self {
            Self {
                fenced: vec![false; size],
                newest: None,
            }
        }

        fn choose(&mut self, n: &[NodeHealth], current: Option<usize>) -> Option<usize> {
            choose_writer(
                0..n.len(),
                n,
                &mut self.fenced,
                &mut self.newest,
                current,
                Failback::Sticky,
            )
        }
    }

    /// `cluster(roles)` with timelines (0: none).
    fn on_timelines(roles: &str, timelines: &[u64]) -> Vec<NodeHealth> {
        let mut n = cluster(roles);
        for (node, &t) in n.iter_mut().zip(timelines) {
            node.timeline = (t > 0).then_some(t);
        }
        n
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
            choose_writer(1..3, &n, &mut [false; 3], &mut None, None, Failback::Sticky),
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
        let mut group = Group::new(3);
        assert_eq!(group.choose(&cluster("PSP"), Some(2)), Some(2));
        assert_eq!(group.fenced, [true, false, false]);
        // The writer fails: the fenced rival never gets the writes.
        assert_eq!(group.choose(&cluster("PSD"), Some(2)), None);
        // It rejoins as a standby: the fence lifts.
        assert_eq!(group.choose(&cluster("SSP"), Some(2)), Some(2));
        assert_eq!(group.fenced, [false; 3]);
    }

    #[test]
    fn the_newest_timeline_wins_at_once() {
        // failover2 promoted while the old primary still runs and answers
        // (a partition between the database nodes).
        let mut group = Group::new(3);
        assert_eq!(group.choose(&on_timelines("PSS", &[1]), None), Some(0));
        let partitioned = on_timelines("PSP", &[1, 0, 2]);
        assert_eq!(
            group.choose(&partitioned, Some(0)),
            Some(2),
            "no waiting for a failure"
        );
        assert_eq!(group.fenced, [true, false, false]);
        // It stays fenced, also while the new writer is down ...
        assert_eq!(
            group.choose(&on_timelines("PSD", &[1, 0, 2]), Some(2)),
            None
        );
        assert_eq!(group.fenced, [true, false, false]);
        // ... until it reports standby (rewound and rejoined) ...
        assert_eq!(
            group.choose(&on_timelines("SSP", &[0, 0, 2]), Some(2)),
            Some(2)
        );
        assert_eq!(group.fenced, [false; 3]);
        // ... or a timeline above every other primary's (promoted again).
        let mut group = Group::new(3);
        group.choose(&on_timelines("PSP", &[1, 0, 2]), Some(2));
        assert_eq!(group.fenced, [true, false, false]);
        assert_eq!(
            group.choose(&on_timelines("PSP", &[3, 0, 2]), Some(2)),
            Some(0)
        );
        assert_eq!(group.fenced, [false, false, true]);
    }

    #[test]
    fn equal_timelines_keep_the_current_writer() {
        let mut group = Group::new(2);
        assert_eq!(group.choose(&on_timelines("PP", &[2, 2]), Some(1)), Some(1));
        assert_eq!(group.fenced, [true, false]);
    }

    #[test]
    fn a_fresh_chooser_picks_the_newest_promotion() {
        let mut group = Group::new(3);
        assert_eq!(
            group.choose(&on_timelines("PSP", &[1, 0, 2]), None),
            Some(2)
        );
        assert_eq!(group.fenced, [true, false, false]);
    }

    #[test]
    fn the_newest_timeline_is_remembered_while_its_primary_is_down() {
        let mut group = Group::new(2);
        group.choose(&on_timelines("DP", &[1, 2]), Some(1));
        // The newer primary goes down; the older one, up, stays fenced.
        assert_eq!(group.choose(&on_timelines("PD", &[1, 2]), Some(1)), None);
        assert_eq!(group.newest, Some(2));
        assert_eq!(group.fenced, [true, false]);
        // Every member answers and none is on timeline 2: forgotten (the
        // cluster was taken back on purpose).
        assert_eq!(group.choose(&on_timelines("PS", &[1, 0]), Some(1)), Some(0));
        assert_eq!(group.newest, Some(1));
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

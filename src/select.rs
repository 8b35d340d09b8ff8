//! Writer selection: which node of a group takes writes.

use std::ops::Range;

use crate::config::Failback;
use crate::state::NodeHealth;

/// The group's writer after a probe round, or `None` when no member is up.
///
/// Sticky by default: writes stay on the current writer while it is up, even
/// when a higher-priority node comes back, because that node may hold stale
/// or diverged data and flipping back would split writes between servers.
/// `Failback::Auto` returns to the highest-priority node that is up.
pub fn choose_writer(
    members: Range<usize>,
    nodes: &[NodeHealth],
    current: Option<usize>,
    failback: Failback,
) -> Option<usize> {
    if failback == Failback::Sticky {
        if let Some(writer) = current.filter(|&w| nodes[w].is_up()) {
            return Some(writer);
        }
    }
    members.into_iter().find(|&i| nodes[i].is_up())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Health;

    fn nodes(states: &[Health]) -> Vec<NodeHealth> {
        states
            .iter()
            .map(|&health| NodeHealth {
                health,
                ..NodeHealth::default()
            })
            .collect()
    }

    use Health::{Down, Unknown, Up};

    #[test]
    fn first_up_in_priority_order() {
        let n = nodes(&[Down, Up, Up]);
        assert_eq!(choose_writer(0..3, &n, None, Failback::Sticky), Some(1));
        let n = nodes(&[Unknown, Down, Up]);
        assert_eq!(choose_writer(0..3, &n, None, Failback::Sticky), Some(2));
    }

    #[test]
    fn sticky_writer_stays_when_primary_returns() {
        let n = nodes(&[Up, Up, Up]);
        assert_eq!(choose_writer(0..3, &n, Some(1), Failback::Sticky), Some(1));
    }

    #[test]
    fn sticky_writer_moves_when_it_fails() {
        let n = nodes(&[Up, Down, Up]);
        assert_eq!(choose_writer(0..3, &n, Some(1), Failback::Sticky), Some(0));
    }

    #[test]
    fn auto_failback_returns_to_priority() {
        let n = nodes(&[Up, Up, Up]);
        assert_eq!(choose_writer(0..3, &n, Some(1), Failback::Auto), Some(0));
    }

    #[test]
    fn all_down_has_no_writer() {
        let n = nodes(&[Down, Down, Unknown]);
        assert_eq!(choose_writer(0..3, &n, Some(0), Failback::Sticky), None);
        assert_eq!(choose_writer(0..3, &n, None, Failback::Auto), None);
    }

    #[test]
    fn only_the_group_members_count() {
        let n = nodes(&[Up, Down, Up]);
        assert_eq!(choose_writer(1..3, &n, None, Failback::Sticky), Some(2));
    }
}

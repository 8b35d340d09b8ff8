//! `status()` rows as a named record: what the checker knows of one alias,
//! never its credentials.

use std::time::UNIX_EPOCH;

use pyo3::prelude::*;

use super::runtime::Runtime;
use crate::engines::Role;

/// One alias's health, as `dbha.status()` builds its `NodeStatus` from.
#[pyclass(frozen, get_all, module = "dbha._core")]
pub struct NodeRecord {
    alias: String,
    group: String,
    state: &'static str,
    role: &'static str,
    /// Seconds the last probe took.
    latency: Option<f64>,
    /// Replication lag in seconds, as last measured.
    lag: Option<f64>,
    timeline: Option<u64>,
    last_error: Option<String>,
    /// Seconds since the epoch.
    checked_at: Option<f64>,
    successes: u32,
    failures: u32,
    is_writer: bool,
    /// A primary fenced off from writes (older timeline or split brain).
    split_brain: bool,
}

pub fn records(runtime: &Runtime, group: Option<usize>) -> Vec<NodeRecord> {
    let config = runtime.config();
    let snapshot = runtime.checker.snapshot();
    config
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, node)| group.is_none_or(|g| g == node.group))
        .map(|(i, node)| {
            let health = &snapshot.nodes[i];
            NodeRecord {
                alias: node.alias.clone(),
                group: config.groups[node.group].name.clone(),
                state: health.health.as_str(),
                role: match health.role {
                    Some(Role::Primary) => "primary",
                    Some(Role::Standby) => "standby",
                    None => "unknown",
                },
                latency: health.latency.map(|l| l.as_secs_f64()),
                lag: health.lag.map(|l| l.as_secs_f64()),
                timeline: health.timeline,
                last_error: health.last_error.as_ref().map(ToString::to_string),
                checked_at: health
                    .checked_at
                    .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs_f64()),
                successes: health.successes,
                failures: health.failures,
                is_writer: snapshot.writers[node.group] == Some(i),
                split_brain: snapshot.fenced[i],
            }
        })
        .collect()
}

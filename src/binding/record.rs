//! `status()` rows as named records: what the checker knows of one alias
//! and of one group, never credentials.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use pyo3::prelude::*;

use super::runtime::Runtime;
use crate::checker::Route;
use crate::engines::Role;
use crate::net::Failure;

/// One alias's health, as `dbha.status()` builds its `NodeStatus` from.
#[pyclass(frozen, get_all, module = "dbha._core")]
pub struct NodeRecord {
    alias: String,
    group: String,
    /// `host:port` or the socket path: never a user or password.
    endpoint: String,
    state: &'static str,
    /// Seconds since the epoch at which `state` last changed.
    since: Option<f64>,
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
    /// Reads of its group may go here now.
    is_reader: bool,
    /// A primary fenced off from writes (older timeline or split brain).
    split_brain: bool,
    /// Failed probes so far, by kind (`timeout`, `refused`...).
    probe_errors: HashMap<&'static str, u64>,
    /// Failure reports the application made for it so far.
    reports: u64,
}

/// One group's routing, as `dbha.group_status()` builds its `GroupStatus`.
#[pyclass(frozen, get_all, module = "dbha._core")]
pub struct GroupRecord {
    name: String,
    /// Its aliases, in priority order.
    aliases: Vec<String>,
    /// Where writes go: `None` while the group has no writer.
    writer: Option<String>,
    /// The alias `available_db()` answers while there is no writer (with
    /// `ON_ALL_DOWN="last"`).
    last_writer: Option<String>,
    /// `healthy`, `no_writer`, or `failing` (no writer, and the application
    /// reported the last one failing: requests fail at once).
    route: &'static str,
    /// Where reads go now (empty: to the writer).
    readers: Vec<String>,
    /// How often writes moved to another node.
    writer_changes: u64,
}

fn seconds(at: Option<SystemTime>) -> Option<f64> {
    at.and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

pub fn nodes(runtime: &Runtime, group: Option<usize>) -> Vec<NodeRecord> {
    let config = runtime.config();
    let snapshot = runtime.checker.snapshot();
    config
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, node)| group.is_none_or(|g| g == node.group))
        .map(|(i, node)| {
            let health = &snapshot.nodes[i];
            let members = &config.groups[node.group].members;
            NodeRecord {
                alias: node.alias.clone(),
                group: config.groups[node.group].name.clone(),
                endpoint: node.server.endpoint.to_string(),
                state: health.health.as_str(),
                since: seconds(health.since),
                role: match health.role {
                    Some(Role::Primary) => "primary",
                    Some(Role::Standby) => "standby",
                    None => "unknown",
                },
                latency: health.latency.map(|l| l.as_secs_f64()),
                lag: health.lag.map(|l| l.as_secs_f64()),
                timeline: health.timeline,
                last_error: health.last_error.as_ref().map(ToString::to_string),
                checked_at: seconds(health.checked_at),
                successes: health.successes,
                failures: health.failures,
                is_writer: snapshot.writers[node.group] == Some(i),
                is_reader: snapshot.readers[node.group] & (1 << (i - members.start)) != 0,
                split_brain: snapshot.fenced[i],
                probe_errors: Failure::KINDS
                    .iter()
                    .zip(snapshot.probe_errors[i])
                    .filter(|(_, count)| *count > 0)
                    .map(|(kind, count)| (*kind, count))
                    .collect(),
                reports: snapshot.reports[i],
            }
        })
        .collect()
}

pub fn groups(runtime: &Runtime, group: Option<usize>) -> Vec<GroupRecord> {
    let config = runtime.config();
    let snapshot = runtime.checker.snapshot();
    let alias = |i: usize| config.nodes[i].alias.clone();
    config
        .groups
        .iter()
        .enumerate()
        .filter(|(g, _)| group.is_none_or(|only| only == *g))
        .map(|(g, spec)| GroupRecord {
            name: spec.name.clone(),
            aliases: spec.members.clone().map(alias).collect(),
            writer: snapshot.writers[g].map(alias),
            last_writer: Some(alias(snapshot.route(config, g).node())),
            route: match snapshot.route(config, g) {
                Route::Healthy(_) => "healthy",
                Route::AllDown(_) => "no_writer",
                Route::Failing(_) => "failing",
            },
            readers: spec
                .members
                .clone()
                .filter(|&i| snapshot.readers[g] & (1 << (i - spec.members.start)) != 0)
                .map(alias)
                .collect(),
            writer_changes: snapshot.writer_changes[g],
        })
        .collect()
}

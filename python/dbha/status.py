"""What the checker knows, as Python records: `status()` per alias,
`group_status()` per group, and `check_now()`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from dbha import _core


def _time(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


@dataclass(frozen=True)
class NodeStatus:
    """What the checker knows of one alias. Never holds credentials."""

    alias: str
    group: str
    #: `host:port`, or the unix socket's path: never a user or password.
    endpoint: str
    #: "unknown" (not probed yet), "up" or "down".
    state: str
    #: When `state` last changed (None: not yet decided).
    since: datetime | None
    #: "primary", "standby" or "unknown" (not probed with `role`, or never
    #: reached); the last role seen, kept while the node is down.
    role: str
    #: Duration of the last probe in seconds.
    latency: float | None
    #: A standby's replication lag in seconds, as last measured (None:
    #: unknown). Reads go to it only while this plus the time since
    #: `checked_at` is within `MAX_REPLICA_LAG`.
    lag: float | None
    #: A primary's timeline (PostgreSQL), or the GTID sequence number at
    #: which it began taking writes (MariaDB): of two primaries, the newest
    #: promotion has the higher one. None for standbys and other engines.
    timeline: int | None
    #: Why the last probe failed (None if it succeeded): "connection
    #: refused", "timeout", "DNS failure: ...", "bad handshake: ...", ...
    last_error: str | None
    checked_at: datetime | None
    #: Consecutive successful / failed probes.
    successes: int
    failures: int
    #: Whether writes of the group go here now.
    is_writer: bool
    #: Whether reads of the group may go here now.
    is_reader: bool
    #: A primary kept out of writes, until it reports standby: a promotion
    #: abandoned it (an older timeline), or another primary of its group on
    #: the same timeline takes the writes (split brain).
    split_brain: bool
    #: Failed probes since the process started, by kind: "timeout",
    #: "refused", "auth"... (kinds never seen are left out).
    probe_errors: dict[str, int]
    #: Failures the application reported for it (`report_failure()`, the
    #: dbha database backends) since the process started.
    reports: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GroupStatus:
    """Where one group's writes and reads go."""

    name: str
    #: Its aliases, in priority order.
    aliases: list[str]
    #: Where writes go; None while no node takes them.
    writer: str | None
    #: What `available_db()` answers while there is no writer (with
    #: `ON_ALL_DOWN="last"`): the last writer, or the first alias.
    last_writer: str | None
    #: "healthy"; "no_writer"; or "failing": no writer, and the application
    #: reported the last one failing, so requests fail at once.
    route: str
    #: Where reads go now (empty: to the writer).
    readers: list[str]
    #: How often writes moved to another node since the process started.
    writer_changes: int
    nodes: list[NodeStatus]

    @property
    def healthy(self) -> bool:
        return self.route == "healthy"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "healthy": self.healthy}


def status(group: str | None = None) -> list[NodeStatus]:
    """One record per alias (of `group`), in priority order."""
    return [
        NodeStatus(
            alias=record.alias,
            group=record.group,
            endpoint=record.endpoint,
            state=record.state,
            since=_time(record.since),
            role=record.role,
            latency=record.latency,
            lag=record.lag,
            timeline=record.timeline,
            last_error=record.last_error,
            checked_at=_time(record.checked_at),
            successes=record.successes,
            failures=record.failures,
            is_writer=record.is_writer,
            is_reader=record.is_reader,
            split_brain=record.split_brain,
            probe_errors=dict(record.probe_errors),
            reports=record.reports,
        )
        for record in _core.status(group)
    ]


def group_status(group: str | None = None) -> list[GroupStatus]:
    """One record per group (or for `group`), with its nodes' status."""
    nodes = status(group)
    return [
        GroupStatus(
            name=record.name,
            aliases=list(record.aliases),
            writer=record.writer,
            last_writer=record.last_writer,
            route=record.route,
            readers=list(record.readers),
            writer_changes=record.writer_changes,
            nodes=[node for node in nodes if node.group == record.name],
        )
        for record in _core.group_status(group)
    ]


def check_now(group: str | None = None) -> list[NodeStatus]:
    """Probes `group` (or every group) now, waits for the result (at most
    about twice `CONNECT_TIMEOUT`), and returns the status."""
    _core.check_now(group)
    return status(group)

"""Per-alias health as Python records: `status()` and `check_now()`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from dbha import _core


@dataclass(frozen=True)
class NodeStatus:
    """What the checker knows of one alias. Never holds credentials."""

    alias: str
    group: str
    #: "unknown" (not probed yet), "up" or "down".
    state: str
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
    #: A primary kept out of writes, until it reports standby: a promotion
    #: abandoned it (an older timeline), or another primary of its group on
    #: the same timeline takes the writes (split brain).
    split_brain: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def status(group: str | None = None) -> list[NodeStatus]:
    """One record per alias (of `group`), in priority order."""
    return [
        NodeStatus(
            alias=record.alias,
            group=record.group,
            state=record.state,
            role=record.role,
            latency=record.latency,
            lag=record.lag,
            timeline=record.timeline,
            last_error=record.last_error,
            checked_at=None
            if record.checked_at is None
            else datetime.fromtimestamp(record.checked_at, timezone.utc),
            successes=record.successes,
            failures=record.failures,
            is_writer=record.is_writer,
            split_brain=record.split_brain,
        )
        for record in _core.status(group)
    ]


def check_now(group: str | None = None) -> list[NodeStatus]:
    """Probes `group` (or every group) now, waits for the result (at most
    about twice `CONNECT_TIMEOUT`), and returns the status."""
    _core.check_now(group)
    return status(group)

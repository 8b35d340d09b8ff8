"""Network-fault scenarios against dbha under Django ORM load, on a
`localdb.PgCluster` whose servers live in `localnet.LocalNet` namespaces:
the fault, the promotion and the heal, and what the application and each
server saw. tests/test_network.py asserts on the outcome;
benches/network_faults.py prints it.

The caller configures Django: aliases `default`, `failover1`, `failover2`
pointing at the cluster's primary and standbys, routed by dbha.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dbha
from localdb import PgCluster
from localnet import LocalNet

ALIASES = ("default", "failover1", "failover2")

SCENARIOS = {
    "partition": "partition of the primary, failover2 promoted, healed",
    "cut": "primary cut off from the standbys only, failover2 promoted, healed",
    "lossy-standby": "loss and latency on failover1's link, healed",
    "lossy-primary": "loss and latency on the primary's link, healed",
}
#: A read may be this much staler than MAX_REPLICA_LAG and still count as
#: within it: acknowledgement order is only close to commit order.
STALE_TOLERANCE = 0.1
#: How late the watcher may record what `available_db()` answers, on a
#: loaded machine.
WATCH_LATE = 0.25


@dataclass
class Timing:
    """Seconds each phase lasts."""

    steady: float = 2.0  # load before the fault
    promote_after: float = 3.0  # fault to pg_promote()
    after: float = 2.0  # promotion to heal
    degraded: float = 8.0  # how long loss and latency last
    healed: float = 3.0  # heal to the end


@dataclass
class Netem:
    """`tc netem` for each direction of one link."""

    delay_ms: int = 100
    jitter_ms: int = 30
    loss_pct: float = 20.0

    def __str__(self) -> str:
        return f"{self.loss_pct:g} % loss, {self.delay_ms} ± {self.jitter_ms} ms each way"


@dataclass
class Op:
    kind: str  # "write" or "read"
    started: float
    ended: float
    ok: bool
    alias: str = ""  # write: who acknowledged it; read: who served it
    note: str = ""  # write: the row's note; read: the newest row's note it saw


@dataclass
class Outcome:
    """What happened, times in `time.monotonic()`; derived figures below."""

    scenario: str
    max_lag: float
    fault_at: float
    promoting: float | None = None  # pg_promote() called
    promoted: float | None = None  # pg_promote() returned
    healed_at: float = 0.0
    ended_at: float = 0.0
    ops: list[Op] = field(default_factory=list)
    #: (when, what available_db() answered, None for NoHealthyDatabase).
    writers: list[tuple[float, str | None]] = field(default_factory=list)
    #: (when, alias, state, split_brain) each time one of them changed.
    nodes: list[tuple[float, str, str, bool]] = field(default_factory=list)
    #: Signals received: (when, name, alias or new writer).
    signals: list[tuple[float, str, str | None]] = field(default_factory=list)
    down_reasons: list[str] = field(default_factory=list)  # of the node_down signals
    probe_errors: dict[str, dict[str, int]] = field(default_factory=dict)
    writer_changes: int = 0
    held: dict[str, set[str]] = field(default_factory=dict)  # alias -> notes it holds
    final_writer: str | None = None
    final_split_brain: dict[str, bool] = field(default_factory=dict)

    # --- derived ----------------------------------------------------------------------------

    def writes(self) -> list[Op]:
        return [op for op in self.ops if op.kind == "write"]

    def first(self, alias: str, state: str, since: float) -> float | None:
        """When `alias` was first seen in `state` ("down", "fenced", "up") from `since` on."""
        for at, a, st, fenced in self.nodes:
            if a == alias and at >= since and (fenced if state == "fenced" else st == state):
                return at
        return None

    def switched_at(self) -> float | None:
        """When available_db() first answered failover2, from the promotion call on."""
        if self.promoting is None:
            return None
        return next(
            (at for at, w in self.writers if w == "failover2" and at >= self.promoting), None
        )

    def first_write_on(self, alias: str, since: float) -> float | None:
        return min(
            (op.ended for op in self.writes() if op.ok and op.alias == alias and op.ended >= since),
            default=None,
        )

    def final_primary(self) -> str:
        return "failover2" if self.promoted is not None else "default"

    def on_non_primary(self) -> list[Op]:
        """Acknowledged writes that went to a node that was not the primary
        dbha should have sent them to: a standby (failover1 always,
        failover2 before its promotion), or the old primary after dbha had
        switched to the new one (started after the switch)."""
        switched = self.switched_at()
        return [
            op
            for op in self.writes()
            if op.ok
            and (
                op.alias == "failover1"
                or (
                    op.alias == "failover2"
                    and (self.promoting is None or op.started < self.promoting)
                )
                or (op.alias == "default" and switched is not None and op.started >= switched)
            )
        ]

    def missing(self) -> list[Op]:
        """Acknowledged writes the final primary does not hold."""
        held = self.held.get(self.final_primary(), set())
        return [op for op in self.writes() if op.ok and op.note not in held]

    def explained(self, op: Op) -> bool:
        """Whether asynchronous replication explains a missing write: the old
        primary acknowledged it in the last second before a partition, or
        (cut) after replication was cut and before writes moved."""
        if op.alias != "default":
            return False
        if self.scenario == "partition":
            return self.fault_at - 1.0 <= op.ended <= self.fault_at + 0.1
        if self.scenario == "cut":
            switched = self.switched_at() or self.ended_at
            return self.fault_at - 1.0 <= op.ended and op.started < switched
        return False

    def lost_after_promotion(self) -> list[Op]:
        """Writes the old primary acknowledged from the promotion call on."""
        if self.promoting is None:
            return []
        return [
            op
            for op in self.writes()
            if op.ok and op.alias == "default" and op.ended >= self.promoting
        ]

    def history(self) -> list[Op]:
        """The legitimate primary's acknowledged writes, in acknowledgement
        order: the old primary's until the promotion, then failover2's."""
        acked = [
            op
            for op in self.writes()
            if op.ok
            and (
                (op.alias == "default" and (self.promoting is None or op.ended < self.promoting))
                or (
                    op.alias == "failover2"
                    and self.promoting is not None
                    and op.started >= self.promoting
                )
            )
        ]
        return sorted(acked, key=lambda op: op.ended)

    def staleness(self) -> list[tuple[Op, float]]:
        """For each read a standby served: how long before the read began
        the first write it lacked was acknowledged (0: it lacked none)."""
        history = self.history()
        acked_at = [op.ended for op in history]
        by_note = {op.note: op for op in self.writes()}
        out = []
        for read in self.ops:
            # A read on the writer, or on the node about to be seen as the
            # writer (the watcher polls, and may be late under load), is no
            # standby read.
            writers = {self.writer_at(read.started), self.writer_at(read.ended + WATCH_LATE)}
            if read.kind != "read" or not read.ok or read.alias in writers:
                continue
            seen = by_note.get(read.note)
            # It holds every write acknowledged before the newest row it shows was.
            known = seen.ended if seen is not None else float("-inf")
            i = bisect.bisect_right(acked_at, known)
            lacked = acked_at[i] if i < len(acked_at) else float("inf")
            out.append((read, max(0.0, read.started - lacked)))
        return out

    def writer_at(self, at: float) -> str | None:
        """What available_db() answered last before `at`."""
        answer = None
        for when, writer in self.writers:
            if when > at:
                break
            answer = writer
        return answer

    def stale_reads(self) -> list[tuple[Op, float]]:
        """Standby reads staler than MAX_REPLICA_LAG."""
        limit = self.max_lag + STALE_TOLERANCE
        return [(op, s) for op, s in self.staleness() if s > limit]

    def transitions(self, name: str, alias: str | None = None) -> int:
        return sum(n == name and (alias is None or a == alias) for _, n, a in self.signals)


# --- load ---------------------------------------------------------------------------------------


def served_by() -> str:
    """The alias this thread's last query ran on: the one connection open."""
    from django.db import connections

    return next((a for a in ALIASES if connections[a].connection is not None), "")


class Load:
    """`writers` threads creating a row each, and a thread reading the
    newest row, each operation on a fresh connection, through the router."""

    def __init__(self, model: Any, field_name: str, writers: int, tag: str) -> None:
        self.model = model
        self.field = field_name
        self.writers = writers
        self.tag = tag  # notes are unique across runs on one table
        self.ops: list[Op] = []
        self._lock = threading.Lock()

    def _one(self, kind: str, action: Callable[[], tuple[str, str]], note: str = "") -> None:
        """Runs `action`, which returns (note, alias), and records it."""
        from django.db import connections

        started = time.monotonic()
        op = Op(kind, started, started, False, note=note)
        try:
            op.note, op.alias = action()
            op.ended = time.monotonic()
            op.ok = True
        except Exception:
            op.ended = time.monotonic()
        finally:
            connections.close_all()
        with self._lock:
            self.ops.append(op)

    def _write(self, note: str) -> tuple[str, str]:
        row = self.model.objects.create(**{self.field: note})
        return note, row._state.db

    def _read(self) -> tuple[str, str]:
        newest = self.model.objects.order_by("-pk").values_list(self.field, flat=True).first()
        return newest or "", served_by()

    @contextmanager
    def running(self, seconds_max: float) -> Iterator[Load]:
        stop = threading.Event()
        deadline = time.monotonic() + seconds_max

        def writer(n: int) -> None:
            for i in range(1_000_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                note = f"{self.tag}{n}-{i}"
                self._one("write", lambda note=note: self._write(note), note)  # type: ignore[misc]
                time.sleep(0.005)

        def reader() -> None:
            for _ in range(1_000_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                self._one("read", self._read)
                time.sleep(0.005)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(self.writers)]
        threads.append(threading.Thread(target=reader))
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)


@contextmanager
def watching(outcome: Outcome, seconds_max: float) -> Iterator[None]:
    """Records what dbha answers and shows (every 5 ms), and its signals."""
    from dbha import signals

    stop = threading.Event()
    deadline = time.monotonic() + seconds_max

    def watch() -> None:
        last_writer: object = object()
        last_nodes: dict[str, tuple[str, bool]] = {}
        while not stop.wait(0.005) and time.monotonic() < deadline:
            now = time.monotonic()
            try:
                writer: str | None = dbha.available_db()
            except dbha.NoHealthyDatabase:
                writer = None
            if writer != last_writer:
                outcome.writers.append((now, writer))
                last_writer = writer
            for node in dbha.status():
                seen = (node.state, node.split_brain)
                if last_nodes.get(node.alias) != seen:
                    outcome.nodes.append((now, node.alias, *seen))
                    last_nodes[node.alias] = seen

    def receiver(name: str) -> Callable[..., None]:
        def receive(sender: Any, **kwargs: Any) -> None:
            who = kwargs.get("alias") or kwargs.get("new") or kwargs.get("writer")
            outcome.signals.append((time.monotonic(), name, who))
            if name == "node_down":
                outcome.down_reasons.append(str(kwargs.get("reason")))

        return receive

    connected = {
        name: receiver(name) for name in ("node_down", "node_up", "writer_changed", "split_brain")
    }
    for name, fn in connected.items():
        getattr(signals, name).connect(fn, dispatch_uid=f"netfaults-{name}")
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=10)
        for name in connected:
            getattr(signals, name).disconnect(dispatch_uid=f"netfaults-{name}")


# --- scenarios ----------------------------------------------------------------------------------


def notes_on(server: Any, table: str, field_name: str) -> set[str]:
    out = server.query(f"select {field_name} from {table}", timeout=60)
    return set(out.splitlines())


def run(
    scenario: str,
    net: LocalNet,
    cluster: PgCluster,
    model: Any,
    field_name: str,
    dbha_settings: dict[str, Any],
    timing: Timing | None = None,
    netem: Netem | None = None,
    writers: int = 2,
) -> Outcome:
    """One scenario on a fresh, healthy `cluster` (it may promote failover2)."""
    from django.test import override_settings

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    timing = timing or Timing()
    netem = netem or Netem()
    cluster.wait_replayed()  # a healthy start: every standby streaming and caught up
    failover2 = cluster.servers[2]
    hosts = dict(zip(ALIASES, net.hosts, strict=True))
    settings = {"READS": "replicas", **dbha_settings}
    longest = (
        timing.steady + timing.promote_after + timing.after + timing.degraded + timing.healed + 60
    )
    with override_settings(DBHA=settings):  # restarts dbha with these
        outcome = Outcome(scenario, float(settings.get("MAX_REPLICA_LAG", 5.0)), 0.0)
        dbha.available_db()  # the first round, before the load starts
        load = Load(model, field_name, writers, tag=f"{scenario}-{time.monotonic_ns()}-")
        try:
            with watching(outcome, longest), load.running(longest):
                time.sleep(timing.steady)
                outcome.fault_at = time.monotonic()
                if scenario == "partition":
                    net.partition(hosts["default"])
                elif scenario == "cut":
                    net.cut(hosts["default"], [hosts["failover1"], hosts["failover2"]])
                else:
                    victim = hosts["failover1" if scenario == "lossy-standby" else "default"]
                    net.degrade(victim, netem.delay_ms, netem.jitter_ms, netem.loss_pct)
                if scenario in ("partition", "cut"):
                    time.sleep(timing.promote_after)
                    outcome.promoting = time.monotonic()
                    failover2.promote()  # over its unix socket: no fault reaches it
                    outcome.promoted = time.monotonic()
                    time.sleep(timing.after)
                else:
                    time.sleep(timing.degraded)
                for host in net.hosts:
                    net.heal(host)
                outcome.healed_at = time.monotonic()
                time.sleep(timing.healed)
                outcome.ended_at = time.monotonic()
        finally:
            for host in net.hosts:
                net.heal(host)
        outcome.ops = sorted(load.ops, key=lambda op: op.started)
        table = model._meta.db_table
        outcome.held = {
            alias: notes_on(server, table, field_name)
            for alias, server in zip(ALIASES, cluster.servers, strict=True)
        }
        for node in dbha.status():
            outcome.probe_errors[node.alias] = dict(node.probe_errors)
            outcome.final_split_brain[node.alias] = node.split_brain
        group = dbha.group_status()[0]
        outcome.writer_changes = group.writer_changes
        outcome.final_writer = group.writer
        dbha.close()
    return outcome

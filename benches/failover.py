"""Failover benchmark on a real PostgreSQL primary and two streaming
standbys, under Django ORM load: threads that each write a row and read it
back, each operation on a fresh connection (CONN_MAX_AGE=0, libpq
connect_timeout 2 s). Default DBHA settings unless stated.

Failover scenarios: the fault at t = --steady, `failover2` promoted
--promote-after seconds later (`failover1` stays a standby):

    kill, kill-unreported           kill -9 of the whole primary
    hang, hang-unreported           SIGSTOP of every process of the primary
    listener, listener-unreported   SIGSTOP of the postmaster only: its
                                    sessions answer, new connections hang
    alive                           no fault: failover2 is promoted while the
                                    old primary keeps running, reachable
    rejoin                          kill -9, then the old primary rejoins as a
                                    standby (pg_rewind)
    split                           kill -9, then the old primary is back
                                    un-rewound: a second primary

(The application's connections go through dbha's backend,
`dbha.backends.postgresql`, which reports failed connects, lost sessions
and read-only errors to dbha; "-unreported": through Django's own backend,
which reports nothing.)

Replica-read scenarios, no failover: READS="replicas", MAX_REPLICA_LAG=1,
replay paused on failover1 at t = --steady while writes go on, plus
--readers threads that only read (the newest row):

    replicas                        READ_YOUR_WRITES on (the default)
    replicas-no-ryw                 READ_YOUR_WRITES off

Also counted: the new server connections steady-state probing opens.

Failover columns, times relative to pg_promote() returning (negative: while
it ran): when `available_db()` first answered failover2; the first write
failover2 acknowledged; writes acknowledged by a non-primary (failover1,
failover2 before pg_promote() was called, the old primary after its fault);
with the old primary alive, its acknowledgements from the pg_promote() call
on (lost, and the latest); writes the old primary took after it came back
stale; acknowledged writes failover2 does not hold at the end (asynchronous
replication's losses; with the old primary alive, the writes really lost).
Replica-read columns: where reads went, failover1's reads routed more than
MAX_REPLICA_LAG after the commit time of the last transaction it replayed,
and read-backs that did not find the row the thread had just written.

    python benches/failover.py [--threads 2] [--readers 1] [--steady 4]
        [--promote-after 2] [--scenarios kill,alive,...] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import localdjango

import dbha
import localdb

FAILOVERS = {
    "kill": "kill -9",
    "hang": "SIGSTOP, whole server",
    "listener": "SIGSTOP, postmaster only",
    "alive": "none: old primary alive",
    "rejoin": "kill -9, old primary rejoins",
    "split": "kill -9, old primary back stale",
}
# READ_YOUR_WRITES per replica-read scenario.
REPLICA_RUNS = {"replicas": True, "replicas-no-ryw": False}
ALL = [
    "kill",
    "kill-unreported",
    "hang",
    "hang-unreported",
    "listener",
    "listener-unreported",
    "alive",
    "rejoin",
    "split",
    "replicas",
    "replicas-no-ryw",
]
QUICK = ["kill-unreported", "hang-unreported", "listener-unreported", "alive", *REPLICA_RUNS]
MAX_REPLICA_LAG = 1.0
# Longer than any one operation can take on a server that answers (libpq
# connect_timeout 2 s): an operation this long was stuck on a hung server.
STUCK = 5.0


@dataclass
class Operation:
    kind: str  # "write", "read" (read-back of the row the thread just wrote), "browse"
    started: float
    ended: float  # when it was acknowledged (or failed), before the connection closed
    alias: str  # where it went: for writes the alias that acknowledged it
    ok: bool
    note: str = ""
    found: bool = False  # reads: a row came back

    @property
    def latency(self) -> float:
        return self.ended - self.started


def served_by() -> str:
    """The alias this thread's operation ran on: the one connection open."""
    from django.db import connections

    return next((a for a in localdjango.ALIASES if connections[a].connection is not None), "")


@dataclass
class Load:
    """Threads doing a write then a read-back of that row, and `readers`
    threads reading the newest row, each operation on a fresh connection
    (as a request with CONN_MAX_AGE=0 would), through dbha's backend
    (`report_failures`) or Django's."""

    model: Any
    threads: int
    report_failures: bool
    readers: int = 0
    operations: list[Operation] = field(default_factory=list)

    def _one(self, kind: str, action: Callable[[], Any], note: str = "") -> None:
        from django.db import connections

        started = time.monotonic()
        alias, ok, found = "", False, False
        try:
            result = action()
            ended = time.monotonic()
            ok, found = True, result is not None
            alias = result._state.db if kind == "write" else served_by()
        except Exception:
            ended = time.monotonic()
        finally:
            connections.close_all()
        self.operations.append(Operation(kind, started, ended, alias, ok, note, found))

    @contextmanager
    def running(self) -> Iterator[Load]:
        stop = threading.Event()
        engine = localdjango.REPORTING_ENGINE if self.report_failures else localdjango.PLAIN_ENGINE
        localdjango.use_engine(engine)

        def worker(n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                note = f"{n}-{i}"
                self._one("write", partial(self.model.objects.create, note=note), note)
                self._one("read", self.model.objects.filter(note=note).first, note)

        def reader() -> None:
            while not stop.is_set():
                self._one("browse", self.model.objects.order_by("-pk").first)

        pool = [threading.Thread(target=worker, args=(n,)) for n in range(self.threads)]
        pool += [threading.Thread(target=reader) for _ in range(self.readers)]
        for thread in pool:
            thread.start()
        try:
            yield self
        finally:
            stop.set()
            for thread in pool:
                thread.join(timeout=60)

    def writes(self) -> list[Operation]:
        return [op for op in self.operations if op.kind == "write"]


@contextmanager
def watching_writer(switches: list[float]) -> Iterator[None]:
    """Records when `available_db()` turns to failover2: dbha's own switch,
    apart from the application's requests (which may be stuck connecting)."""
    stop = threading.Event()

    def watch() -> None:
        last = None
        while not stop.wait(0.002):
            try:
                alias = dbha.available_db()
            except dbha.NoHealthyDatabase:
                alias = None
            if alias == "failover2" and last != "failover2":
                switches.append(time.monotonic())
            last = alias

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=10)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def notes_on(server: localdb.PgServer, model: Any) -> set[str]:
    """Every row's note on `server`."""
    return set(server.query(f"select note from {model._meta.db_table}", timeout=60).splitlines())


@dataclass
class FailoverRow:
    scenario: str
    report: bool
    alive: bool  # the old primary kept running: acks by it after the promotion are lost
    switched: float | None
    resume: float | None
    failed: int
    stuck: int
    total: int
    by_non_primary: int
    # Acks by the old primary since pg_promote() was called, relative to its return.
    lost: list[float]
    flipped: int
    absent: int
    before: list[float]
    after: list[float]


def failover(
    name: str, cluster: localdb.PgCluster, model: Any, args: argparse.Namespace, report: bool
) -> FailoverRow:
    """Kill, hang or keep the primary, promote failover2, then (`rejoin`,
    `split`) bring the old primary back rejoined or stale."""
    primary, _, failover2 = cluster.servers
    fault: Callable[[], None] = {
        "kill": primary.kill,
        "hang": primary.pause,
        "listener": primary.pause_listener,
        "alive": lambda: None,
        "rejoin": primary.kill,
        "split": primary.kill,
    }[name]
    load = Load(model, args.threads, report)
    switches: list[float] = []  # when dbha's answer became failover2
    with load.running(), watching_writer(switches):
        time.sleep(args.steady)
        fault()
        # Once it has happened: kill() first lists the server's processes.
        failed_at = time.monotonic()
        time.sleep(args.promote_after)
        promoting = time.monotonic()
        failover2.promote()
        promoted = time.monotonic()
        returned = None
        if name in ("rejoin", "split"):
            time.sleep(1.0)
            if name == "rejoin":
                primary.rejoin(failover2)
            else:
                primary.start()  # un-rewound: a second primary
            returned = time.monotonic()
        time.sleep(args.steady)
        if name in ("hang", "listener"):
            # Before the load stops: frees requests stuck on it (a query sent
            # to a stopped server waits for ever; libpq has no query timeout).
            primary.kill()
    on_failover2 = notes_on(failover2, model)
    alive = name == "alive"
    writes = load.writes()
    switched = next((at - promoted for at in switches if at >= promoting), None)
    resumed = [
        op.ended for op in writes if op.ok and op.alias == "failover2" and op.ended >= promoting
    ]
    first_ok = min(resumed, default=None)
    # The legitimate primary: `default` until it failed (or, alive, until
    # the promotion), failover2 from its promotion on; failover1 never. A
    # write `default` acknowledged after it came back stale went to a second
    # primary; one it acknowledged, alive, after the promotion is lost.
    by_non_primary = sum(
        op.ok
        and (
            op.alias == "failover1"
            or (op.alias == "failover2" and op.started < promoting)
            or (not alive and op.alias == "default" and op.started > failed_at and returned is None)
        )
        for op in writes
    )
    # From the pg_promote() call on: failover2 leaves recovery during it.
    lost = [
        op.ended - promoted
        for op in writes
        if alive and op.ok and op.alias == "default" and op.ended >= promoting
    ]
    flipped = sum(
        op.ok and op.alias == "default" and returned is not None and op.started > failed_at
        for op in writes
    )
    return FailoverRow(
        scenario=FAILOVERS[name],
        report=report,
        alive=alive,
        switched=switched,
        resume=None if first_ok is None else first_ok - promoted,
        failed=sum(not op.ok for op in load.operations),
        stuck=sum(op.latency > STUCK for op in load.operations),
        total=len(load.operations),
        by_non_primary=by_non_primary,
        lost=lost,
        flipped=flipped,
        absent=sum(op.ok and op.note not in on_failover2 for op in writes),
        before=[op.latency for op in writes if op.ok and op.ended < failed_at],
        after=[op.latency for op in writes if op.ok and first_ok and op.started >= first_ok + 0.5],
    )


def pause_replay(standby: localdb.PgServer) -> float:
    """Pauses WAL replay on `standby` (it goes on receiving WAL) and returns
    the moment, in `time.monotonic()`, its data stopped: the commit time of
    the last transaction it replayed."""
    standby.query("select pg_wal_replay_pause()")
    deadline = time.monotonic() + 10
    while standby.query("select pg_get_wal_replay_pause_state()") != "paused":
        if time.monotonic() > deadline:
            raise localdb.LocalDbError(f"{standby.name}: replay not paused after 10 s")
        time.sleep(0.01)
    replayed = float(standby.query("select extract(epoch from pg_last_xact_replay_timestamp())"))
    return replayed - time.time() + time.monotonic()


@dataclass
class ReplicaRow:
    read_your_writes: bool
    read_backs: dict[str, int]  # per alias
    browses: dict[str, int]
    late: int  # reads by failover1 routed after its lag could pass MAX_REPLICA_LAG
    last_on_failover1: float | None  # its last read, after replay stopped
    stale: dict[str, int]  # read-backs that missed the row just written, per alias
    failed: int
    total: int


def replica_reads(
    cluster: localdb.PgCluster,
    model: Any,
    args: argparse.Namespace,
    settings: dict[str, Any],
    read_your_writes: bool,
) -> ReplicaRow:
    """READS="replicas", MAX_REPLICA_LAG=1: replay paused on failover1 while
    the writes go on; no failover."""
    from django.test import override_settings

    failover1 = cluster.servers[1]
    load = Load(model, args.threads, report_failures=True, readers=args.readers)
    dbha_settings = {
        **settings,
        "READS": "replicas",
        "MAX_REPLICA_LAG": MAX_REPLICA_LAG,
        "READ_YOUR_WRITES": read_your_writes,
    }
    with override_settings(DBHA=dbha_settings), load.running():  # restarts dbha
        time.sleep(args.steady)
        stopped = pause_replay(failover1)
        time.sleep(args.steady)
    reads = [op for op in load.operations if op.ok and op.kind in ("read", "browse")]

    def per_alias(ops: list[Operation]) -> dict[str, int]:
        return {alias: sum(op.alias == alias for op in ops) for alias in localdjango.ALIASES}

    on_failover1 = [op.started for op in reads if op.alias == "failover1"]
    return ReplicaRow(
        read_your_writes=read_your_writes,
        read_backs=per_alias([op for op in reads if op.kind == "read"]),
        browses=per_alias([op for op in reads if op.kind == "browse"]),
        late=sum(at > stopped + MAX_REPLICA_LAG for at in on_failover1),
        last_on_failover1=max(on_failover1) - stopped if on_failover1 else None,
        stale=per_alias([op for op in reads if op.kind == "read" and not op.found]),
        failed=sum(not op.ok for op in load.operations),
        total=len(load.operations),
    )


def steady_state_connections(cluster: localdb.PgCluster, seconds: float) -> float:
    """New server sessions per check interval while the checker runs idle,
    counted by PostgreSQL itself (pg_stat_database.sessions, less our own
    query)."""
    dbha.available_db()
    sql = "select sum(sessions) from pg_stat_database"
    before = [int(s.query(sql)) for s in cluster.servers]
    time.sleep(seconds)
    after = [int(s.query(sql)) for s in cluster.servers]
    new = sum(a - b - 1 for a, b in zip(after, before, strict=True))  # -1: the first query
    intervals = seconds / 1.0  # default CHECK_INTERVAL
    return new / intervals


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:+.3f} s"


def print_failovers(rows: list[FailoverRow]) -> None:
    print(
        "| scenario (fault) | failures reported by | dbha switches after promotion "
        "| writes resume on failover2 after promotion | failed ops "
        "| acked by a non-primary | lost: acked by the old primary after promotion began (latest) "
        "| flipped to a 2nd primary | acked, absent from failover2 "
        "| write p50 / p99 before | write p50 / p99 after | p99 after / before |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p99_before, p99_after = percentile(r.before, 0.99), percentile(r.after, 0.99)
        stuck = f" ({r.stuck} stuck > {STUCK:g} s)" if r.stuck else ""
        lost = "-"
        if r.alive:
            lost = f"{len(r.lost)} ({seconds(max(r.lost))})" if r.lost else "0"
        print(
            f"| {r.scenario} | {'dbha backend' if r.report else 'nobody'} | {seconds(r.switched)} "
            f"| {seconds(r.resume)} | {r.failed} of {r.total}{stuck} "
            f"| {r.by_non_primary} | {lost} | {r.flipped} | {r.absent} "
            f"| {percentile(r.before, 0.5) * 1000:.1f} / {p99_before * 1000:.1f} ms "
            f"| {percentile(r.after, 0.5) * 1000:.1f} / {p99_after * 1000:.1f} ms "
            f"| {p99_after / p99_before:.2f}x |"
        )


def print_replica_reads(rows: list[ReplicaRow]) -> None:
    def split(counts: dict[str, int]) -> str:
        return " / ".join(str(counts[alias]) for alias in localdjango.ALIASES)

    print(
        "| READ_YOUR_WRITES | read-backs on default / failover1 / failover2 "
        "| reader-thread reads on default / failover1 / failover2 "
        f"| failover1 reads > {MAX_REPLICA_LAG:g} s after its replay stopped "
        "| failover1's last read after its replay stopped "
        "| stale read-backs on default / failover1 / failover2 | failed ops |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {'on' if r.read_your_writes else 'off'} | {split(r.read_backs)} "
            f"| {split(r.browses)} | {r.late} | {seconds(r.last_on_failover1)} "
            f"| {split(r.stale)} | {r.failed} of {r.total} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="write + read-back threads")
    parser.add_argument(
        "--readers", type=int, default=1, help="read-only threads (replica-read scenarios)"
    )
    parser.add_argument("--steady", type=float, default=4.0, help="seconds before and after")
    parser.add_argument("--promote-after", type=float, default=2.0)
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated, from: {','.join(ALL)} (default: all of them)",
    )
    parser.add_argument("--quick", action="store_true", help=f"a few minutes: {','.join(QUICK)}")
    parser.add_argument(
        "--on-all-down", choices=["last", "raise"], default="last", help='DBHA["ON_ALL_DOWN"]'
    )
    args = parser.parse_args()
    names = args.scenarios.split(",") if args.scenarios else QUICK if args.quick else ALL
    known = {*ALL, *FAILOVERS, *(f"{name}-unreported" for name in FAILOVERS)}
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(unknown)}; known: {', '.join(ALL)}")

    # Django is configured once per process, so every cluster reuses the ports.
    ports = [localdb.free_port() for _ in localdjango.ALIASES]
    model = None
    failovers: list[FailoverRow] = []
    replicas: list[ReplicaRow] = []
    dbha_settings = {"ON_ALL_DOWN": args.on_all_down} if args.on_all_down != "last" else {}
    connections_per_interval = float("nan")
    for name in names:
        with localdb.PgCluster(standbys=2, ports=ports) as cluster:
            if model is None:
                model = localdjango.configure(cluster, dbha_settings or None)
                connections_per_interval = steady_state_connections(cluster, 10.0)
            else:
                localdjango.create_table(cluster, model)
            if name in REPLICA_RUNS:
                ryw = REPLICA_RUNS[name]
                replicas.append(replica_reads(cluster, model, args, dbha_settings, ryw))
            else:
                base = name.removesuffix("-unreported")
                failovers.append(failover(base, cluster, model, args, name == base))
            dbha.close()  # the next scenario starts from a fresh checker

    import django

    tuned = (
        f'DBHA["ON_ALL_DOWN"] = "{args.on_all_down}"' if dbha_settings else "default DBHA settings"
    )
    print(f"django-dbha {dbha.__version__}, Django {django.get_version()}, {tuned}")
    print(
        f"{args.threads} threads, each a write then a read-back of that row per connection, "
        "CONN_MAX_AGE=0, libpq connect_timeout 2 s"
    )
    if failovers:
        print(f"failover2 promoted {args.promote_after:g} s after the fault; times relative to "
              "pg_promote() returning")  # fmt: skip
        print()
        print_failovers(failovers)
    if replicas:
        print()
        print(f'READS="replicas", MAX_REPLICA_LAG={MAX_REPLICA_LAG:g}, no failover; replay '
              f"paused on failover1 after {args.steady:g} s, for {args.steady:g} s; "
              f"plus {args.readers} thread(s) reading the newest row")  # fmt: skip
        print()
        print_replica_reads(replicas)
    print()
    print(f"steady-state probing: {connections_per_interval:.2f} new server connections per "
          "interval (3 servers, pg_stat_database.sessions over 10 s)")  # fmt: skip
    dbha.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

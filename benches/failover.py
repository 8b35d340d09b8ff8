"""Failover benchmark on a real PostgreSQL primary and two streaming
standbys: ORM writes and reads from several threads (CONN_MAX_AGE=0), the
primary killed (kill -9) or hung (SIGSTOP), `failover2` promoted 2 s later;
then an old primary that rejoins, one that comes back stale (split brain),
and a count of the connections steady-state probing opens.

    python benches/failover.py [--threads 2] [--steady 4]
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


@dataclass
class Operation:
    kind: str  # "write" or "read"
    started: float
    ended: float
    alias: str  # where it went (writes: the alias that acknowledged it)
    ok: bool

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """Threads doing a write then a read, each on a fresh connection (as a
    request with CONN_MAX_AGE=0 would)."""

    model: Any
    threads: int
    report_failures: bool
    operations: list[Operation] = field(default_factory=list)

    def _one(self, kind: str, action: Callable[[], Any]) -> None:
        from django.db import connections

        started = time.monotonic()
        try:
            result = action()
            alias = result._state.db if kind == "write" else ""
            ok = True
        except Exception:
            alias, ok = "", False
            if self.report_failures:
                dbha.report_failure("default")  # re-probes the alias's whole group
        finally:
            connections.close_all()
        self.operations.append(Operation(kind, started, time.monotonic(), alias, ok))

    @contextmanager
    def running(self) -> Iterator[Load]:
        stop = threading.Event()

        def worker(n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                note = f"{n}-{i}"
                self._one("write", partial(self.model.objects.create, note=note))
                self._one("read", partial(self.model.objects.filter(note=note).first))

        pool = [threading.Thread(target=worker, args=(n,)) for n in range(self.threads)]
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


@dataclass
class Row:
    scenario: str
    report: bool
    resume: float | None
    switched: float | None
    failed: int
    total: int
    by_non_primary: int
    flipped: int
    before: list[float]
    after: list[float]


def failover(
    name: str, cluster: localdb.PgCluster, model: Any, args: argparse.Namespace, report: bool
) -> Row:
    """Kill or hang the primary, promote failover2, then (`rejoin`/`split`)
    bring the old primary back rejoined or stale."""
    primary, _, failover2 = cluster.servers
    load = Load(model, args.threads, report)
    switches: list[float] = []  # when dbha's answer became failover2
    with load.running(), watching_writer(switches):
        time.sleep(args.steady)
        failed_at = time.monotonic()
        (primary.pause if name == "hang" else primary.kill)()
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
    if name == "hang":
        primary.kill()
    writes = load.writes()
    switched = next((at - promoted for at in switches if at >= promoting), None)
    resumed = [op.ended for op in writes if op.ok and op.ended >= promoted]
    first_ok = min(resumed) if resumed else None
    # The legitimate primary: `default` until it failed, failover2 from its
    # promotion on; failover1 never. A write `default` acknowledged after it
    # came back stale went to a second primary.
    by_non_primary = sum(
        op.ok
        and (
            op.alias == "failover1"
            or (op.alias == "failover2" and op.started < promoting)
            or (op.alias == "default" and op.started > failed_at and returned is None)
        )
        for op in writes
    )
    flipped = sum(
        op.ok and op.alias == "default" and returned is not None and op.started > failed_at
        for op in writes
    )
    return Row(
        scenario={
            "kill": "kill -9",
            "hang": "SIGSTOP",
            "rejoin": "kill -9, old primary rejoins",
            "split": "kill -9, old primary back stale",
        }[name],
        report=report,
        resume=None if first_ok is None else first_ok - promoted,
        switched=switched,
        failed=sum(not op.ok for op in load.operations),
        total=len(load.operations),
        by_non_primary=by_non_primary,
        flipped=flipped,
        before=[op.latency for op in writes if op.ok and op.ended < failed_at],
        after=[op.latency for op in writes if op.ok and first_ok and op.started >= first_ok + 0.5],
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steady", type=float, default=4.0, help="seconds before and after")
    parser.add_argument("--promote-after", type=float, default=2.0)
    parser.add_argument(
        "--scenarios",
        default="kill,kill-unreported,hang,hang-unreported,rejoin,split",
        help="comma-separated subset of the default list",
    )
    parser.add_argument(
        "--on-all-down", choices=["last", "raise"], default="last", help='DBHA["ON_ALL_DOWN"]'
    )
    args = parser.parse_args()

    # Django is configured once per process, so every cluster reuses the ports.
    ports = [localdb.free_port() for _ in localdjango.ALIASES]
    model = None
    rows: list[Row] = []
    plan = [
        (name.removesuffix("-unreported"), not name.endswith("-unreported"))
        for name in args.scenarios.split(",")
    ]
    dbha_settings = {"ON_ALL_DOWN": args.on_all_down} if args.on_all_down != "last" else None
    connections_per_interval = float("nan")
    for name, report in plan:
        with localdb.PgCluster(standbys=2, ports=ports) as cluster:
            if model is None:
                model = localdjango.configure(cluster, dbha_settings)
                connections_per_interval = steady_state_connections(cluster, 10.0)
            else:
                localdjango.create_table(cluster, model)
            rows.append(failover(name, cluster, model, args, report))
            dbha.close()  # the next scenario starts from a fresh checker

    import django

    tuned = (
        f'DBHA["ON_ALL_DOWN"] = "{args.on_all_down}"' if dbha_settings else "default DBHA settings"
    )
    print(f"django-dbha {dbha.__version__}, Django {django.get_version()}, {tuned}")
    print(f"{args.threads} threads, each a write then a read per connection, CONN_MAX_AGE=0;")
    print(f"failover2 promoted {args.promote_after} s after the primary failed")
    print()
    print(
        "| scenario | failures reported | dbha switches after promotion "
        "| writes resume after promotion | failed ops "
        "| acked by a non-primary | flipped to a 2nd primary | write p50 / p99 before "
        "| write p50 / p99 after | p99 after / before |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        resume = "never" if r.resume is None else f"{r.resume:.3f} s"
        switched = "never" if r.switched is None else f"{r.switched:.3f} s"
        p99_before, p99_after = percentile(r.before, 0.99), percentile(r.after, 0.99)
        print(
            f"| {r.scenario} | {'yes' if r.report else 'no'} | {switched} | {resume} "
            f"| {r.failed} of {r.total} "
            f"| {r.by_non_primary} | {r.flipped} "
            f"| {percentile(r.before, 0.5) * 1000:.1f} / {p99_before * 1000:.1f} ms "
            f"| {percentile(r.after, 0.5) * 1000:.1f} / {p99_after * 1000:.1f} ms "
            f"| {p99_after / p99_before:.2f}x |"
        )
    print()
    print(f"steady-state probing: {connections_per_interval:.2f} new server connections per "
          "interval (3 servers, pg_stat_database.sessions over 10 s)")  # fmt: skip
    dbha.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

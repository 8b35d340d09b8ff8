"""Patroni benchmark: how soon writes follow Patroni's new leader, through
dbha (`PROBE: "patroni"`, default settings otherwise) and through HAProxy
with Patroni's REST check (`option httpchk GET /leader`, `http-check expect
status 200`, `inter 250ms fastinter 100ms downinter 250ms fall 2 rise 1`),
measured in the same run on the same cluster: three PostgreSQL 15 nodes
under Patroni 3.0.2 and one etcd on loopback (tools/localpatroni.py; ttl 5,
loop_wait 1, retry_timeout 2).

Scenarios, each run --runs times:

    failover     the leader's Patroni and PostgreSQL killed (-9): Patroni
                 fails over once the leader key expires; the old leader
                 then rejoins
    switchover   POST /switchover to Patroni's REST API

Times are from the new leader's lock (its GET /leader first answering 200,
polled every 10 ms): when Patroni called it writable (role master, state
running), when dbha's `available_db()` first named it (polled every 1 ms),
the first write acknowledged there through dbha and through HAProxy (a
writer each, a fresh connection every 10 ms, libpq connect_timeout 2 s),
and when HAProxy's stats first showed it UP. Failed writes meanwhile are
counted per path.

    python benches/patroni.py [--runs 3] [--scenarios failover,switchover]
        [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import django
import psycopg
from django.conf import settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import dbha
import localpatroni
from localpatroni import HAProxy, PatroniCluster

ALIASES = ("default", "failover1", "failover2")
NODES = ("node1", "node2", "node3")
ALIAS_OF = dict(zip(NODES, ALIASES, strict=True))
NODE_OF = {alias: node for node, alias in ALIAS_OF.items()}
#: Every poll and load loop stops by this, whatever happens.
RUN_LIMIT = 60.0


@dataclass
class Outcome:
    scenario: str
    old: str
    new: str
    #: Seconds from the lock (first GET /leader 200) to each event.
    writable: float | None = None
    dbha_switched: float | None = None
    dbha_first_write: float | None = None
    haproxy_up: float | None = None
    haproxy_first_write: float | None = None
    dbha_failed: int = 0
    haproxy_failed: int = 0
    #: Seconds between the last write acknowledged by the old leader and
    #: the first by the new one, per path.
    dbha_gap: float | None = None
    haproxy_gap: float | None = None
    #: Writes acknowledged by a node other than the one that held the lock.
    dbha_misplaced: int = 0
    haproxy_misplaced: int = 0


@dataclass
class Timeline:
    """First times (monotonic) of events, per key."""

    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, key: str, at: float | None = None) -> None:
        with self.lock:
            self.first.setdefault(key, time.monotonic() if at is None else at)


def rest(node: localpatroni.PatroniNode) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{node.rest_url}/leader", timeout=0.5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except Exception:
        return 0, {}


@contextmanager
def looping(name: str, step: Callable[[], None], period: float) -> Iterator[None]:
    """Runs `step` every `period` s in a thread until the block ends."""
    stop = threading.Event()

    def run() -> None:
        deadline = time.monotonic() + RUN_LIMIT
        while not stop.is_set() and time.monotonic() < deadline:
            step()
            time.sleep(period)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def acknowledged(path: str, port: int, outcome: Outcome, timeline: Timeline) -> None:
    """Records a write `path` ("dbha" or "haproxy") got acknowledged by the
    server on `port`."""
    node = next(n for n in NODES if port_of[n] == port)
    if node == outcome.new:
        timeline.mark(f"{path}_write")
    elif node == outcome.old and f"{path}_write" not in timeline.first:
        timeline.last[f"{path}_old"] = time.monotonic()
    if node != outcome.new and "lock" in timeline.first:
        setattr(outcome, f"{path}_misplaced", getattr(outcome, f"{path}_misplaced") + 1)


def write_through_dbha(outcome: Outcome, timeline: Timeline) -> None:
    from django.db import connections

    try:
        alias = dbha.available_db()
        with connections[alias].cursor() as cursor:
            cursor.execute("insert into bench values (now()) returning inet_server_port()")
            (port,) = cursor.fetchone()
        acknowledged("dbha", port, outcome, timeline)
    except Exception:
        outcome.dbha_failed += 1
    finally:
        connections.close_all()


def write_through_haproxy(proxy: HAProxy, outcome: Outcome, timeline: Timeline) -> None:
    dsn = (
        f"host={localpatroni.LOOPBACK} port={proxy.port} dbname=postgres "
        f"user={localpatroni.SUPERUSER} password={localpatroni.SUPERUSER_PASSWORD} "
        "connect_timeout=2"
    )
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("insert into bench values (now()) returning inet_server_port()")
            (port,) = row.fetchone() or (0,)
        acknowledged("haproxy", port, outcome, timeline)
    except Exception:
        outcome.haproxy_failed += 1


port_of: dict[str, int] = {}


def run_once(cluster: PatroniCluster, proxy: HAProxy, scenario: str) -> Outcome:
    old = cluster.wait_healthy(timeout=60)
    proxy.wait_routes_to(old)
    dbha.check_now()
    assert dbha.available_db() == ALIAS_OF[old], dbha.status()
    outcome = Outcome(scenario, old, "?")
    timeline = Timeline()
    others = [cluster.node(n) for n in NODES if n != old]

    def watch_patroni() -> None:
        for node in others:
            status, body = rest(node)
            if status == 200:
                outcome.new = node.name
                timeline.mark("lock")
                if body.get("role") == "master" and body.get("state") == "running":
                    timeline.mark("writable")

    def watch_dbha() -> None:
        if outcome.new != "?":
            try:
                if dbha.available_db() == ALIAS_OF[outcome.new]:
                    timeline.mark("dbha")
            except dbha.NoHealthyDatabase:
                pass

    def watch_haproxy() -> None:
        if outcome.new != "?" and proxy.servers("primary").get(outcome.new) == "UP":
            timeline.mark("haproxy")

    with (
        looping("patroni", watch_patroni, 0.01),
        looping("dbha", watch_dbha, 0.001),
        looping("haproxy", watch_haproxy, 0.01),
        looping("dbha-writes", lambda: write_through_dbha(outcome, timeline), 0.01),
        looping("haproxy-writes", lambda: write_through_haproxy(proxy, outcome, timeline), 0.01),
    ):
        time.sleep(1)
        outcome.dbha_failed = outcome.haproxy_failed = 0
        if scenario == "failover":
            cluster.kill_node(old)
        else:
            cluster.switchover()
        deadline = time.monotonic() + 30
        wanted = ("lock", "writable", "dbha", "dbha_write", "haproxy", "haproxy_write")
        while time.monotonic() < deadline and not all(k in timeline.first for k in wanted):
            time.sleep(0.05)
        time.sleep(0.5)
    lock = timeline.first.get("lock")

    def since(key: str) -> float | None:
        at = timeline.first.get(key)
        return None if at is None or lock is None else at - lock

    outcome.writable = since("writable")
    outcome.dbha_switched = since("dbha")
    outcome.dbha_first_write = since("dbha_write")
    outcome.haproxy_up = since("haproxy")
    outcome.haproxy_first_write = since("haproxy_write")
    for path in ("dbha", "haproxy"):
        old_write, new_write = timeline.last.get(f"{path}_old"), timeline.first.get(f"{path}_write")
        if old_write is not None and new_write is not None:
            setattr(outcome, f"{path}_gap", new_write - old_write)
    if scenario == "failover":
        cluster.start_node(old)
    return outcome


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f} s"


def gap(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", default="failover,switchover")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    unknown = [s for s in scenarios if s not in ("failover", "switchover")]
    if unknown:
        parser.error(f"unknown scenarios {unknown}")

    outcomes: list[Outcome] = []
    with PatroniCluster(nodes=3) as cluster, HAProxy(cluster) as proxy:
        port_of.update({n: cluster.node(n).pg_port for n in NODES})
        settings.configure(
            DATABASES={
                ALIAS_OF[n]: {
                    "ENGINE": "dbha.backends.postgresql",
                    "HOST": localpatroni.LOOPBACK,
                    "PORT": cluster.node(n).pg_port,
                    "NAME": "postgres",
                    "USER": localpatroni.SUPERUSER,
                    "PASSWORD": localpatroni.SUPERUSER_PASSWORD,
                    "CONN_MAX_AGE": 0,
                    "OPTIONS": {"connect_timeout": 2},
                }
                for n in NODES
            },
            DATABASE_ROUTERS=["dbha.ModelDatabaseRouter"],
            INSTALLED_APPS=[],
            USE_TZ=True,
            DBHA={
                "PROBE": "patroni",
                "PATRONI": {ALIAS_OF[n]: cluster.node(n).rest_url for n in NODES},
            },
        )
        django.setup()
        with psycopg.connect(cluster.dsn(cluster.wait_healthy()), autocommit=True) as conn:
            conn.execute("create table bench (t timestamptz)")
        for scenario in scenarios:
            for run in range(args.runs):
                outcome = run_once(cluster, proxy, scenario)
                outcomes.append(outcome)
                print(f"{scenario} {run + 1}: {asdict(outcome)}", file=sys.stderr, flush=True)
        dbha.close()

    print(
        f"\ndjango-dbha {dbha.__version__}, Patroni 3.0.2, etcd 3.4, HAProxy 2.6, "
        f"{args.runs} runs per scenario; times from the new leader's lock\n"
    )
    print(
        "| scenario | Patroni: writable | dbha: available_db() | dbha: first write "
        "| HAProxy: marked UP | HAProxy: first write | no write acknowledged for, dbha / HAProxy "
        "| acknowledged without the lock, dbha / HAProxy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for scenario in scenarios:
        runs = [o for o in outcomes if o.scenario == scenario]
        for o in runs:
            print(
                f"| {scenario} ({o.old} → {o.new}) | {seconds(o.writable)} "
                f"| {seconds(o.dbha_switched)} | {seconds(o.dbha_first_write)} "
                f"| {seconds(o.haproxy_up)} | {seconds(o.haproxy_first_write)} "
                f"| {gap(o.dbha_gap)} / {gap(o.haproxy_gap)} "
                f"| {o.dbha_misplaced} / {o.haproxy_misplaced} |"
            )
        print(
            f"| **{scenario}, median** | {seconds(median([o.writable for o in runs]))} "
            f"| {seconds(median([o.dbha_switched for o in runs]))} "
            f"| {seconds(median([o.dbha_first_write for o in runs]))} "
            f"| {seconds(median([o.haproxy_up for o in runs]))} "
            f"| {seconds(median([o.haproxy_first_write for o in runs]))} "
            f"| {gap(median([o.dbha_gap for o in runs]))} "
            f"/ {gap(median([o.haproxy_gap for o in runs]))} | |"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps({"runs": [asdict(o) for o in outcomes]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""dbha following Patroni on a real cluster (tools/localpatroni.py): three
PostgreSQL 15 nodes under Patroni 3.0.2 and one etcd, all on loopback. The
`patroni` probe asks each node's REST API who holds the leader lock; the
scenarios change the leader the way Patroni does (a failover of its own, a
switchover through its REST API, maintenance mode, etcd stopped) while a
thread writes through the ORM, and check that writes followed Patroni's
leader: none acknowledged by a node that did not hold the lock, and every
acknowledged write on the final leader unless asynchronous replication lost
it at the failover."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connections
from django.test import override_settings

import dbha
from dbha.management.commands.dbha import Command
from localpatroni import PatroniCluster
from tests import certs
from tests.conftest import TEST_DBHA, wait_for
from tests.testapp.models import Item

ALIASES = ("default", "failover1", "failover2")
NODES = ("node1", "node2", "node3")
ALIAS_OF = dict(zip(NODES, ALIASES, strict=True))
#: Polling Patroni's REST API for the truth the writes are compared with.
POLL = 0.02


@dataclass
class Write:
    note: str
    alias: str
    started: float
    ended: float
    ok: bool
    error: str = ""


@dataclass
class Leaders:
    """Which node Patroni's REST API called the writable leader (GET /leader
    200, role master, state running), polled every POLL seconds."""

    spans: list[tuple[float, float, str | None]] = field(default_factory=list)

    def held(self, node: str, start: float, end: float) -> bool:
        """Whether `node` held the lock at some moment between start and end
        (widened by a poll on each side). A leader's term runs from its first
        answer until another node answers as leader: a leader whose REST API
        died still holds the lock until it expires."""
        named = [(s, leader) for s, _, leader in self.spans if leader is not None]
        for i, (began, leader) in enumerate(named):
            if leader != node:
                continue
            ended = next((s for s, other in named[i:] if other != node), float("inf"))
            if began <= end + 2 * POLL and ended >= start - 2 * POLL:
                return True
        return False

    def first(self, node: str, since: float) -> float | None:
        return next((s for s, e, leader in self.spans if leader == node and e >= since), None)


def rest_leader(cluster: PatroniCluster) -> str | None:
    """The node whose Patroni calls itself the writable leader, if one."""
    found = []
    for name in NODES:
        node = cluster.node(name)
        try:
            with urllib.request.urlopen(f"{node.rest_url}/leader", timeout=0.5) as answer:
                body = answer.read()
        except Exception:  # 503, refused, timed out: not the leader
            continue
        if b'"role": "master"' in body.replace(b'":"', b'": "') and b'"running"' in body:
            found.append(name)
    return found[0] if len(found) == 1 else None


@contextlib.contextmanager
def watching(cluster: PatroniCluster) -> Iterator[Leaders]:
    leaders = Leaders()
    stop = threading.Event()

    def poll() -> None:
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            leader = rest_leader(cluster)
            if leaders.spans and leaders.spans[-1][2] == leader:
                s, _, _ = leaders.spans[-1]
                leaders.spans[-1] = (s, now, leader)
            else:
                leaders.spans.append((now, now, leader))
            time.sleep(POLL)

    thread = threading.Thread(target=poll, name="patroni-leaders", daemon=True)
    thread.start()
    try:
        yield leaders
    finally:
        stop.set()
        thread.join(5)


@contextlib.contextmanager
def writing(period: float = 0.02) -> Iterator[list[Write]]:
    """A thread writing a row at a time through dbha's router and backend
    (a connection per write), recording where each went and how it ended."""
    writes: list[Write] = []
    stop = threading.Event()

    def run() -> None:
        deadline = time.monotonic() + 300
        n = 0
        while not stop.is_set() and time.monotonic() < deadline:
            n += 1
            note = f"w{n}"
            started = time.monotonic()
            alias = "?"
            try:
                alias = dbha.available_db()
                Item.objects.using(alias).create(name=note)
                writes.append(Write(note, alias, started, time.monotonic(), True))
            except Exception as e:
                writes.append(Write(note, alias, started, time.monotonic(), False, str(e)[:200]))
            finally:
                connections.close_all()
            time.sleep(period)

    thread = threading.Thread(target=run, name="patroni-writes", daemon=True)
    thread.start()
    try:
        yield writes
    finally:
        stop.set()
        thread.join(10)


def held_by(cluster: PatroniCluster, node: str) -> set[str]:
    with psycopg.connect(cluster.dsn(node), connect_timeout=5) as conn:
        rows = conn.execute("select name from testapp_item").fetchall()
    return {name for (name,) in rows}


def assert_writes_followed_the_leader(
    cluster: PatroniCluster, writes: list[Write], leaders: Leaders, lossy_before: float = 0.0
) -> None:
    """No write acknowledged by a node that did not hold the lock; every
    acknowledged write on the final leader, except those a crash before
    `lossy_before` may have lost to asynchronous replication."""
    acked = [w for w in writes if w.ok]
    assert len(acked) > 20, "the load ran"
    node_of = {alias: node for node, alias in ALIAS_OF.items()}
    misplaced = [w for w in acked if not leaders.held(node_of[w.alias], w.started, w.ended)]
    assert misplaced == [], f"acknowledged by a node without the lock: {misplaced[:3]}"
    final = wait_for(lambda: rest_leader(cluster), timeout=30, what="a leader at the end")
    wait_for(lambda: cluster.wait_healthy(timeout=30), timeout=31, what="a healthy cluster")
    held = held_by(cluster, final)
    missing = [w for w in acked if w.note not in held and w.ended >= lossy_before]
    assert missing == [], f"acknowledged and missing from {final}: {missing[:3]}"


def switch_time(alias: str, since: float, timeout: float) -> float:
    """When `available_db()` first answered `alias` after `since`."""

    def answered() -> float | None:
        try:
            return time.monotonic() if dbha.available_db() == alias else None
        except dbha.NoHealthyDatabase:
            return None

    return wait_for(answered, timeout=timeout, what=f"writes on {alias}") - since


@pytest.fixture(scope="module")
def cluster(django_db_blocker: Any) -> Iterator[PatroniCluster]:
    """A Patroni cluster, with Django's aliases pointed at its nodes through
    dbha's backend (changed in place, restored afterwards)."""
    from django.conf import settings

    with PatroniCluster(nodes=3) as started:
        saved = {alias: dict(entry) for alias, entry in settings.DATABASES.items()}
        for node, alias in ALIAS_OF.items():
            settings.DATABASES[alias].update(
                ENGINE="dbha.backends.postgresql", PORT=started.node(node).pg_port
            )
        dbha.close()
        try:
            with django_db_blocker.unblock():
                with connections["default"].schema_editor() as editor:
                    editor.create_model(Item)
                connections.close_all()
                yield started
        finally:
            dbha.close()
            connections.close_all()
            for alias, entry in saved.items():
                settings.DATABASES[alias].clear()
                settings.DATABASES[alias].update(entry)
            for alias in ALIASES:
                with contextlib.suppress(AttributeError):
                    del connections[alias]


def patroni_settings(cluster: PatroniCluster, probe: Any = "patroni", **extra: Any) -> Any:
    return override_settings(
        DBHA={
            **TEST_DBHA,
            "PROBE": probe,
            "PATRONI": {ALIAS_OF[n]: cluster.node(n).rest_url for n in NODES},
            "READS": "replicas",
            **extra,
        }
    )


def leader_alias(cluster: PatroniCluster) -> str:
    return ALIAS_OF[wait_for(lambda: rest_leader(cluster), timeout=30, what="a leader")]


def test_writes_go_to_the_leader_and_reads_to_replicas(cluster: PatroniCluster) -> None:
    with patroni_settings(cluster):
        assert dbha.available_db() == leader_alias(cluster)
        status = {s.alias: s for s in dbha.status()}
        assert all(s.state == "up" for s in status.values()), status
        assert {s.role for s in status.values()} == {"primary", "standby"}
        # Replicas serve reads once a probe shows they have replayed what
        # the leader had written (this thread just asked for the writer).
        wait_for(
            lambda: any(s.is_reader and s.role == "standby" for s in dbha.status()),
            timeout=5,
            what="a replica serving reads",
        )


def test_a_failover_of_patronis_own_is_followed(cluster: PatroniCluster) -> None:
    old = wait_for(lambda: rest_leader(cluster), timeout=30, what="a leader")
    with patroni_settings(cluster), watching(cluster) as leaders, writing() as writes:
        assert dbha.available_db() == ALIAS_OF[old]
        time.sleep(1)
        cluster.kill_node(old)
        killed = time.monotonic()
        new = wait_for(
            lambda: (leader := rest_leader(cluster)) and leader != old and leader,
            timeout=30,
            what="Patroni's new leader",
        )
        took_lock = leaders.first(new, killed) or time.monotonic()
        switched = switch_time(ALIAS_OF[new], took_lock, timeout=10)
        # FAST_INTERVAL once the old leader is known down, generously.
        assert switched < 1.0, f"{switched:.3f} s after the new leader took the lock"
        time.sleep(1)
    assert_writes_followed_the_leader(cluster, writes, leaders, lossy_before=killed)
    # Every write from just after the switch went to the new leader.
    after = [w for w in writes if w.started > took_lock + switched + 0.1]
    assert len(after) > 5
    assert all(w.ok and w.alias == ALIAS_OF[new] for w in after), after[:3]

    # The old leader rejoins as a replica: it serves reads, not writes.
    cluster.start_node(old)
    cluster.wait_healthy(timeout=60)
    with patroni_settings(cluster):
        assert dbha.available_db() == ALIAS_OF[new]
        wait_for(
            lambda: {s.alias: s.role for s in dbha.status()}[ALIAS_OF[old]] == "standby",
            timeout=10,
            what="the old leader back as a standby",
        )


def test_a_switchover_through_the_rest_api_is_followed(cluster: PatroniCluster) -> None:
    old = wait_for(lambda: rest_leader(cluster), timeout=30, what="a leader")
    with patroni_settings(cluster), watching(cluster) as leaders, writing() as writes:
        time.sleep(1)
        began = time.monotonic()
        new = cluster.switchover()
        took_lock = leaders.first(new, began) or time.monotonic()
        switched = switch_time(ALIAS_OF[new], took_lock, timeout=10)
        assert switched < TEST_DBHA["CHECK_INTERVAL"] + 1.0, f"{switched:.3f} s"
        time.sleep(1)
    assert new != old
    # A switchover is a clean handover: nothing acknowledged is lost.
    assert_writes_followed_the_leader(cluster, writes, leaders)


def test_maintenance_mode_then_a_dead_leader(cluster: PatroniCluster) -> None:
    leader = wait_for(lambda: rest_leader(cluster), timeout=30, what="a leader")
    with patroni_settings(cluster, ON_ALL_DOWN="raise"):
        cluster.pause()
        try:
            time.sleep(3 * TEST_DBHA["CHECK_INTERVAL"])
            # Paused, Patroni keeps its leader: so does dbha.
            assert dbha.available_db() == ALIAS_OF[leader]
            # Its PostgreSQL dies: paused, Patroni neither restarts it nor
            # fails over; dbha has no writer rather than a wrong one.
            cluster.kill_postgres(leader)
            wait_for(
                lambda: isinstance(raised(dbha.available_db), dbha.NoHealthyDatabase),
                timeout=10,
                what="no writer while paused",
            )
            reason = {s.alias: s.last_error for s in dbha.status()}[ALIAS_OF[leader]]
            assert "Patroni" in (reason or ""), reason
        finally:
            cluster.resume()
        new = wait_for(lambda: rest_leader(cluster), timeout=30, what="a leader after resume")
        switch_time(ALIAS_OF[new], time.monotonic(), timeout=10)
    cluster.wait_healthy(timeout=60)


def test_etcd_stopped_leaves_no_writer_and_reads_go_on(cluster: PatroniCluster) -> None:
    leader = wait_for(lambda: rest_leader(cluster), timeout=30, what="a leader")
    settings = patroni_settings(cluster, ON_ALL_DOWN="raise")
    with settings, watching(cluster) as leaders, writing() as writes:
        time.sleep(1)
        stopped = time.monotonic()
        cluster.stop_etcd()
        try:
            # Without its store, Patroni demotes the leader (no
            # failsafe_mode): every node a replica, none writable.
            wait_for(
                lambda: isinstance(raised(dbha.available_db), dbha.NoHealthyDatabase),
                timeout=15,
                what="no writer without etcd",
            )
            # A thread that wrote nothing may still read from the replicas.
            reader: list[Any] = []
            thread = threading.Thread(target=lambda: reader.append(raised(dbha.read_db)))
            thread.start()
            thread.join(5)
            assert reader == [None], "replicas still serve reads"
            assert any(s.is_reader for s in dbha.status())
        finally:
            cluster.start_etcd()
        back = wait_for(lambda: rest_leader(cluster), timeout=30, what="a leader again")
        switch_time(ALIAS_OF[back], time.monotonic(), timeout=10)
        time.sleep(1)
    assert any(w.ended > stopped and not w.ok for w in writes), "writes failed meanwhile"
    assert leaders.first(leader, 0.0) is not None
    assert_writes_followed_the_leader(cluster, writes, leaders)


def test_patroni_and_the_server_must_agree(cluster: PatroniCluster) -> None:
    """A replica promoted behind Patroni's back is a primary on a newer
    timeline: the `role` probe alone would send it the writes (the newest
    timeline wins); with Patroni's view too it gets none, and the conflict
    is shown."""
    cluster.wait_healthy(timeout=60)
    leader = wait_for(lambda: rest_leader(cluster), timeout=30, what="a leader")
    rogue = next(n for n in NODES if n != leader)
    with patroni_settings(cluster, ["patroni", "role"], FALL=1), writing() as writes:
        assert dbha.available_db() == ALIAS_OF[leader]
        seen: list[str] = []
        with psycopg.connect(cluster.dsn(rogue), autocommit=True) as conn:
            conn.execute("select pg_promote()")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not seen:
            reason = {s.alias: s.last_error for s in dbha.status()}[ALIAS_OF[rogue]] or ""
            if "conflict" in reason:
                seen.append(reason)
            time.sleep(0.01)
        assert seen, "the conflict was never shown"
        # Patroni may still call it a replica ("Patroni says standby, the
        # server says primary"), or already see a primary without the lock.
        assert "standby, the server says primary" in seen[0] or "without the leader lock" in seen[0]
    assert not [w for w in writes if w.ok and w.alias == ALIAS_OF[rogue]]
    # Patroni demotes the rogue, but a replica on a newer timeline than its
    # leader's cannot follow it: it is rebuilt, as an operator would.
    answer = cluster.node(rogue).request("POST", "/reinitialize", {"force": True})
    assert answer.status == 200, answer
    cluster.wait_healthy(timeout=60)


def test_the_rest_api_over_tls_with_basic_auth(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    files = certs.make(tmp_path)
    with PatroniCluster(nodes=1, rest_auth=("dbha", "rest-s3cret"), rest_tls=files) as one:
        api = {"URL": one.node("node1").rest_url, "USER": "dbha", "PASSWORD": "rest-s3cret"}
        assert api["URL"].startswith("https://")
        # `default` alone is watched here, through the one node's API.
        for ca, up in ((files.ca, True), (files.other_ca, False)):
            dbha_settings = {
                **TEST_DBHA,
                "DATABASES": ["default"],
                "PROBE": "patroni",
                "PATRONI": {"default": {**api, "CA_FILE": str(ca)}},
            }
            with override_settings(DBHA=dbha_settings):
                dbha.check_now()
                if up:
                    wait_for(lambda: dbha.status()[0].role == "primary", timeout=5)
                    assert dbha.available_db() == "default"
                else:
                    (node,) = dbha.status()
                    assert node.state != "up", node
                    assert "TLS" in (node.last_error or ""), node.last_error
                out = StringIO()
                with contextlib.suppress(SystemExit):
                    Command(stdout=out, stderr=out).run_from_argv(
                        ["manage.py", "dbha", "status", "--json"]
                    )
                shown = [repr(dbha.status()), out.getvalue(), caplog.text]
                assert not [text for text in shown if "rest-s3cret" in text]
    dbha.close()


def raised(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except Exception as e:
        return e
    return None

"""The core's behaviour against real PostgreSQL 15 (a primary and two
streaming standbys that the tests really kill, stop, restart and promote),
with the `handshake` probe: hysteresis, hangs, sticky writes, all-down
policies, fork, threads. Role-aware routing, the default, is in
test_roles.py."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError, connections
from django.db.utils import ConnectionRouter
from django.test import override_settings

import dbha
from tests.conftest import PG_PORTS, TEST_DBHA, Cluster, pg_settings, wait_for
from tests.testapp.models import Item, Report

HANDSHAKE = {**TEST_DBHA, "PROBE": "handshake"}


@pytest.fixture(autouse=True)
def handshake_probe() -> Iterator[None]:
    with override_settings(DBHA=HANDSHAKE):
        yield


def writer_is(alias: str) -> bool:
    return dbha.available_db() == alias


def write(name: str) -> str:
    """One ORM write through the router, in its own connection (as a request
    with CONN_MAX_AGE=0 would); returns the alias it went to."""
    try:
        item = Item.objects.create(name=name)
        return item._state.db
    finally:
        connections.close_all()


def names_on(cluster: Cluster, alias: str) -> set[str]:
    out = cluster.servers[alias].query("select name from testapp_item")
    return set(out.split()) if out else set()


def test_healthy_cluster_writes_to_the_primary(cluster: Cluster) -> None:
    assert dbha.available_db() == "default"
    assert write("first") == "default"
    assert "first" in names_on(cluster, "default")
    statuses = {s.alias: s for s in dbha.status()}
    assert {s.state for s in statuses.values()} == {"up"}
    assert statuses["default"].is_writer
    assert not statuses["failover1"].is_writer
    assert statuses["default"].latency is not None
    assert statuses["default"].checked_at is not None
    assert statuses["default"].last_error is None


def test_kill_of_the_primary_moves_writes_to_the_promoted_standby(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dbha")
    assert write("before") == "default"
    cluster.pg.wait_replayed()
    cluster.servers["default"].kill()
    cluster.servers["failover1"].promote()
    wait_for(lambda: writer_is("failover1"), what="writes to move to failover1")
    assert write("after") == "failover1"
    assert {"before", "after"} <= names_on(cluster, "failover1")
    down = next(s for s in dbha.status() if s.alias == "default")
    assert down.state == "down"
    assert down.last_error == "connection refused"
    wait_for(
        lambda: any("writes move from default to failover1" in m for m in caplog.messages),
        what="the failover to be logged",
    )
    assert any("default (127.0.0.1:" in m and "is down" in m for m in caplog.messages)


def test_a_hung_primary_is_detected_by_the_handshake_probe(cluster: Cluster) -> None:
    cluster.servers["default"].pause()
    started = time.monotonic()
    wait_for(lambda: writer_is("failover1"), what="the hang to be detected")
    # FALL=2 rounds of 0.2 s plus 0.5 s deadlines: well under 5 s.
    assert time.monotonic() - started < 5
    down = next(s for s in dbha.status() if s.alias == "default")
    assert down.last_error == "timeout"
    # No call waits on the hung server: the answer comes from memory.
    started = time.perf_counter()
    for _ in range(1000):
        dbha.available_db()
    assert time.perf_counter() - started < 0.5


def test_the_tcp_probe_does_not_see_a_hang(cluster: Cluster) -> None:
    """The documented weakness of PROBE "tcp": a SIGSTOPped server still
    completes TCP connects (the kernel does it), so it looks healthy."""
    with override_settings(DBHA={**HANDSHAKE, "PROBE": "tcp"}):
        assert dbha.available_db() == "default"
        cluster.servers["default"].pause()
        for _ in range(5):
            dbha.check_now()
        assert dbha.available_db() == "default"
        assert next(s for s in dbha.status() if s.alias == "default").state == "up"


def test_the_old_primary_coming_back_does_not_take_writes_back(cluster: Cluster) -> None:
    cluster.servers["default"].kill()
    cluster.servers["failover1"].promote()
    wait_for(lambda: writer_is("failover1"), what="failover")
    cluster.servers["default"].start()  # un-rewound: it comes back as a primary
    wait_for(
        lambda: next(s for s in dbha.status() if s.alias == "default").state == "up",
        what="the old primary to be seen up",
    )
    for _ in range(5):
        dbha.check_now()
    assert dbha.available_db() == "failover1"
    assert write("sticky") == "failover1"
    assert "sticky" not in names_on(cluster, "default")


def test_failback_auto_returns_to_the_first_alias(cluster: Cluster) -> None:
    with override_settings(DBHA={**HANDSHAKE, "FAILBACK": "auto"}):
        cluster.servers["default"].kill()
        wait_for(lambda: writer_is("failover1"), what="failover")
        cluster.servers["default"].start()
        wait_for(lambda: writer_is("default"), what="failback")


def test_all_down_returns_the_last_writer_by_default(cluster: Cluster) -> None:
    cluster.servers["default"].kill()
    wait_for(lambda: writer_is("failover1"), what="failover")
    # failover2 first, so that the writes cannot move there on the way.
    cluster.servers["failover2"].kill()
    wait_for(lambda: dbha.status()[2].state == "down", what="failover2 down")
    cluster.servers["failover1"].kill()
    wait_for(lambda: all(s.state == "down" for s in dbha.check_now()), what="every alias down")
    assert dbha.available_db() == "failover1"
    # Django then raises its own connection error, promptly.
    with pytest.raises(OperationalError):
        write("nowhere")


def test_all_down_raises_when_asked_to(cluster: Cluster) -> None:
    with override_settings(DBHA={**HANDSHAKE, "ON_ALL_DOWN": "raise"}):
        assert dbha.available_db() == "default"
        for server in cluster.pg.servers:
            server.kill()
        wait_for(lambda: all(s.state == "down" for s in dbha.check_now()), what="every alias down")
        with pytest.raises(dbha.NoHealthyDatabase) as raised:
            dbha.available_db()
        assert isinstance(raised.value, OperationalError)
        message = str(raised.value)
        for alias in ("default", "failover1", "failover2"):
            assert f"{alias} (127.0.0.1:{PG_PORTS[alias]}): connection refused" in message
        assert "s3cret-password" not in message
        with pytest.raises(dbha.NoHealthyDatabase):
            Item.objects.create(name="nowhere")


def test_a_process_starting_with_every_database_down_answers_promptly(
    cluster: Cluster,
) -> None:
    for server in cluster.pg.servers:
        server.pause()
    started = time.monotonic()
    # The first call waits for one probe round, bounded by CONNECT_TIMEOUT
    # (0.5 s here), however many servers hang.
    assert dbha.available_db() == "default"
    assert time.monotonic() - started < 2
    assert {s.last_error for s in dbha.status()} == {"timeout"}


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_unix_socket_postgres(cluster: Cluster) -> None:
    primary = cluster.servers["default"]
    databases = {
        "local": pg_settings(PG_PORTS["default"], HOST=str(primary.socket_dir)),
        "failover1": pg_settings(PG_PORTS["failover1"]),
    }
    with override_settings(DATABASES=databases, DBHA=HANDSHAKE):
        assert dbha.available_db() == "local"
        primary.pause()
        wait_for(lambda: writer_is("failover1"), what="the hung socket to be seen")
        assert next(s for s in dbha.status() if s.alias == "local").last_error == "timeout"
        primary.resume()
        primary.kill()
        status = next(s for s in dbha.check_now() if s.alias == "local")
        assert status.last_error is not None


def test_a_forked_child_sees_a_failover_after_the_fork(cluster: Cluster) -> None:
    assert dbha.available_db() == "default"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own checker must notice the failover
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            code = 2 if dbha.available_db() != "default" else code
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if dbha.available_db() == "failover1":
                    code = 0
                    break
                time.sleep(0.05)
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    try:
        assert os.read(ready_r, 1) == b"r"
        cluster.servers["default"].kill()
        os.write(go_w, b"g")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(ready_r)
        os.close(go_w)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for(lambda: writer_is("failover1"), what="the parent to fail over too")


def test_report_failure_reprobes_at_once(cluster: Cluster) -> None:
    with override_settings(DBHA={**HANDSHAKE, "CHECK_INTERVAL": 60, "FALL": 1}):
        assert dbha.available_db() == "default"
        cluster.servers["default"].kill()
        time.sleep(0.3)
        assert dbha.available_db() == "default", "no periodic round for 60 s"
        dbha.report_failure("default")
        wait_for(lambda: writer_is("failover1"), timeout=3, what="the re-probe")


def test_router_and_groups(cluster: Cluster) -> None:
    groups = {
        "DBHA": {
            **HANDSHAKE,
            "GROUPS": {"main": ["default", "failover1"], "reports": ["failover2"]},
            "ROUTES": {"testapp.Report": "reports"},
        }
    }
    with override_settings(**groups):
        router = dbha.ModelDatabaseRouter()
        assert router.db_for_write(Item) == "default"
        assert router.db_for_read(Item) == "default"
        assert router.db_for_write(Report) == "failover2"
        assert dbha.available_db("reports") == "failover2"
        assert [s.alias for s in dbha.status("reports")] == ["failover2"]
        item, report = Item(name="x"), Report(title="y")
        item._state.db, report._state.db = "default", "failover2"
        other = Item(name="z")
        other._state.db = "failover1"
        assert router.allow_relation(item, other) is True
        assert router.allow_relation(item, report) is False
        assert router.allow_migrate("default", "testapp") is None
        django_router = ConnectionRouter(["dbha.ModelDatabaseRouter"])
        assert django_router.db_for_write(Item) == "default"
        cluster.servers["default"].kill()
        wait_for(lambda: router.db_for_write(Item) == "failover1", what="main failover")
        assert router.db_for_write(Report) == "failover2"


def test_status_records_convert_to_dicts_without_secrets(cluster: Cluster) -> None:
    records = [s.as_dict() for s in dbha.status()]
    assert [r["alias"] for r in records] == ["default", "failover1", "failover2"]
    assert set(records[0]) == {
        "alias",
        "group",
        "endpoint",
        "state",
        "since",
        "role",
        "latency",
        "lag",
        "timeline",
        "last_error",
        "checked_at",
        "successes",
        "failures",
        "is_writer",
        "is_reader",
        "split_brain",
        "probe_errors",
        "reports",
    }
    assert records[0]["endpoint"] == f"127.0.0.1:{PG_PORTS['default']}"
    assert "s3cret-password" not in repr(records)


def test_threads_read_consistent_answers_while_states_flip(cluster: Cluster) -> None:
    valid = {"default", "failover1", "failover2"}
    seen: set[str] = set()
    errors: list[BaseException] = []
    stop = threading.Event()
    dbha.available_db()

    def reader() -> None:
        # Until the flips are over (bounded in time and count): a count
        # alone may run out before the first flip on a fast machine.
        deadline = time.monotonic() + 120
        try:
            for _ in range(500_000_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                seen.add(dbha.available_db())
        except BaseException as e:
            errors.append(e)

    settings: dict[str, Any] = {**HANDSHAKE, "RISE": 1, "FALL": 1, "FAILBACK": "auto"}
    with override_settings(DBHA=settings):
        threads = [threading.Thread(target=reader) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(4):
                cluster.servers["default"].pause()
                wait_for(lambda: writer_is("failover1"), what="flip to failover1")
                cluster.servers["default"].resume()
                wait_for(lambda: writer_is("default"), what="flip back")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    assert not errors
    assert seen <= valid
    assert {"default", "failover1"} <= seen

"""Role-aware routing against real PostgreSQL 15: the `role` probe finds the
primary, follows promotions, fences a stale primary (split brain), and sends
reads to fresh standbys only."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections, transaction
from django.test import override_settings

import dbha
from tests import certs
from tests.conftest import PG_PORTS, TEST_DBHA, Cluster, pg_settings, wait_for
from tests.testapp.models import Item, Report
from tests.workload import Writer, names_on, status, writer_is

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


def test_roles_are_detected(cluster: Cluster) -> None:
    assert dbha.available_db() == "default"
    assert [s.role for s in dbha.status()] == ["primary", "standby", "standby"]
    wait_for(lambda: status("failover1").lag == 0.0, what="an idle standby to show lag 0")
    assert status("default").lag == 0.0, "a primary is never behind"


def test_kill_and_promotion_of_failover2(cluster: Cluster) -> None:
    """The router finds the new primary by role, not by priority, and no
    acknowledged write lands on a standby."""
    with Writer().running() as writer:
        wait_for(lambda: writer.by("default"), what="writes on the primary")
        killed_at = time.monotonic()
        cluster.servers["default"].kill()
        time.sleep(0.5)
        assert not status("failover1").is_writer, "a standby never takes writes"
        # The writer's failure, reported by the application and seen by the
        # probes: writes fail at once rather than wait on a dead server.
        with pytest.raises(dbha.NoHealthyDatabase, match="failing for the application too"):
            dbha.available_db()
        cluster.servers["failover2"].promote()
        wait_for(lambda: writer.by("failover2"), what="writes on failover2")
    assert set(writer.acked.values()) <= {"default", "failover2"}
    on_failover2 = names_on(cluster, "failover2")
    assert writer.by("failover2") <= on_failover2
    # failover1 holds only what it replicated from the old primary (possibly
    # a commit or two that failover2 had not received when it was killed, or
    # one committed just before the kill whose answer never arrived).
    assert names_on(cluster, "failover1") <= writer.by("default") | writer.unacknowledged
    # Writes the killed primary acknowledged but never shipped are lost to
    # asynchronous replication, not to routing: only its last moments.
    lost = writer.by("default") - on_failover2
    assert all(killed_at - writer.acked_at[name] < 1.0 for name in lost), lost


def test_hang_and_promotion_of_failover2(cluster: Cluster) -> None:
    cluster.servers["default"].pause()
    cluster.servers["failover2"].promote()
    started = time.monotonic()
    wait_for(lambda: writer_is("failover2"), what="the promotion to be followed")
    assert time.monotonic() - started < 5
    assert status("default").last_error == "timeout"
    assert status("failover1").role == "standby"


def test_a_failed_write_report_follows_the_promotion_at_once(cluster: Cluster) -> None:
    with override_settings(DBHA={**TEST_DBHA, "CHECK_INTERVAL": 60, "FALL": 5}):
        assert dbha.available_db() == "default"
        cluster.servers["default"].kill()
        cluster.servers["failover2"].promote()
        promoted = time.monotonic()
        dbha.report_failure("default")
        wait_for(lambda: writer_is("failover2"), timeout=3, what="the re-probe")
        assert time.monotonic() - promoted < 2.0  # generous: a loaded 2-core machine
        # Down without waiting for FALL=5: its closed session and a refused
        # connection agree.
        assert status("default").state == "down"
        assert status("default").failures < 5


def test_no_primary_means_no_writer(cluster: Cluster) -> None:
    with override_settings(DBHA={**TEST_DBHA, "ON_ALL_DOWN": "raise"}):
        assert dbha.available_db() == "default"
        cluster.servers["default"].kill()
        wait_for(lambda: status("default").state == "down", what="the primary down")
        with pytest.raises(dbha.NoHealthyDatabase, match="failover1"):
            dbha.available_db()
        assert {status(a).state for a in ("failover1", "failover2")} == {"up"}


def test_a_rejoined_old_primary_serves_reads_not_writes(cluster: Cluster) -> None:
    with override_settings(DBHA={**TEST_DBHA, "READS": "replicas"}):
        cluster.servers["default"].kill()
        cluster.servers["failover2"].promote()
        wait_for(lambda: writer_is("failover2"), what="failover")
        cluster.servers["default"].rejoin(cluster.servers["failover2"])
        wait_for(
            lambda: status("default").role == "standby" and status("default").state == "up",
            what="the old primary to rejoin as a standby",
        )
        wait_for(lambda: "default" in {dbha.read_db() for _ in range(10)}, what="reads on it")
        assert dbha.available_db() == "failover2"
        assert not status("default").split_brain


def test_a_stale_primary_is_fenced(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dbha")
    cluster.servers["default"].kill()
    cluster.servers["failover1"].promote()
    wait_for(lambda: writer_is("failover1"), what="failover")
    with Writer().running() as writer:
        cluster.servers["default"].start()  # un-rewound: a second primary
        wait_for(lambda: status("default").split_brain, what="the split brain to be seen")
        assert status("default").role == "primary"
        for _ in range(5):
            dbha.check_now()
            assert dbha.available_db() == "failover1"
    assert set(writer.acked.values()) == {"failover1"}
    assert not names_on(cluster, "default") & writer.by("failover1")
    wait_for(
        lambda: any(
            r.levelno == logging.ERROR and "split brain" in r.message for r in caplog.records
        ),
        what="the split brain to be logged at ERROR",
    )
    # A process starting now picks the newest promotion (higher timeline).
    dbha.close()
    assert dbha.available_db() == "failover1"
    assert status("default").split_brain


def test_lagging_replicas_are_excluded_from_reads(cluster: Cluster) -> None:
    settings = {**TEST_DBHA, "READS": "replicas", "MAX_REPLICA_LAG": 1}
    with override_settings(DBHA=settings):
        wait_for(lambda: {dbha.read_db() for _ in range(6)} == {"failover1", "failover2"},
                 what="reads spread over both standbys")  # fmt: skip
        cluster.servers["failover1"].query("select pg_wal_replay_pause()")
        deadline = time.monotonic() + 20
        while status("failover1").lag in (None, 0.0) or status("failover1").lag <= 1:
            cluster.servers["default"].query("create table if not exists tick(x int)")
            cluster.servers["default"].query("insert into tick values (1)")
            assert time.monotonic() < deadline, "replay lag never grew"
            time.sleep(0.2)
        dbha.check_now()
        assert {dbha.read_db() for _ in range(20)} == {"failover2"}
        cluster.servers["failover1"].query("select pg_wal_replay_resume()")
        wait_for(lambda: "failover1" in {dbha.read_db() for _ in range(6)}, what="its return")


def test_reads_stay_on_the_writer_when_consistency_needs_it(cluster: Cluster) -> None:
    settings = {**TEST_DBHA, "READS": "replicas", "WRITER_READS": ["testapp.Report"]}
    with override_settings(DBHA=settings):
        router = dbha.ModelDatabaseRouter()
        wait_for(lambda: dbha.read_db() != "default", what="replica reads")
        assert router.db_for_read(Item) in {"failover1", "failover2"}
        assert router.db_for_read(Report) == "default"
        with dbha.use_writer():
            assert dbha.read_db() == "default"
            assert router.db_for_read(Item) == "default"
            with dbha.use_writer():
                pass
            assert router.db_for_read(Item) == "default", "nesting keeps the pin"
        assert router.db_for_read(Item) != "default"

        @dbha.use_writer()
        def pinned() -> str:
            return router.db_for_read(Item)

        assert pinned() == "default"
        with transaction.atomic(using="default"):
            assert router.db_for_read(Item) == "default"
        assert router.db_for_read(Item) != "default"
        connections.close_all()

        # Pins are per thread: another thread still reads from replicas.
        seen: list[str] = []
        with dbha.use_writer():
            thread = threading.Thread(target=lambda: seen.append(router.db_for_read(Item)))
            thread.start()
            thread.join()
        assert seen[0] != "default"


def test_steady_state_probing_opens_no_connections(cluster: Cluster) -> None:
    with override_settings(DBHA={**TEST_DBHA, "CHECK_INTERVAL": 0.1}):
        dbha.available_db()
        sql = "select backend_start from pg_stat_activity where application_name = 'dbha'"
        before = {alias: server.query(sql) for alias, server in cluster.servers.items()}
        assert all(len(b.splitlines()) == 1 for b in before.values()), before
        rounds = 20
        for _ in range(rounds):
            dbha.check_now()
        after = {alias: server.query(sql) for alias, server in cluster.servers.items()}
        assert after == before, "the same single connection per server"


# --- authentication and TLS ---------------------------------------------------------------------

USERS = {"scram_user": "scram-sha-256", "md5_user": "md5", "plain_user": "password"}


@pytest.fixture
def auth_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """The primary with one user per password method, each required by
    pg_hba.conf, and trust for everyone else."""
    primary = cluster.servers["default"]
    for user, method in USERS.items():
        encryption = "md5" if method == "md5" else "scram-sha-256"
        primary.query(f"set password_encryption = '{encryption}'; "
                      f"create user {user} password 'pw-{user}'")  # fmt: skip
    lines = [f"host all {user} 127.0.0.1/32 {method}" for user, method in USERS.items()]
    try:
        with primary.hba_first(*lines):
            yield cluster
    finally:
        if primary.running:
            for user in USERS:
                primary.query(f"drop user if exists {user}")


def probe_as(user: str, password: str, **options: Any) -> dbha.NodeStatus:
    entry = pg_settings(PG_PORTS["default"], USER=user, PASSWORD=password, OPTIONS=options)
    with override_settings(DATABASES={"default": entry}, DBHA=TEST_DBHA):
        dbha.available_db()
        return status("default")


@pytest.mark.parametrize("user", sorted(USERS))
def test_password_methods(auth_cluster: Cluster, user: str) -> None:
    result = probe_as(user, f"pw-{user}")
    assert (result.state, result.role, result.last_error) == ("up", "primary", None)


def test_a_wrong_password_is_down_and_never_shown(
    auth_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dbha")
    result = probe_as("scram_user", "not-the-password")
    assert result.state == "down"
    assert result.last_error is not None
    assert result.last_error.startswith("authentication failed")
    time.sleep(0.3)  # let the log thread deliver
    assert "not-the-password" not in repr(result.as_dict()) + caplog.text


def test_monitoring_credentials_replace_the_alias_own(auth_cluster: Cluster) -> None:
    entry = pg_settings(PG_PORTS["default"], USER="nobody-real", PASSWORD="x")
    credentials = {"default": {"USER": "md5_user", "PASSWORD": "pw-md5_user"}}
    dbha_settings = {**TEST_DBHA, "PROBE_CREDENTIALS": credentials}
    with override_settings(DATABASES={"default": entry}, DBHA=dbha_settings):
        assert dbha.available_db() == "default"
        assert status("default").role == "primary"


@pytest.fixture
def tls_cluster(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Cluster, certs.Certificates]]:
    """The primary with TLS on and required for TCP clients."""
    primary = cluster.servers["default"]
    material = certs.make(tmp_path / "certs")
    owner = os.stat(primary.datadir)
    for path in (material.cert, material.key):
        target = primary.datadir / path.name
        target.write_bytes(path.read_bytes())
        os.chown(target, owner.st_uid, owner.st_gid)
        target.chmod(0o600)
    tmp_path.chmod(0o755)
    for setting in ("ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"):
        primary.query(f"alter system set {setting}")
    hba = primary.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("hostssl all all 127.0.0.1/32 trust\n" + original.replace("host all", "#"))
    primary.query("select pg_reload_conf()")
    try:
        yield cluster, material
    finally:
        if primary.running:
            hba.write_text(original)
            primary.query("alter system reset ssl")
            primary.query("select pg_reload_conf()")


def test_tls_verify_full(tls_cluster: tuple[Cluster, certs.Certificates]) -> None:
    _, material = tls_cluster
    good = probe_as("postgres", "", sslmode="verify-full", sslrootcert=str(material.ca))
    assert (good.state, good.role) == ("up", "primary")
    bad = probe_as("postgres", "", sslmode="verify-full", sslrootcert=str(material.other_ca))
    assert bad.state == "down"
    assert bad.last_error is not None
    assert bad.last_error.startswith("TLS")
    required = probe_as("postgres", "", sslmode="require")
    assert required.state == "up"
    plain = probe_as("postgres", "", sslmode="disable")
    assert plain.state == "down", "pg_hba.conf accepts TLS only"


def test_use_writer_is_per_asyncio_task(cluster: Cluster) -> None:
    with override_settings(DBHA={**TEST_DBHA, "READS": "replicas"}):
        wait_for(lambda: dbha.read_db() != "default", what="replica reads")
        both_inside = asyncio.Event()

        async def pinned() -> str:
            with dbha.use_writer():
                await both_inside.wait()
                return dbha.read_db()

        async def unpinned() -> str:
            await asyncio.sleep(0.01)  # while the other task holds its pin
            answer = dbha.read_db()
            both_inside.set()
            return answer

        async def main() -> list[str]:
            return list(await asyncio.gather(pinned(), unpinned()))

        pinned_answer, unpinned_answer = asyncio.run(main())
        assert pinned_answer == "default"
        assert unpinned_answer != "default", "the pin did not leak into the other task"


def test_the_probe_never_holds_the_application_database(cluster: Cluster) -> None:
    """Django's test runner clones `NAME` with CREATE DATABASE ... TEMPLATE
    and drops it afterwards: a probe session kept there would make both
    fail. The probe logs into `postgres` instead."""
    cluster.pg.createdb("shopdb")
    primary = cluster.servers["default"]
    entry = pg_settings(PG_PORTS["default"], NAME="shopdb")
    try:
        with override_settings(DATABASES={"default": entry}, DBHA=TEST_DBHA):
            assert dbha.available_db() == "default"
            assert status("default").role == "primary"
            primary.query("create database shopdb_clone template shopdb", timeout=30)
            primary.query("drop database shopdb_clone", timeout=30)
            primary.query("drop database shopdb", timeout=30)
            assert status("default").state == "up"
    finally:
        primary.query("drop database if exists shopdb_clone", timeout=30)
        primary.query("drop database if exists shopdb", timeout=30)


def test_the_probe_falls_back_to_name_when_postgres_is_refused(cluster: Cluster) -> None:
    primary = cluster.servers["default"]
    primary.query("create user only_app")
    hba = primary.datadir / "pg_hba.conf"
    original = hba.read_text()
    # This user may connect to the application's database only.
    hba.write_text(
        "host postgres only_app 127.0.0.1/32 reject\n"
        "host postgres only_app 127.0.0.1/32 trust\n" + original
    )
    primary.query("select pg_reload_conf()")
    try:
        entry = pg_settings(PG_PORTS["default"], USER="only_app", PASSWORD="", NAME="template1")
        with override_settings(DATABASES={"default": entry}, DBHA=TEST_DBHA):
            assert dbha.available_db() == "default"
            assert (status("default").state, status("default").role) == ("up", "primary")
    finally:
        hba.write_text(original)
        primary.query("select pg_reload_conf()")
        primary.query("drop user only_app")

"""MySQL/MariaDB probes against real MariaDB servers: the greeting
(`handshake`) probe, and the `role` probe following `read_only`."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

import dbha
from localdb import MariaDbServer, free_port
from tests.conftest import MARIADB_PORT, TEST_DBHA, wait_for

HANDSHAKE = {**TEST_DBHA, "PROBE": "handshake"}

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


def mariadb_settings(**extra: Any) -> dict[str, Any]:
    return {
        "ENGINE": "django.db.backends.mysql",
        "HOST": "127.0.0.1",
        "PORT": MARIADB_PORT,
        "NAME": "mysql",
        "USER": "root",
        "PASSWORD": "",
        **extra,
    }


def state(alias: str) -> tuple[str, str | None]:
    record = next(s for s in dbha.status() if s.alias == alias)
    return record.state, record.last_error


def test_greeting_probe_follows_a_real_server(mariadb: Any) -> None:
    databases = {"my": mariadb_settings()}
    with override_settings(DATABASES=databases, DBHA=HANDSHAKE):
        assert dbha.available_db() == "my"
        assert state("my") == ("up", None)
        mariadb.pause()
        wait_for(lambda: state("my") == ("down", "timeout"), what="the hang to be seen")
        mariadb.resume()
        wait_for(lambda: state("my")[0] == "up", what="recovery")
        mariadb.kill()
        wait_for(lambda: state("my") == ("down", "connection refused"), what="the kill to be seen")


def test_unix_socket_from_options(mariadb: Any) -> None:
    databases = {
        "my": mariadb_settings(HOST="", OPTIONS={"unix_socket": str(mariadb.socket_path)}),
    }
    with override_settings(DATABASES=databases, DBHA=HANDSHAKE):
        assert dbha.available_db() == "my"
        assert state("my") == ("up", None)
        mariadb.pause()
        wait_for(lambda: state("my") == ("down", "timeout"), what="the hang to be seen")
        mariadb.resume()


def test_an_error_greeting_is_down(mariadb: Any) -> None:
    """With every connection slot taken, the server answers a new client
    with an error packet (1040, too many connections) instead of a greeting."""
    mariadb.query("SET GLOBAL max_connections = 10")
    holders: list[socket.socket] = []
    try:
        for _ in range(50):
            holder = socket.create_connection(("127.0.0.1", MARIADB_PORT), timeout=5)
            holders.append(holder)
            if holder.recv(5)[4:5] == b"\xff":
                break
        else:
            pytest.fail("the server never ran out of connection slots")
        databases = {"my": mariadb_settings()}
        with override_settings(DATABASES=databases, DBHA=HANDSHAKE):
            dbha.available_db()
            status = state("my")
            assert status[0] == "down"
            assert status[1] is not None
            assert "1040" in status[1], status
    finally:
        for holder in holders:
            holder.close()


@pytest.fixture
def replicated_pair() -> Iterator[tuple[MariaDbServer, MariaDbServer]]:
    """A MariaDB primary and a read-only replica of it (binlog + GTID)."""
    primary = MariaDbServer(port=free_port(), extra_args=["--server-id=1", "--log-bin"])
    replica = MariaDbServer(
        port=free_port(), extra_args=["--server-id=2", "--log-bin", "--read-only=1"]
    )
    try:
        primary.start()
        replica.start()
        replica.query(
            f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={primary.port}, "
            "MASTER_USER='root', MASTER_USE_GTID=slave_pos"
        )
        replica.query("START SLAVE")
        yield primary, replica
    finally:
        dbha.close()
        replica.cleanup()
        primary.cleanup()


def switch_over(primary: MariaDbServer, replica: MariaDbServer) -> None:
    """A planned switchover: demote the primary, then promote the replica."""
    primary.query("SET GLOBAL read_only = 1")
    replica.query("STOP SLAVE")
    replica.query("SET GLOBAL read_only = 0")


def pair_settings(primary: MariaDbServer, replica: MariaDbServer) -> dict[str, Any]:
    return {
        "first": mariadb_settings(PORT=primary.port),
        "second": mariadb_settings(PORT=replica.port),
    }


def test_role_probe_follows_read_only(replicated_pair: tuple[MariaDbServer, MariaDbServer]) -> None:
    primary, replica = replicated_pair
    settings = {**TEST_DBHA, "READS": "replicas"}
    with override_settings(DATABASES=pair_settings(primary, replica), DBHA=settings):
        assert dbha.available_db() == "first"
        assert [s.role for s in dbha.status()] == ["primary", "standby"]
        wait_for(lambda: dbha.status()[1].lag == 0.0, what="the replica's lag")
        # available_db() above counts as a write: reads of this thread go to
        # the replica once a probe shows it has caught up.
        wait_for(lambda: dbha.read_db() == "second", what="reads on the replica")
        switch_over(primary, replica)
        wait_for(lambda: dbha.available_db() == "second", what="writes to follow the switch")
        assert [s.role for s in dbha.status()] == ["standby", "primary"]
        # Both writable: a split brain; writes stay where they are.
        primary.query("SET GLOBAL read_only = 0")
        wait_for(lambda: dbha.status()[0].split_brain, what="the split brain to be seen")
        for _ in range(3):
            dbha.check_now()
            assert dbha.available_db() == "second"


def test_replicated_writes_land_on_the_primary_only(
    replicated_pair: tuple[MariaDbServer, MariaDbServer],
) -> None:
    """No acknowledged write lands on the read-only replica except through
    replication: compare what the client saw with what each server holds."""
    primary, replica = replicated_pair
    primary.query("CREATE DATABASE app")
    primary.query("CREATE TABLE app.t (id INT PRIMARY KEY, at VARCHAR(10))")
    with override_settings(DATABASES=pair_settings(primary, replica), DBHA=TEST_DBHA):
        servers = {"first": primary, "second": replica}
        acked: dict[int, str] = {}
        for i in range(20):
            alias = dbha.available_db()
            servers[alias].query(f"INSERT INTO app.t VALUES ({i}, '{alias}')")
            acked[i] = alias
            if i == 9:  # half way
                switch_over(primary, replica)
                wait_for(lambda: dbha.available_db() == "second", what="the switchover")
        assert set(acked.values()) == {"first", "second"}
        on_second = replica.query("SELECT id, at FROM app.t ORDER BY id").splitlines()
        assert on_second == [f"{i}\t{alias}" for i, alias in acked.items()]
        on_first = primary.query("SELECT id FROM app.t ORDER BY id").split()
        assert on_first == [str(i) for i, alias in acked.items() if alias == "first"]


def test_a_replica_promoted_while_the_primary_runs_takes_the_writes(
    replicated_pair: tuple[MariaDbServer, MariaDbServer],
) -> None:
    """MariaDB's rule for the newest promotion: a writable server that last
    applied the other's transactions as a replica (its `gtid_slave_pos`) was
    promoted after it. So writes move to it at once, though the old primary
    still runs, answers and takes writes; the old one is fenced."""
    primary, replica = replicated_pair
    primary.query("CREATE DATABASE app")
    primary.query("CREATE TABLE app.t (id INT PRIMARY KEY)")
    for i in range(5):
        primary.query(f"INSERT INTO app.t VALUES ({i})")
    wait_for(lambda: replica.query("SELECT count(*) FROM app.t") == "5", what="replication")
    with override_settings(DATABASES=pair_settings(primary, replica), DBHA=TEST_DBHA):
        assert dbha.available_db() == "first"
        assert dbha.status()[0].timeline == 0, "it never was a replica"
        # Promoted without demoting the primary: both writable.
        replica.query("STOP SLAVE")
        replica.query("SET GLOBAL read_only = 0")
        wait_for(lambda: dbha.available_db() == "second", what="writes on the promoted replica")
        first, second = dbha.status()
        assert first.role == second.role == "primary"
        assert first.split_brain
        assert not second.split_brain
        assert (second.timeline or 0) > (first.timeline or 0)
        for _ in range(3):
            dbha.check_now()
            assert dbha.available_db() == "second"

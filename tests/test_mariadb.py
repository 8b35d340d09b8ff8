"""The MySQL/MariaDB handshake probe against a real MariaDB server."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from django.test import override_settings

import dbha
from tests.conftest import MARIADB_PORT, TEST_DBHA, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


def mariadb_settings(**extra: Any) -> dict[str, Any]:
    return {
        "ENGINE": "django.db.backends.mysql",
        "HOST": "127.0.0.1",
        "PORT": MARIADB_PORT,
        "NAME": "mysql",
        "USER": "root",
        "PASSWORD": "s3cret-password",
        **extra,
    }


def state(alias: str) -> tuple[str, str | None]:
    record = next(s for s in dbha.status() if s.alias == alias)
    return record.state, record.last_error


def test_greeting_probe_follows_a_real_server(mariadb: Any) -> None:
    databases = {"my": mariadb_settings()}
    with override_settings(DATABASES=databases, DBHA=TEST_DBHA):
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
    with override_settings(DATABASES=databases, DBHA=TEST_DBHA):
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
        with override_settings(DATABASES=databases, DBHA=TEST_DBHA):
            dbha.available_db()
            status = state("my")
            assert status[0] == "down"
            assert status[1] is not None
            assert "1040" in status[1], status
    finally:
        for holder in holders:
            holder.close()

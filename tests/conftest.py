"""Test set-up: Django settings pointing at real local servers, and fixtures
that start those servers (PostgreSQL primary + 2 streaming standbys, MariaDB)
and always stop them."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import django
import pytest
from django.conf import settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from localdb import MariaDbServer, PgCluster, free_port

ALIASES = ("default", "failover1", "failover2")
PG_PORTS = {alias: free_port() for alias in ALIASES}
MARIADB_PORT = free_port()

#: Fast timing so that failovers happen within a test's patience.
TEST_DBHA: dict[str, Any] = {
    "CHECK_INTERVAL": 0.2,
    "CONNECT_TIMEOUT": 0.5,
    "RISE": 2,
    "FALL": 2,
}


def pg_settings(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": port,
        "NAME": "postgres",
        "USER": "postgres",
        "PASSWORD": "s3cret-password",
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"connect_timeout": 2},
        **extra,
    }


def pytest_configure(config: pytest.Config) -> None:
    settings.configure(
        DATABASES={alias: pg_settings(port) for alias, port in PG_PORTS.items()},
        DATABASE_ROUTERS=["dbha.ModelDatabaseRouter"],
        # auth, contenttypes and sessions (signed with SECRET_KEY, as the
        # pinning cookie is): the health view's "staff" access.
        SECRET_KEY="dbha-tests-only",
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "dbha",
            "tests.testapp",
        ],
        DBHA=TEST_DBHA,
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()


T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    """Polls `condition` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Cluster:
    """A running primary + 2 standbys on the ports in `settings.DATABASES`."""

    def __init__(self) -> None:
        self.pg = PgCluster(standbys=2, ports=[PG_PORTS[a] for a in ALIASES])
        self.pg.start()
        self.servers = dict(zip(ALIASES, self.pg.servers, strict=True))
        self._create_tables()

    def _create_tables(self) -> None:
        from django.db import connections

        from tests.testapp.models import Item, Report

        with connections["default"].schema_editor() as editor:
            editor.create_model(Item)
            editor.create_model(Report)
        connections.close_all()
        self.pg.wait_replayed()

    def pristine(self) -> bool:
        """Whether no test changed roles or stopped a server."""
        try:
            primary, *standbys = self.pg.servers
            return (
                all(s.running for s in self.pg.servers)
                and not primary.in_recovery()
                and all(s.in_recovery() for s in standbys)
            )
        except Exception:
            return False

    def stop(self) -> None:
        self.pg.stop()


@pytest.fixture(scope="session")
def cluster_pool() -> Iterator[dict[str, Cluster]]:
    pool: dict[str, Cluster] = {}
    yield pool
    if "cluster" in pool:
        pool.pop("cluster").stop()


@pytest.fixture
def cluster(cluster_pool: dict[str, Cluster], django_db_blocker: Any) -> Iterator[Cluster]:
    """A healthy cluster: reused while tests leave it intact, replaced after
    a test kills, stops or promotes one of its servers."""
    from django.db import connections

    import dbha

    with django_db_blocker.unblock():
        if "cluster" not in cluster_pool:
            cluster_pool["cluster"] = Cluster()
        current = cluster_pool["cluster"]
        try:
            yield current
        finally:
            dbha.close()
            connections.close_all()
            for server in current.pg.servers:
                if server.running:
                    server.resume()
            if not current.pristine():
                cluster_pool.pop("cluster").stop()


@pytest.fixture
def mariadb() -> Iterator[MariaDbServer]:
    import dbha

    server = MariaDbServer(port=MARIADB_PORT)
    server.start()
    try:
        yield server
    finally:
        dbha.close()
        server.cleanup()


@pytest.fixture(autouse=True)
def fresh_checker() -> Iterator[None]:
    """Every test starts with no checker: the first call reads settings."""
    import dbha

    dbha.close()
    yield
    dbha.close()

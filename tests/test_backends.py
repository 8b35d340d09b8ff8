"""The dbha database backends (`dbha.backends.postgresql`,
`dbha.backends.mysql`) against real servers: they work as Django's own,
and report server failures (not the application's errors) to dbha."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import psycopg
import pytest
from asgiref.local import Local
from django.core.management import call_command
from django.db import (
    IntegrityError,
    InternalError,
    OperationalError,
    ProgrammingError,
    connections,
    transaction,
)
from django.test import override_settings

import dbha
from dbha.backends.mysql.base import DatabaseWrapper as MySqlWrapper
from dbha.backends.postgresql.base import DatabaseWrapper as PgWrapper
from localdb import MariaDbServer, free_port
from tests.conftest import PG_PORTS, Cluster, pg_settings, wait_for
from tests.testapp.models import Item
from tests.workload import status

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")

PG_ENGINE = "dbha.backends.postgresql"
MY_ENGINE = "dbha.backends.mysql"
ROOT = Path(__file__).resolve().parent.parent


def _reset_connections() -> None:
    # Django's handler reads DATABASES once; override_settings alone would
    # leave it on the old engines.
    connections.close_all()
    connections.__dict__.pop("settings", None)
    connections._settings = None  # type: ignore[attr-defined]
    connections._connections = Local(connections.thread_critical)  # type: ignore[attr-defined]


@contextmanager
def use_databases(databases: dict[str, dict[str, Any]]) -> Iterator[None]:
    """`DATABASES` replaced for dbha and for Django's connections."""
    with override_settings(DATABASES=databases):
        _reset_connections()
        try:
            yield
        finally:
            _reset_connections()


def wrapped_cluster(**extra: Any) -> dict[str, dict[str, Any]]:
    return {alias: pg_settings(port, ENGINE=PG_ENGINE, **extra) for alias, port in PG_PORTS.items()}


def run(alias: str, *statements: str, atomic: bool = False) -> None:
    """Runs SQL on `alias`, in one transaction if `atomic`."""
    block = transaction.atomic(using=alias) if atomic else nullcontext()
    with block, connections[alias].cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)


def create_and_roll_back(name: str) -> None:
    with transaction.atomic():
        Item.objects.create(name=name)
        raise RuntimeError("roll back")


@pytest.fixture
def reports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The aliases reported to dbha, in order (the reports still go through)."""
    seen: list[str] = []
    real = dbha.report_failure

    def spy(alias: str) -> None:
        seen.append(alias)
        real(alias)

    monkeypatch.setattr(dbha, "report_failure", spy)
    return seen


# --- PostgreSQL --------------------------------------------------------------------------------


def test_orm_work_through_the_postgresql_backend(
    cluster: Cluster, reports: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    with use_databases(wrapped_cluster()):
        connection = connections["default"]
        assert isinstance(connection, PgWrapper)
        assert connection.vendor == "postgresql"
        item = Item.objects.create(name="orm-kept")
        assert item._state.db == "default"
        with transaction.atomic():
            Item.objects.create(name="orm-committed")
        with pytest.raises(RuntimeError):
            create_and_roll_back("orm-rolled-back")
        names = Item.objects.filter(name__startswith="orm-").values_list("name", flat=True)
        assert sorted(names) == ["orm-committed", "orm-kept"]
        # A server-side cursor (psycopg's named cursor, fetched in chunks).
        chunked = Item.objects.filter(name__startswith="orm-").iterator(chunk_size=1)
        assert sorted(i.name for i in chunked) == ["orm-committed", "orm-kept"]
        assert "testapp_item" in connection.introspection.table_names()
        Item.objects.filter(name__startswith="orm-").delete()
        capfd.readouterr()
        call_command("dbshell", "--", "-c", "select 6 * 7")
        assert "42" in capfd.readouterr().out
    assert reports == []


def test_errors_of_the_application_are_not_reported(cluster: Cluster, reports: list[str]) -> None:
    with use_databases(wrapped_cluster()):
        assert isinstance(connections["default"], PgWrapper)
        item = Item.objects.create(name="app-errors")
        with pytest.raises(IntegrityError) as integrity, transaction.atomic():
            Item.objects.create(id=item.id, name="same id")
        assert isinstance(integrity.value.__cause__, psycopg.errors.UniqueViolation)
        with pytest.raises(ProgrammingError, match="syntax"):
            run("default", "selec 1")
        with pytest.raises(OperationalError, match="statement timeout"):
            run("default", "SET LOCAL statement_timeout = 50", "SELECT pg_sleep(1)", atomic=True)
        # A lock timeout: another session holds the row.
        primary = cluster.servers["default"]
        with psycopg.connect(host="127.0.0.1", port=primary.port, user="postgres") as holder:
            holder.execute("SELECT 1 FROM testapp_item WHERE id = %s FOR UPDATE", [item.id])
            update = f"UPDATE testapp_item SET name = 'locked' WHERE id = {item.id}"
            with pytest.raises(OperationalError, match="lock timeout"):
                run("default", "SET LOCAL lock_timeout = 50", update, atomic=True)
            holder.rollback()
        Item.objects.filter(id=item.id).delete()
    assert reports == []


def test_a_write_on_a_standby_is_reported(cluster: Cluster, reports: list[str]) -> None:
    with use_databases(wrapped_cluster()):
        with pytest.raises(InternalError, match="read-only transaction") as raised:
            Item.objects.using("failover1").create(name="on a standby")
        assert isinstance(raised.value.__cause__, psycopg.errors.ReadOnlySqlTransaction)
    assert reports == ["failover1"]


def test_a_terminated_session_is_reported_once(cluster: Cluster, reports: list[str]) -> None:
    """The query that sees the session end, and the rollback that follows
    on the same dead connection, are one failure."""

    def terminated_in_a_transaction() -> None:
        with transaction.atomic(), connections["default"].cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (pid,) = cursor.fetchone()
            cluster.servers["default"].query(f"SELECT pg_terminate_backend({pid})")
            cursor.execute("SELECT 1")

    with use_databases(wrapped_cluster()):
        with pytest.raises(OperationalError, match="administrator command"):
            terminated_in_a_transaction()
        assert reports == ["default"]
        # The next connection works, and a new failure is news again.
        assert Item.objects.filter(name="nothing").count() == 0
    assert reports == ["default"]


def test_a_connect_timeout_on_a_hung_server_is_reported(
    cluster: Cluster, reports: list[str]
) -> None:
    with use_databases(wrapped_cluster(OPTIONS={"connect_timeout": 1})):
        cluster.servers["failover2"].pause()
        started = time.monotonic()
        with pytest.raises(OperationalError, match="timeout") as raised:
            Item.objects.using("failover2").count()
        assert time.monotonic() - started < 10
        assert isinstance(raised.value.__cause__, psycopg.OperationalError)
        cluster.servers["failover2"].resume()
    assert reports == ["failover2"]


def test_a_hung_primary_fails_fast_after_one_timed_out_connect(cluster: Cluster) -> None:
    """End to end, no spy: the application's connect through the backend
    times out once; dbha's probes time out too; from then on requests fail
    at once instead of waiting out the connect timeout each."""
    with use_databases(wrapped_cluster(OPTIONS={"connect_timeout": 2})):
        assert dbha.available_db() == "default"
        cluster.servers["default"].pause()
        wait_for(lambda: status("default").last_error == "timeout", what="a timed-out probe")
        with pytest.raises(OperationalError, match="timeout"):
            Item.objects.create(name="hung")
        started = time.monotonic()
        with pytest.raises(dbha.NoHealthyDatabase, match="failing for the application too"):
            Item.objects.create(name="fails fast")
        assert time.monotonic() - started < 0.5
        cluster.servers["default"].resume()


def test_a_killed_primary_fails_fast_after_one_refused_connect(
    cluster: Cluster, reports: list[str]
) -> None:
    """End to end: with ON_ALL_DOWN "last", dbha keeps answering the dead
    primary (Django raises its own error) until the application's refused
    connect through the backend reports it; then NoHealthyDatabase."""
    with use_databases(wrapped_cluster()):
        assert dbha.available_db() == "default"
        cluster.servers["default"].kill()
        wait_for(lambda: status("default").state == "down", what="the probes to see the kill")
        assert dbha.available_db() == "default", "unreported: the last writer"
        with pytest.raises(OperationalError, match="refused") as raised:
            Item.objects.create(name="refused")
        assert isinstance(raised.value.__cause__, psycopg.OperationalError)
        assert reports == ["default"]
        with pytest.raises(dbha.NoHealthyDatabase, match="failing for the application too"):
            dbha.available_db()


def test_a_report_never_replaces_the_database_error(
    reports: list[str], caplog: pytest.LogCaptureFixture, django_db_blocker: Any
) -> None:
    """A refused connect (nothing listens on the port) reported with broken
    DBHA settings, and for an alias dbha does not watch: the application
    sees the driver's error; the log has no password."""
    password = "pw-never-logged"
    refused = pg_settings(free_port(), ENGINE=PG_ENGINE, PASSWORD=password)
    caplog.set_level(logging.DEBUG, logger="dbha")
    with django_db_blocker.unblock(), use_databases({"default": refused, "other": refused}):
        broken = override_settings(DBHA={"FALL": password})
        with broken, pytest.raises(OperationalError, match="refused"):
            connections["default"].ensure_connection()
        assert reports == ["default"]
        assert "could not report that 'default' failed" in caplog.text
        assert "ImproperlyConfigured" in caplog.text
        watching_default = override_settings(DBHA={"DATABASES": ["default"]})
        with watching_default, pytest.raises(OperationalError, match="refused"):
            connections["other"].ensure_connection()
        assert reports == ["default", "other"]
        assert "'other' failed (no SQLSTATE" in caplog.text
        assert "dbha does not watch it" in caplog.text
    assert password not in caplog.text


def run_python(
    args: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Runs this interpreter with the repository (for `tests`) importable;
    `dbha` is the one this interpreter imports (the installed wheel, or
    what PYTHONPATH names: made absolute, as the child runs elsewhere)."""
    inherited = [
        str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    pythonpath = os.pathsep.join([*inherited, str(ROOT)])
    return subprocess.run(
        [sys.executable, *args],
        env={**os.environ, "PYTHONPATH": pythonpath, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_psycopg2(cluster: Cluster) -> None:
    databases = {
        "default": pg_settings(PG_PORTS["default"], ENGINE=PG_ENGINE),
        "failover1": pg_settings(PG_PORTS["failover1"], ENGINE=PG_ENGINE),
        "gone": pg_settings(free_port(), ENGINE=PG_ENGINE),
    }
    env = {"DBHA_TEST_DATABASES": json.dumps(databases)}
    done = run_python(["-m", "tests.djangoproject.psycopg2_client"], env, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["driver"] == "psycopg2"
    assert seen["orm"] == {"error": None, "cause": None, "result": ["psycopg2"], "reports": []}
    assert seen["standby_write"]["error"] == "InternalError"
    assert seen["standby_write"]["reports"] == ["failover1"]
    assert seen["syntax"]["error"] == "ProgrammingError"
    assert seen["statement_timeout"]["error"] == "OperationalError"
    assert seen["syntax"]["reports"] == seen["statement_timeout"]["reports"] == []
    assert seen["terminated"]["error"] == "OperationalError"
    assert seen["terminated"]["cause"].startswith("psycopg2")
    assert seen["terminated"]["reports"] == ["default"]
    assert seen["refused"]["error"] == "OperationalError"
    assert seen["refused"]["reports"] == ["gone"]


def run_django_tests(
    databases: dict[str, dict[str, Any]], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    record = tmp_path / "databases.txt"
    env = {
        "DBHA_TEST_DATABASES": json.dumps(databases),
        "DBHA_TEST_RECORD": str(record),
        "DJANGO_SETTINGS_MODULE": "tests.djangoproject.settings",
    }
    args = ["-m", "django", "test", "tests.djangoproject.runner_checks", "--parallel", "2"]
    done = run_python([*args, "--noinput", "-v", "2"], env, timeout=180)
    used = set(record.read_text().split()) if record.exists() else set()
    return done, used


def test_django_test_runner_creates_clones_and_destroys_databases(
    cluster: Cluster, tmp_path: Path
) -> None:
    databases = {"default": pg_settings(PG_PORTS["default"], ENGINE=PG_ENGINE)}
    done, used = run_django_tests(databases, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Ran 2 tests" in done.stderr
    assert "Cloning test database" in done.stderr
    assert used, done.stderr
    assert used <= {"test_postgres_1", "test_postgres_2"}
    left = cluster.servers["default"].query(
        "SELECT datname FROM pg_database WHERE datname ~ '^test_'"
    )
    assert left == ""


# --- MariaDB -----------------------------------------------------------------------------------


def mariadb_settings(server: MariaDbServer, **extra: Any) -> dict[str, Any]:
    return {
        "ENGINE": MY_ENGINE,
        "HOST": "127.0.0.1",
        "PORT": server.port,
        "NAME": "app",
        "USER": "app",
        "PASSWORD": "app-password",
        "CONN_MAX_AGE": 0,
        **extra,
    }


@pytest.fixture
def mariadb_app(mariadb: MariaDbServer, django_db_blocker: Any) -> Iterator[MariaDbServer]:
    """The server with a database `app`, and a user `app` without SUPER (so
    `read_only` applies to it) that owns it."""
    mariadb.query(
        "CREATE DATABASE app; CREATE USER app@'127.0.0.1' IDENTIFIED BY 'app-password';"
        "GRANT ALL ON app.* TO app@'127.0.0.1'"
    )
    with django_db_blocker.unblock():
        yield mariadb
    connections.close_all()


def test_orm_work_and_read_only_errors_on_mariadb(
    mariadb_app: MariaDbServer, reports: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    with use_databases({"default": mariadb_settings(mariadb_app)}):
        connection = connections["default"]
        assert isinstance(connection, MySqlWrapper)
        with connection.schema_editor() as editor:
            editor.create_model(Item)
        item = Item.objects.create(name="kept")
        with pytest.raises(RuntimeError):
            create_and_roll_back("rolled back")
        assert list(Item.objects.values_list("name", flat=True)) == ["kept"]
        assert "testapp_item" in connection.introspection.table_names()
        capfd.readouterr()
        call_command("dbshell", "--", "-e", "select 6 * 7")
        assert "42" in capfd.readouterr().out

        # The application's own errors.
        with pytest.raises(IntegrityError), transaction.atomic():
            Item.objects.create(id=item.id, name="same id")
        with pytest.raises(ProgrammingError):
            run("default", "selec 1")
        with pytest.raises(OperationalError, match="max_statement_time"):
            run("default", "SET STATEMENT max_statement_time = 0.05 FOR SELECT SLEEP(1)")
        assert reports == []

        # read_only: app has neither SUPER nor READ ONLY ADMIN.
        mariadb_app.query("SET GLOBAL read_only = 1")
        with pytest.raises(OperationalError, match="--read-only") as raised:
            Item.objects.create(name="read-only server")
        assert raised.value.args[0] == 1290
        assert reports == ["default"]
        mariadb_app.query("SET GLOBAL read_only = 0")

        insert = "INSERT INTO testapp_item (name) VALUES ('x')"
        with pytest.raises(OperationalError, match="READ ONLY transaction") as raised:
            run("default", "START TRANSACTION READ ONLY", insert, atomic=True)
        assert raised.value.args[0] == 1792
        assert reports == ["default", "default"]


def test_connection_failures_on_mariadb_are_reported(
    mariadb_app: MariaDbServer, reports: list[str]
) -> None:

    def killed_in_a_transaction() -> None:
        with transaction.atomic(), connections["default"].cursor() as cursor:
            cursor.execute("SELECT CONNECTION_ID()")
            (session,) = cursor.fetchone()
            mariadb_app.query(f"KILL {session}")
            cursor.execute("SELECT 1")

    settings = mariadb_settings(mariadb_app, OPTIONS={"connect_timeout": 1})
    with use_databases({"default": settings}):
        # A session killed under a transaction: one failure, not one per
        # statement on the dead connection.
        with pytest.raises(OperationalError) as raised:
            killed_in_a_transaction()
        assert raised.value.args[0] in (2006, 2013)
        assert reports == ["default"]
        connections.close_all()

        mariadb_app.pause()
        try:
            with pytest.raises(OperationalError) as raised:
                connections["default"].ensure_connection()
            assert raised.value.args[0] == 2013, raised.value
        finally:
            mariadb_app.resume()
        assert reports == ["default", "default"]

        mariadb_app.kill()
        with pytest.raises(OperationalError) as raised:
            connections["default"].ensure_connection()
        assert raised.value.args[0] == 2002, raised.value
        assert reports == ["default", "default", "default"]


def test_django_test_runner_on_mariadb(mariadb: MariaDbServer, tmp_path: Path) -> None:
    mariadb.query("CREATE DATABASE app")
    databases = {"default": {**mariadb_settings(mariadb), "USER": "root", "PASSWORD": ""}}
    done, used = run_django_tests(databases, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Ran 2 tests" in done.stderr
    assert "Cloning test database" in done.stderr
    assert used, done.stderr
    assert used <= {"test_app_1", "test_app_2"}
    assert mariadb.query("SHOW DATABASES LIKE 'test%'") == ""

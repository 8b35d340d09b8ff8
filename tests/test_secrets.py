"""No password reaches any output of dbha: distinctive passwords set
everywhere (the aliases, a monitoring login that is refused, malformed
values), then every entry point is read on a real cluster going through a
failover: log records at DEBUG, exceptions, system checks, `status()`,
`manage.py dbha`, the health view, the metrics and the backends' reports."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import OperationalError
from django.test import Client, override_settings
from prometheus_client import REGISTRY, generate_latest

import dbha
from dbha.management.commands.dbha import Command
from tests.conftest import PG_PORTS, TEST_DBHA, Cluster, pg_settings, wait_for
from tests.testapp.models import Item
from tests.workload import status, writer_is

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")

#: One per place a password can be given.
APP = "Al1as-Passw0rd-7f3a"
MONITOR = "M0nitor-Passw0rd-91c2"
SECRETS = (APP, MONITOR)


def allow_everyone(request: Any) -> bool:
    return True


@pytest.fixture
def monitored(cluster: Cluster) -> Iterator[Cluster]:
    """The aliases log in with APP; `default` is probed as a monitoring user
    whose password (MONITOR) the server refuses."""
    primary = cluster.servers["default"]
    primary.query(f"create user app_user superuser password '{APP}'")
    primary.query("create user monitor password 'another-one'")
    cluster.pg.wait_replayed()
    databases = {
        alias: pg_settings(port, USER="app_user", PASSWORD=APP, ENGINE="dbha.backends.postgresql")
        for alias, port in PG_PORTS.items()
    }
    settings = {
        **TEST_DBHA,
        "PROBE_CREDENTIALS": {"default": {"USER": "monitor", "PASSWORD": MONITOR}},
        "HEALTH_VIEW_ACCESS": allow_everyone,
    }
    scram = [f"host all {user} 127.0.0.1/32 scram-sha-256" for user in ("monitor", "app_user")]
    with (
        primary.hba_first(*scram),
        override_settings(DATABASES=databases, DBHA=settings, ROOT_URLCONF="tests.urls"),
    ):
        yield cluster


def outputs() -> list[str]:
    """What every read-only entry point shows now."""
    texts = [repr(dbha.status()), repr(dbha.group_status())]
    for argv in (["status"], ["status", "--json"], ["check", "--json"]):
        out, err = StringIO(), StringIO()
        with contextlib.suppress(SystemExit):  # its exit code: not what this test is about
            Command(stdout=out, stderr=err).run_from_argv(["manage.py", "dbha", *argv])
        texts += [out.getvalue(), err.getvalue()]
    texts.append(Client().get("/dbha/").content.decode())
    texts.append(generate_latest(REGISTRY).decode())
    return texts


def test_no_output_shows_a_password(monitored: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    wait_for(lambda: "authentication failed" in (status("default").last_error or ""),
             what="the monitoring login refused")  # fmt: skip
    seen += outputs()

    # A failover, with the application's own failures reported.
    monitored.servers["default"].kill()
    with pytest.raises(OperationalError) as failed:  # NoHealthyDatabase is one too
        Item.objects.create(name="secret-test")
    seen.append(str(failed.value))
    monitored.servers["failover2"].promote()
    wait_for(lambda: writer_is("failover2"), what="the promotion")
    seen += outputs()

    # A group with no writer at all raises, naming every alias and why.
    with override_settings(DBHA={**TEST_DBHA, "ON_ALL_DOWN": "raise", "DATABASES": ["default"]}):
        with pytest.raises(dbha.NoHealthyDatabase) as raised:
            dbha.available_db()
        seen.append(str(raised.value))

    seen += [record.getMessage() for record in caplog.records]
    seen += [repr(record.__dict__) for record in caplog.records]
    assert len(seen) > 20
    for secret in SECRETS:
        leaks = [text for text in seen if secret in text]
        assert not leaks, f"{secret} in {leaks[:1]}"


@pytest.mark.parametrize(
    "dbha_settings",
    [
        {"PROBE_CREDENTIAL": {"default": {"USER": "m", "PASSWORD": MONITOR}}},
        {"PROBE_CREDENTIALS": {"nope": {"USER": "m", "PASSWORD": MONITOR}}},
        {"PROBE_CREDENTIALS": {"default": {"USER": "m", "PASSWORD": [MONITOR]}}},
        {"PROBE_CREDENTIALS": {"default": {"USER": "m", "PASSWORD": MONITOR, "X": 1}}},
    ],
)
def test_no_settings_error_shows_a_password(dbha_settings: dict[str, Any]) -> None:
    databases = {
        alias: pg_settings(port, PASSWORD=(APP,)) if alias == "failover2" else pg_settings(port)
        for alias, port in PG_PORTS.items()
    }
    seen: list[str] = []
    with override_settings(DBHA=dbha_settings):
        with pytest.raises(ImproperlyConfigured) as raised:
            dbha.available_db()
        seen.append(str(raised.value))
        try:
            call_command("check", stdout=StringIO(), stderr=StringIO())
        except SystemCheckError as e:
            seen.append(str(e))
        out, err = StringIO(), StringIO()
        with pytest.raises(SystemExit):
            Command(stdout=out, stderr=err).run_from_argv(["manage.py", "dbha", "status"])
        seen += [out.getvalue(), err.getvalue()]
    with override_settings(DATABASES=databases, DBHA={}):
        with pytest.raises(ImproperlyConfigured) as raised:
            dbha.available_db()
        seen.append(str(raised.value))
    assert all("dbha" in text for text in seen if text)
    for secret in SECRETS:
        assert not [text for text in seen if secret in text]

"""Every dbha system check id, through `manage.py check` as a user runs it:
the id, the key and value in the message, and a hint."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

import dbha
from localdb import free_port
from tests.conftest import PG_PORTS, pg_settings

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")

SECRET = "s3cret-password"


class EveryModelToDefault:
    """A router that answers for every model: dbha would never be asked."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "default"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"


class OnlyAuth:
    """A router with an opinion on one app only: dbha routes the rest."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return "default" if model._meta.app_label == "auth" else None

    db_for_write = db_for_read


class Subclassed(dbha.ModelDatabaseRouter):
    """A project's router on top of dbha's."""


def databases(**extra: dict[str, Any]) -> dict[str, Any]:
    return {
        **{alias: pg_settings(port) for alias, port in PG_PORTS.items()},
        **extra,
    }


def check(**overrides: Any) -> str:
    """What `manage.py check` prints with these settings."""
    overrides.setdefault("DBHA", {})
    out, err = StringIO(), StringIO()
    with override_settings(**overrides):
        try:
            call_command("check", stdout=out, stderr=err)
        except SystemCheckError as e:
            return str(e)
    return out.getvalue() + err.getvalue()


ORACLE = {"ENGINE": "django.db.backends.oracle", "HOST": "127.0.0.1", "PORT": 1521}
SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}

CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("dbha.E001", {"DBHA": {"PROBE_CREDENTIAL": {}}}, ['DBHA["PROBE_CREDENTIAL"]', "did you mean"]),
    ("dbha.E002", {"DBHA": {"FALL": "2"}}, ["DBHA[\"FALL\"] = '2'"]),
    ("dbha.E003", {"DBHA": {"CHECK_INTERVAL": 1e-9}}, ['DBHA["CHECK_INTERVAL"] = 1e-09']),
    ("dbha.E004", {"DBHA": {"GROUPS": {"main": ["default", "nope"]}}}, ["'nope'"]),
    (
        "dbha.E004",
        {"DBHA": {"PROBE_CREDENTIALS": {"nope": {"USER": "m", "PASSWORD": SECRET}}}},
        ['DBHA["PROBE_CREDENTIALS"]["nope"]'],
    ),
    ("dbha.E004", {"DBHA": {"ROUTES": {"testapp": "nope"}}}, ['DBHA["ROUTES"]["testapp"]']),
    (
        "dbha.E005",
        {"DBHA": {"GROUPS": {"a": ["default"], "b": ["default", "failover1"]}}},
        ['DBHA["GROUPS"]["b"] = \'default\'', "already in group 'a'"],
    ),
    ("dbha.E006", {"DATABASES": databases(lite=SQLITE)}, ['DATABASES["lite"]["ENGINE"]']),
    (
        "dbha.E007",
        {"DATABASES": databases(multi=pg_settings(5432, HOST="db1,db2"))},
        ['DATABASES["multi"]["HOST"] = \'db1,db2\''],
    ),
    ("dbha.E008", {"DATABASES": databases(bad=pg_settings(0))}, ['DATABASES["bad"]["PORT"]']),
    (
        "dbha.E009",
        {"DBHA": {"PROBE_CREDENTIALS": {"default": {"USER": "monitor"}}}},
        ['DBHA["PROBE_CREDENTIALS"]["default"]', "PASSWORD"],
    ),
    (
        "dbha.E010",
        {"DATABASES": databases(twin=pg_settings(PG_PORTS["default"]))},
        ["['default', 'twin']", f"127.0.0.1:{PG_PORTS['default']}"],
    ),
    ("dbha.E011", {"DATABASE_ROUTERS": []}, ["DATABASE_ROUTERS = []"]),
    (
        "dbha.E012",
        {
            "DATABASE_ROUTERS": [
                "tests.test_checks.EveryModelToDefault",
                "dbha.ModelDatabaseRouter",
            ]
        },
        ["DATABASE_ROUTERS[0] = 'tests.test_checks.EveryModelToDefault'"],
    ),
    (
        "dbha.W001",
        {"DATABASES": databases(legacy={**ORACLE, "PORT": free_port()})},
        ['DATABASES["legacy"]["ENGINE"] = \'django.db.backends.oracle\'', "'tcp'"],
    ),
    (
        "dbha.W002",
        {"DATABASES": databases(default=pg_settings(PG_PORTS["default"], CONN_MAX_AGE=60))},
        ["DATABASES['default']['CONN_MAX_AGE'] = 60"],
    ),
    (
        "dbha.W002",
        {"DATABASES": databases(default=pg_settings(PG_PORTS["default"], CONN_MAX_AGE=None))},
        ["DATABASES['default']['CONN_MAX_AGE'] = None"],
    ),
    (
        "dbha.W003",
        {"DBHA": {"DATABASES": ["default"], "READS": "replicas"}},
        ["DBHA[\"READS\"] = 'replicas'"],
    ),
    (
        "dbha.W004",
        {"DBHA": {"CHECK_INTERVAL": 0.2, "CONNECT_TIMEOUT": 0.5}},
        ['DBHA["CONNECT_TIMEOUT"] = 0.5', "CHECK_INTERVAL (0.2)"],
    ),
]


@pytest.mark.parametrize(("check_id", "overrides", "expected"), CASES)
def test_each_problem_has_its_check_id(
    check_id: str, overrides: dict[str, Any], expected: list[str]
) -> None:
    output = check(**overrides)
    assert f"({check_id})" in output, output
    for text in expected:
        assert text in output, output
    assert "HINT:" in output
    assert SECRET not in output
    # One problem, one message: no catch-all id alongside.
    ids = {m.id for m in run_checks_with(overrides) if m.id.startswith("dbha.")}
    assert ids == {check_id}


def run_checks_with(overrides: dict[str, Any]) -> list[Any]:
    overrides.setdefault("DBHA", {})
    with override_settings(**overrides):
        return list(run_checks())


def test_a_router_with_opinions_on_some_models_is_fine() -> None:
    routers = ["tests.test_checks.OnlyAuth", "dbha.ModelDatabaseRouter"]
    assert "dbha." not in check(DATABASE_ROUTERS=routers)


def test_a_subclass_of_the_router_counts() -> None:
    routers = ["tests.test_checks.Subclassed"]
    assert "dbha." not in check(DATABASE_ROUTERS=routers)


def test_valid_settings_are_silent() -> None:
    assert "dbha." not in check()

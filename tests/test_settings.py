"""Settings: every bad value raises ImproperlyConfigured naming the key and
the value, settings are read lazily and re-read on override_settings."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

import dbha
from localdb import free_port
from tests.conftest import PG_PORTS, TEST_DBHA, pg_settings

BAD_DBHA: list[tuple[dict[str, Any], str, str, str]] = [
    ({"CHECK_INTERVAL": "1s"}, 'DBHA["CHECK_INTERVAL"]', "'1s'", "dbha.E002"),
    ({"CHECK_INTERVAL": 0}, 'DBHA["CHECK_INTERVAL"]', "= 0", "dbha.E003"),
    ({"CHECK_INTERVAL": -2.5}, 'DBHA["CHECK_INTERVAL"]', "-2.5", "dbha.E003"),
    ({"CHECK_INTERVAL": 1e-9}, 'DBHA["CHECK_INTERVAL"]', "1e-09", "dbha.E003"),
    ({"CONNECT_TIMEOUT": 1e-12}, 'DBHA["CONNECT_TIMEOUT"]', "1e-12", "dbha.E003"),
    ({"CONNECT_TIMEOUT": None}, 'DBHA["CONNECT_TIMEOUT"]', "None", "dbha.E002"),
    ({"CONNECT_TIMEOUT": True}, 'DBHA["CONNECT_TIMEOUT"]', "True", "dbha.E002"),
    ({"RISE": 1.5}, 'DBHA["RISE"]', "1.5", "dbha.E002"),
    ({"FALL": 0}, 'DBHA["FALL"]', "= 0", "dbha.E003"),
    ({"JITTER": 2}, 'DBHA["JITTER"]', "= 2", "dbha.E003"),
    ({"PROBE": "ping"}, 'DBHA["PROBE"]', "'ping'", "dbha.E003"),
    ({"PROBE": {"nope": "tcp"}}, 'DBHA["PROBE"]["nope"]', "'nope'", "dbha.E004"),
    ({"PROBE": {"default": "icmp"}}, 'DBHA["PROBE"]["default"]', "'icmp'", "dbha.E003"),
    ({"ON_ALL_DOWN": "panic"}, 'DBHA["ON_ALL_DOWN"]', "'panic'", "dbha.E003"),
    ({"FAILBACK": "always"}, 'DBHA["FAILBACK"]', "'always'", "dbha.E003"),
    ({"CHECK_INTERVALS": 1}, 'DBHA["CHECK_INTERVALS"]', "= 1", "dbha.E001"),
    ({"DATABASES": ["default", "replica"]}, 'DBHA["DATABASES"]', "'replica'", "dbha.E004"),
    ({"DATABASES": []}, 'DBHA["DATABASES"]', "[]", "dbha.E003"),
    ({"DATABASES": "default"}, 'DBHA["DATABASES"]', "'default'", "dbha.E002"),
    ({"GROUPS": {"main": []}}, 'DBHA["GROUPS"]["main"]', "[]", "dbha.E003"),
    (
        {"GROUPS": {"a": ["default"], "b": ["default", "failover1"]}},
        'DBHA["GROUPS"]["b"]',
        "'default'",
        "dbha.E005",
    ),
    (
        {"DATABASES": ["default"], "GROUPS": {"a": ["failover1"]}},
        'DBHA["GROUPS"]',
        "{'a': ['failover1']}",
        "dbha.E003",
    ),
    ({"ROUTES": {"shop": "reports"}}, 'DBHA["ROUTES"]["shop"]', "'reports'", "dbha.E004"),
    ({"ROUTES": {"a.b.c": "default"}}, 'DBHA["ROUTES"]["a.b.c"]', "'a.b.c'", "dbha.E003"),
    ({"PROBE": "patroni"}, 'DBHA["PROBE"]', "'patroni'", "dbha.E003"),
    ({"PROBE": ["patroni", "tcp"]}, 'DBHA["PROBE"]', "['patroni', 'tcp']", "dbha.E003"),
    ({"PATRONI": "http://h:8008"}, 'DBHA["PATRONI"]', "'http://h:8008'", "dbha.E002"),
    (
        {"PATRONI": {"nope": "http://h:8008"}},
        'DBHA["PATRONI"]["nope"]',
        "'http://h:8008'",
        "dbha.E004",
    ),
    (
        {"PROBE": "patroni", "PATRONI": {"default": "http://h:8008/leader"}},
        'DBHA["PATRONI"]["default"]',
        "'http://h:8008/leader'",
        "dbha.E003",
    ),
    (
        {"PATRONI": {"default": "http://h:8008"}},
        'DBHA["PATRONI"]["default"]',
        "'http://h:8008'",
        "dbha.E003",
    ),
]


@pytest.mark.parametrize(("dbha_settings", "key", "value", "check_id"), BAD_DBHA)
def test_bad_dbha_setting_names_key_and_value(
    dbha_settings: dict[str, Any], key: str, value: str, check_id: str
) -> None:
    with override_settings(DBHA=dbha_settings):
        with pytest.raises(ImproperlyConfigured) as raised:
            dbha.available_db()
        assert key in str(raised.value)
        assert value in str(raised.value)
        # The same problem is a system check error, with its own id.
        errors = [e for e in run_checks() if e.id.startswith("dbha.E")]
        assert [e.id for e in errors] == [check_id]
        assert str(raised.value) == errors[0].msg


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
@pytest.mark.parametrize(
    ("entry", "key", "value"),
    [
        ({"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}, '["ENGINE"]', "sqlite3"),
        (pg_settings(0), '["PORT"]', "= 0"),
        (pg_settings("54x"), '["PORT"]', "'54x'"),
        (pg_settings(5432, HOST="db1,db2"), '["HOST"]', "'db1,db2'"),
        ({"ENGINE": "django.db.backends.oracle", "HOST": "o"}, '["PORT"]', "None"),
    ],
)
def test_bad_database_entry_names_key_and_value(
    entry: dict[str, Any], key: str, value: str
) -> None:
    databases = {"default": pg_settings(PG_PORTS["default"]), "extra": entry}
    with override_settings(DATABASES=databases, DBHA={}):
        with pytest.raises(ImproperlyConfigured) as raised:
            dbha.available_db()
        message = str(raised.value)
        assert f'DATABASES["extra"]{key}' in message
        assert value in message
        assert "s3cret-password" not in message


def test_valid_settings_pass_the_system_check() -> None:
    # The tests' own timing (CONNECT_TIMEOUT above CHECK_INTERVAL) is a
    # warning: the defaults are not.
    with override_settings(DBHA={}):
        assert [e for e in run_checks() if e.id.startswith("dbha.")] == []


def test_unknown_group_and_alias_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown dbha group 'nope'"):
        dbha.available_db("nope")
    with pytest.raises(ValueError, match="does not watch alias 'nope'"):
        dbha.report_failure("nope")


def test_importing_dbha_reads_no_settings() -> None:
    # Without DJANGO_SETTINGS_MODULE, touching settings would raise.
    code = "import dbha, dbha.apps, dbha.checks, dbha.conf; print(dbha.__version__)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == dbha.__version__


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_settings_are_read_on_first_use_and_after_changes() -> None:
    # Nothing listens on these ports: every alias is down, and the default
    # policy answers the first alias.
    nowhere = {alias: pg_settings(free_port()) for alias in ("a", "b", "c")}
    with override_settings(DATABASES=nowhere, DBHA=TEST_DBHA):
        assert dbha.available_db() == "a"
        with override_settings(DBHA={**TEST_DBHA, "DATABASES": ["c", "a"]}):
            assert dbha.available_db() == "c"
            assert [s.alias for s in dbha.status()] == ["c", "a"]
        assert dbha.available_db() == "a"
        assert len(dbha.status()) == 3


SECRET = "s3cret-password"


@pytest.mark.parametrize(
    ("databases", "dbha_settings"),
    [
        # A password of the wrong type, quoted in the error.
        ({"default": pg_settings(PG_PORTS["default"], PASSWORD=(SECRET,))}, None),
        ({"default": pg_settings(PG_PORTS["default"], PASSWORD=[SECRET, 1])}, None),
        # DATABASES not a dict.
        ([{"PASSWORD": SECRET}], None),
        # Any value under a misspelled key.
        (None, {"PROBE_CREDENTIAL": {"default": {"USER": "m", "PASSWORD": SECRET}}}),
        # An error elsewhere, with the password in a credentials entry.
        (None, {"PROBE_CREDENTIALS": {"nope": {"USER": "m", "PASSWORD": SECRET}}}),
        # Patroni's REST API password: in a URL, of a wrong type, unknown alias.
        (None, {"PROBE": "patroni", "PATRONI": {"default": f"http://u:{SECRET}@h:8008"}}),
        (None, {"PATRONI": {"default": {"URL": "http://h:1", "PASSWORD": [SECRET]}}}),
        (None, {"PATRONI": {"nope": {"URL": "http://h:1", "USER": "u", "PASSWORD": SECRET}}}),
        (None, {"PATRONI": {"nope": f"http://u:{SECRET}@h:1"}}),
        (None, {"PATRONI": [f"http://u:{SECRET}@h:1"]}),
    ],
)
def test_no_settings_error_ever_shows_a_password(databases: Any, dbha_settings: Any) -> None:
    from django.conf import settings

    problems = dbha._core.validate_settings(databases or settings.DATABASES, dbha_settings)
    assert problems, "an error"
    assert all(SECRET not in message for _, message in problems)


def test_other_mappings_are_read_like_dicts() -> None:
    from types import MappingProxyType

    databases = MappingProxyType({"default": pg_settings(PG_PORTS["default"])})
    assert dbha._core.validate_settings(databases, None) == []


def test_an_alias_that_is_not_valid_text_is_refused() -> None:
    databases = {"de\udc80fault": pg_settings(PG_PORTS["default"])}
    [(check_id, message)] = dbha._core.validate_settings(databases, None)
    assert check_id == "dbha.E008"
    assert "lone surrogate" in message


def test_a_host_with_a_control_character_is_refused() -> None:
    databases = {"default": pg_settings(PG_PORTS["default"], HOST="db\x00\nfake log line")}
    [(check_id, message)] = dbha._core.validate_settings(databases, None)
    assert check_id == "dbha.E008"
    assert "\n" not in message
    assert r"'db\x00\nfake log line'" in message

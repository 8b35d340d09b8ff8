"""The health view against a real primary and 2 streaming standbys: 200 and
503, the verdict for everyone and node details for the requests
`HEALTH_VIEW_ACCESS` lets in (a callable, a dotted path, "staff"), 405 for
anything but GET and HEAD, no application database connection, no secret in
any body; and its system check, dbha.E013."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connections
from django.db.backends.signals import connection_created
from django.http import HttpRequest
from django.test import Client, override_settings

import dbha
from tests.conftest import ALIASES, TEST_DBHA, Cluster, wait_for
from tests.workload import status, writer_is

SECRET = "s3cret-password"
#: The test databases' USER and NAME: a DSN or a login would show it.
USER = "postgres"
URL = "/dbha/"
HEADER = "let-me-in"

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

HEALTHY = {"healthy": True, "groups": {"default": {"healthy": True}}}
NO_WRITER = {"healthy": False, "groups": {"default": {"healthy": False}}}


def header_allows(request: HttpRequest) -> bool:
    """An access rule, as a project might write one (by dotted path)."""
    return request.headers.get("X-Health-Token") == HEADER


def raises(request: HttpRequest) -> bool:
    raise RuntimeError("a broken access rule")


NOT_CALLABLE = 42


def access(rule: Any) -> Any:
    return override_settings(DBHA={**TEST_DBHA, "HEALTH_VIEW_ACCESS": rule})


@pytest.fixture
def site() -> Iterator[None]:
    with override_settings(ROOT_URLCONF="tests.urls", MIDDLEWARE=MIDDLEWARE):
        yield


def get(client: Client, *, allowed: bool = False) -> tuple[int, dict[str, Any]]:
    headers = {"X-Health-Token": HEADER} if allowed else {}
    response = client.get(URL, headers=headers)
    text = response.content.decode()
    assert SECRET not in text
    assert USER not in text
    assert response["Content-Type"] == "application/json"
    assert "no-store" in response["Cache-Control"]
    return response.status_code, json.loads(text)


def assert_details(body: dict[str, Any], writer: str | None) -> None:
    assert set(body) == {"healthy", "process", "groups"}
    assert body["process"]["pid"] == os.getpid()
    assert body["process"]["version"] == dbha.__version__
    group = body["groups"]["default"]
    assert group["writer"] == writer
    assert group["healthy"] is (writer is not None)
    assert [node["alias"] for node in group["nodes"]] == list(ALIASES)
    for node in group["nodes"]:
        assert node["endpoint"].startswith("127.0.0.1:")
        assert node["is_writer"] is (node["alias"] == writer)


def test_the_verdict_for_everyone_details_for_the_allowed(
    cluster: Cluster, site: None, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client()
    with access("tests.test_health_view.header_allows"):
        assert get(client) == (200, HEALTHY)
        code, body = get(client, allowed=True)
        assert code == 200
        assert_details(body, "default")

        cluster.servers["default"].kill()
        wait_for(lambda: status("default").state == "down", what="the primary down")
        assert get(client) == (503, NO_WRITER)
        code, body = get(client, allowed=True)
        assert code == 503
        assert_details(body, None)
        assert body["groups"]["default"]["route"] == "no_writer"
        assert body["groups"]["default"]["nodes"][0]["last_error"] == "connection refused"

        cluster.servers["failover1"].promote()
        wait_for(lambda: writer_is("failover1"), what="failover1 to take the writes")
        assert get(client) == (200, HEALTHY)
        code, body = get(client, allowed=True)
        assert code == 200
        assert_details(body, "failover1")
    # A 503 is an answer, not a server error to log for every poll.
    assert not [r for r in caplog.records if r.name == "django.request"]


@pytest.mark.parametrize(
    "rule", [header_allows, "tests.test_health_view.header_allows"], ids=["callable", "path"]
)
def test_access_by_a_callable_or_its_path(cluster: Cluster, site: None, rule: Any) -> None:
    client = Client()
    with access(rule):
        assert get(client) == (200, HEALTHY)
        code, body = get(client, allowed=True)
        assert code == 200
        assert_details(body, "default")


@pytest.mark.parametrize(
    "rule",
    [None, raises, lambda request: "yes", "nobody", "tests.nope.rule", NOT_CALLABLE],
    ids=["none", "raises", "truthy", "no-path", "no-module", "not-callable"],
)
def test_no_details_without_a_rule_that_says_true(cluster: Cluster, site: None, rule: Any) -> None:
    """Nobody by default; a rule that raises, returns something other than
    True, or is not a rule at all lets nobody in, and is no error page."""
    with access(rule):
        assert get(Client(), allowed=True) == (200, HEALTHY)


@pytest.fixture
def staff(cluster: Cluster) -> Iterator[tuple[Any, Any]]:
    """A staff user and a non-staff user, in the auth tables on the primary."""
    from django.contrib.auth.models import Group, Permission, User
    from django.contrib.contenttypes.models import ContentType
    from django.contrib.sessions.models import Session

    connection = connections["default"]
    existing = set(connection.introspection.table_names())
    with connection.schema_editor() as editor:
        for model in (ContentType, Permission, Group, User, Session):
            if model._meta.db_table not in existing:
                editor.create_model(model)
    admin, _ = User.objects.get_or_create(username="operator", defaults={"is_staff": True})
    member, _ = User.objects.get_or_create(username="member", defaults={"is_staff": False})
    connections.close_all()
    yield admin, member
    connections.close_all()


def test_staff_access(cluster: Cluster, site: None, staff: tuple[Any, Any]) -> None:
    admin, member = staff
    with access("staff"):
        assert get(Client()) == (200, HEALTHY)
        as_member = Client()
        as_member.force_login(member)
        assert get(as_member) == (200, HEALTHY)
        as_admin = Client()
        as_admin.force_login(admin)
        code, body = get(as_admin)
        assert code == 200
        assert_details(body, "default")
        connections.close_all()

        # The session and the user cannot be loaded without a writer: no
        # details, and the verdict all the same (not a 500).
        cluster.servers["default"].kill()
        wait_for(lambda: status("default").state == "down", what="the primary down")
        assert get(as_admin) == (503, NO_WRITER)


def test_no_application_connection_even_with_atomic_requests(
    cluster: Cluster, site: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for alias in ALIASES:
        monkeypatch.setitem(connections.settings[alias], "ATOMIC_REQUESTS", True)
    opened: list[str] = []

    def record(sender: Any, connection: Any, **kwargs: Any) -> None:
        opened.append(connection.alias)

    connection_created.connect(record)
    try:
        connections.close_all()
        with access("staff"):
            client = Client()
            assert get(client) == (200, HEALTHY)
            assert client.head(URL).status_code == 200
        with access(header_allows):
            code, body = get(Client(), allowed=True)
            assert code == 200
            assert_details(body, "default")
        assert opened == []
        # What the view is spared: a view that is not exempt opens a
        # connection to every database with ATOMIC_REQUESTS.
        assert Client().get("/plain/").status_code == 200
        assert sorted(opened) == sorted(ALIASES)
    finally:
        connection_created.disconnect(record)
        connections.close_all()


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_only_get_and_head(site: None, method: str) -> None:
    # With CSRF checks on, as a browser's request would have them.
    client = Client(enforce_csrf_checks=True)
    response = getattr(client, method)(URL)
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"FALL": 0}, 'DBHA["FALL"] = 0'),
        (
            {"PROBE_CREDENTIALS": {"nope": {"USER": "monitor", "PASSWORD": SECRET}}},
            'DBHA["PROBE_CREDENTIALS"]["nope"]',
        ),
    ],
    ids=["value", "credentials"],
)
def test_misconfigured_settings_answer_503(
    site: None, caplog: pytest.LogCaptureFixture, broken: dict[str, Any], message: str
) -> None:
    # get() checks that no body holds the password.
    with override_settings(DBHA={**TEST_DBHA, **broken, "HEALTH_VIEW_ACCESS": header_allows}):
        assert get(Client()) == (503, {"healthy": False, "groups": {}})
        code, body = get(Client(), allowed=True)
        assert code == 503
        assert message in body["error"]
        assert body["process"]["pid"] == os.getpid()
    # A server error, logged as one (unlike a group without a writer).
    assert [r.status_code for r in caplog.records if r.name == "django.request"] == [503, 503]


def check_output(rule: Any) -> str:
    """What `manage.py check` prints with this HEALTH_VIEW_ACCESS."""
    with override_settings(DBHA={"HEALTH_VIEW_ACCESS": rule}):
        try:
            call_command("check")
        except SystemCheckError as e:
            return str(e)
    return ""


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("admin", "'admin': neither 'staff' nor a dotted path"),
        ("tests.nope.rule", "'tests.nope.rule': cannot be imported"),
        (
            "tests.test_health_view.NOT_CALLABLE",
            "'tests.test_health_view.NOT_CALLABLE': names 'int', not a callable",
        ),
        (42, "42: must be None, 'staff', a callable or a dotted path"),
    ],
)
def test_an_invalid_rule_is_check_error_e013(rule: Any, expected: str) -> None:
    output = check_output(rule)
    assert "(dbha.E013)" in output
    assert f'dbha: DBHA["HEALTH_VIEW_ACCESS"] = {expected}' in output
    assert "HINT: Set it to None" in output


@pytest.mark.parametrize(
    "rule", [None, "staff", header_allows, "tests.test_health_view.header_allows"]
)
def test_a_valid_rule_passes_the_checks(rule: Any) -> None:
    assert "dbha." not in check_output(rule)

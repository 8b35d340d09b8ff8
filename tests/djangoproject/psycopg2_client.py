"""Run by `test_backends.py` in a subprocess: `dbha.backends.postgresql`
driven by psycopg2 (psycopg 3 hidden from Django) against the cluster in
DBHA_TEST_DATABASES; prints, as JSON, the error and reports of each step."""

# ruff: noqa: E402  (psycopg 3 must be hidden before Django is imported)
import sys

sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django takes psycopg 3 if it can

import json
import os
from collections.abc import Callable
from typing import Any

import django

os.environ["DJANGO_SETTINGS_MODULE"] = "tests.djangoproject.settings"
django.setup()

import psycopg2
from django.db import connections

import dbha
from tests.testapp.models import Item

reports: list[str] = []
real_report_failure = dbha.report_failure


def spy(alias: str) -> None:
    reports.append(alias)
    real_report_failure(alias)


dbha.report_failure = spy


def step(action: Callable[[], Any]) -> dict[str, Any]:
    reports.clear()
    outcome: dict[str, Any] = {"error": None, "cause": None}
    try:
        outcome["result"] = action()
    except Exception as exc:
        outcome["error"] = type(exc).__name__
        outcome["cause"] = type(exc.__cause__).__module__ if exc.__cause__ else None
    finally:
        connections.close_all()
    outcome["reports"] = list(reports)
    return outcome


def orm() -> list[str]:
    Item.objects.using("default").create(name="psycopg2")
    names = list(Item.objects.using("default").filter(name="psycopg2").values_list("name"))
    Item.objects.using("default").filter(name="psycopg2").delete()
    return [name for (name,) in names]


def run(alias: str, *statements: str) -> None:
    with connections[alias].cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)


def terminated() -> None:
    primary = connections.settings["default"]
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
        admin = psycopg2.connect(
            host=primary["HOST"], port=primary["PORT"], user=primary["USER"], dbname="postgres"
        )
        try:
            admin.autocommit = True
            admin.cursor().execute("SELECT pg_terminate_backend(%s)", [pid])
        finally:
            admin.close()
        cursor.execute("SELECT 1")


print(
    json.dumps(
        {
            "driver": connections["default"].Database.__name__,
            "orm": step(orm),
            "standby_write": step(lambda: Item.objects.using("failover1").create(name="x")),
            "syntax": step(lambda: run("default", "selec 1")),
            "statement_timeout": step(
                lambda: run("default", "SET statement_timeout = 50", "SELECT pg_sleep(1)")
            ),
            "terminated": step(terminated),
            "refused": step(lambda: run("gone", "SELECT 1")),
        }
    )
)
dbha.close()

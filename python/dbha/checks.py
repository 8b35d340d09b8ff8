"""Django system checks for dbha's settings, one stable id per problem
(documented in the README), each with a hint. Registered by
`AppConfig.ready()` when "dbha" is in INSTALLED_APPS."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import ImproperlyConfigured

from dbha import _core, conf, health

ROUTER = "dbha.ModelDatabaseRouter"

HINTS = {
    "dbha.E001": "DBHA accepts the keys listed in django-dbha's settings reference.",
    "dbha.E002": "See the settings reference in django-dbha's README for the type of each key.",
    "dbha.E003": "See the settings reference in django-dbha's README for the allowed values.",
    "dbha.E004": "Name aliases from settings.DATABASES and groups from DBHA['GROUPS'].",
    "dbha.E005": "An alias belongs to one failover group, once.",
    "dbha.E006": "SQLite has no server to fail over: leave SQLite aliases out of dbha's groups.",
    "dbha.E007": "Give each server its own alias and list the aliases in a group.",
    "dbha.E008": "dbha needs each watched alias's ENGINE, and a HOST and PORT it can reach.",
    "dbha.E009": (
        "Give each PROBE_CREDENTIALS entry its own PASSWORD ('' for none), so that the "
        "application's password is never sent as the monitoring user's."
    ),
    "dbha.E010": "Each alias of a failover group must name a server of its own.",
    "dbha.E013": (
        "Set it to None (nobody sees node details), 'staff', a callable that takes the "
        "request and returns True for those who may, or the dotted path of one."
    ),
    "dbha.W001": (
        "Writes fail over only when the host dies; a hung server or a promoted standby is "
        "not seen. Leave this alias out of dbha's groups if it is not a failover member."
    ),
    "dbha.W003": (
        "Replica reads need a group with a primary and a standby probed with 'role'; "
        "or set READS to 'writer'."
    ),
    "dbha.W004": "Set CONNECT_TIMEOUT below CHECK_INTERVAL.",
}


def check_settings(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """`DATABASES` and `DBHA` as dbha reads them (dbha.E001-E010, W001,
    W003, W004)."""
    databases, dbha, vendors = conf.read_settings()
    messages: list[CheckMessage] = []
    for check_id, message in _core.validate_settings(databases, dbha, vendors):
        kind = Error if check_id.startswith("dbha.E") else Warning
        messages.append(kind(message, hint=HINTS.get(check_id), id=check_id))
    return messages


def check_router(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """dbha's router is in `DATABASE_ROUTERS` (dbha.E011), and no router
    before it answers for every model (dbha.E012)."""
    routers = list(getattr(settings, "DATABASE_ROUTERS", []))
    position = next((i for i, r in enumerate(routers) if _is_dbha_router(r)), None)
    if position is None:
        return [
            Error(
                f"dbha: {ROUTER!r} is not in DATABASE_ROUTERS = {routers!r}: queries go "
                "to Django's default database whatever dbha finds",
                hint=f"Add {ROUTER!r} to DATABASE_ROUTERS.",
                id="dbha.E011",
            )
        ]
    for router in routers[:position]:
        if _answers_every_model(router):
            return [
                Error(
                    f"dbha: DATABASE_ROUTERS[{routers.index(router)}] = {_name(router)!r} "
                    f"comes before {ROUTER!r} and answers db_for_read and db_for_write for "
                    "every model, so dbha is never asked",
                    hint=f"Put {ROUTER!r} first, or let that router return None for the "
                    "models dbha should route.",
                    id="dbha.E012",
                )
            ]
    return []


def check_connections(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    """Kept connections to a watched alias (dbha.W002)."""
    databases = getattr(settings, "DATABASES", None)
    if not isinstance(databases, Mapping):
        return []
    watched = {a for _, aliases in _core.watched_groups(*conf.read_settings()) for a in aliases}
    if not watched:
        return []  # invalid settings: check_settings reports them
    try:
        entries = list(databases.items())
    except Exception:
        return []  # a mapping that cannot be read: dbha reads it as the dict it is
    messages: list[CheckMessage] = []
    for alias, entry in entries:
        if alias not in watched or not isinstance(entry, Mapping):
            continue
        try:
            age = entry.get("CONN_MAX_AGE", 0)
        except Exception:
            continue  # an entry that cannot be read: not dbha's to report
        if age is None or (isinstance(age, int | float) and age > 0):
            messages.append(
                Warning(
                    f"dbha: DATABASES[{alias!r}]['CONN_MAX_AGE'] = {age!r}: a request "
                    "thread keeps its connection to a database across requests, and "
                    "dbha moves only new queries; a kept connection to a server that "
                    "died fails on its next query (Django then drops it), and one to a "
                    "server that hangs waits for the operating system's TCP timeout",
                    hint="Use CONN_MAX_AGE = 0 for failover aliases, or set "
                    "CONN_HEALTH_CHECKS = True and keep CONN_MAX_AGE short; dbha's backends "
                    "(ENGINE 'dbha.backends.postgresql') report such failures so the next "
                    "request goes to the new writer.",
                    id="dbha.W002",
                )
            )
    return messages


def check_health_view_access(
    app_configs: Sequence[AppConfig] | None, **kwargs: Any
) -> list[CheckMessage]:
    """`DBHA["HEALTH_VIEW_ACCESS"]` names a rule the health view can apply
    (dbha.E013); the view itself shows no details while it does not."""
    try:
        health.access_rule(health.configured_access())
    except ImproperlyConfigured as e:
        return [Error(str(e), hint=HINTS["dbha.E013"], id="dbha.E013")]
    return []


def _is_dbha_router(router: Any) -> bool:
    """dbha's router, or a subclass (as a dotted path, class or instance)."""
    from django.utils.module_loading import import_string

    if isinstance(router, str):
        try:
            router = import_string(router)
        except ImportError:
            return False
    base = _core.ModelDatabaseRouter
    return isinstance(router, base) or (isinstance(router, type) and issubclass(router, base))


def _name(router: Any) -> str:
    return router if isinstance(router, str) else type(router).__qualname__


def _answers_every_model(router: Any) -> bool:
    """Whether `router` returns a database for reads and writes of every
    installed model (a router that fails to load is Django's to report)."""
    from django.utils.module_loading import import_string

    try:
        instance = import_string(router)() if isinstance(router, str) else router
        if isinstance(instance, type):
            instance = instance()
        read = getattr(instance, "db_for_read", None)
        write = getattr(instance, "db_for_write", None)
        if read is None or write is None:
            return False
        models = apps.get_models(include_auto_created=True)
        return bool(models) and all(
            read(model) is not None and write(model) is not None for model in models
        )
    except Exception:
        return False

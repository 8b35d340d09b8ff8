"""The health report shared by `manage.py dbha` and the health view: the
status as one JSON-ready document, and who may see its node details
(`DBHA["HEALTH_VIEW_ACCESS"]`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest

from dbha.status import GroupStatus, NodeStatus

logger = logging.getLogger("dbha")

ACCESS_KEY = 'DBHA["HEALTH_VIEW_ACCESS"]'

#: A node's keys in the document, in this order. Listed rather than taken
#: from `NodeStatus.as_dict()`, so that a field added to the record reaches
#: scripts and the public view only once someone decided it may.
NODE_FIELDS = (
    "alias",
    "group",
    "endpoint",
    "state",
    "since",
    "role",
    "latency",
    "lag",
    "timeline",
    "last_error",
    "checked_at",
    "successes",
    "failures",
    "is_writer",
    "is_reader",
    "split_brain",
    "probe_errors",
    "reports",
)

AccessRule = Callable[[HttpRequest], Any]


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def node_document(node: NodeStatus) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for field in NODE_FIELDS:
        value = getattr(node, field)
        document[field] = iso(value) if isinstance(value, datetime) else value
    document["probe_errors"] = dict(node.probe_errors)
    return document


def group_document(group: GroupStatus) -> dict[str, Any]:
    return {
        "healthy": group.healthy,
        "route": group.route,
        "writer": group.writer,
        "last_writer": group.last_writer,
        "readers": list(group.readers),
        "aliases": list(group.aliases),
        "writer_changes": group.writer_changes,
        "nodes": [node_document(node) for node in group.nodes],
    }


def process_document() -> dict[str, Any]:
    """Which process answered: each worker of a server has its own checker
    and may, for a moment, see things differently."""
    from dbha import __version__

    return {
        "pid": os.getpid(),
        "version": __version__,
        "time": iso(datetime.now(timezone.utc)),
    }


def healthy(groups: list[GroupStatus]) -> bool:
    return all(group.healthy for group in groups)


def document(groups: list[GroupStatus]) -> dict[str, Any]:
    """Everything: the verdict, the process, every group and node."""
    return {
        "healthy": healthy(groups),
        "process": process_document(),
        "groups": {group.name: group_document(group) for group in groups},
    }


def summary(groups: list[GroupStatus]) -> dict[str, Any]:
    """The verdict per group only: what anyone may see."""
    return {
        "healthy": healthy(groups),
        "groups": {group.name: {"healthy": group.healthy} for group in groups},
    }


def error_document(message: str | None) -> dict[str, Any]:
    """The document when dbha's settings are invalid (`message` None: not
    shown to this reader)."""
    found: dict[str, Any] = {"healthy": False, "groups": {}}
    if message is not None:
        found["process"] = process_document()
        found["error"] = message
    return found


def configured_access() -> object:
    from django.conf import settings

    dbha = getattr(settings, "DBHA", None)
    if not isinstance(dbha, Mapping):
        return None
    try:
        return dbha.get("HEALTH_VIEW_ACCESS")
    except Exception:
        # A DBHA that cannot be read is dbha.E002 (check_settings); nobody
        # sees details meanwhile.
        return None


def access_rule(value: object) -> AccessRule | None:
    """The rule `value` names: None (nobody), "staff", a callable, or the
    dotted path of one. Raises ImproperlyConfigured for anything else."""
    if value is None:
        return None
    try:
        staff = bool(value == "staff")
    except Exception:
        staff = False  # an object whose comparison fails is no rule either
    if staff:
        return is_staff
    if isinstance(value, str):
        if "." not in value:
            raise ImproperlyConfigured(
                f"dbha: {ACCESS_KEY} = {value!r}: neither 'staff' nor a dotted path"
            )
        from django.utils.module_loading import import_string

        try:
            target: object = import_string(value)
        except Exception as e:
            raise ImproperlyConfigured(
                f"dbha: {ACCESS_KEY} = {value!r}: cannot be imported ({e})"
            ) from e
        if not callable(target):
            raise ImproperlyConfigured(
                f"dbha: {ACCESS_KEY} = {value!r}: names {type(target).__name__!r}, not a callable"
            )
        return target
    if callable(value):
        return value
    raise ImproperlyConfigured(
        f"dbha: {ACCESS_KEY} = {_quoted(value)}: must be None, 'staff', a callable or a dotted path"
    )


def _quoted(value: object) -> str:
    """`repr(value)`, or its type when its repr fails: the error must be
    ImproperlyConfigured, never the repr's own exception."""
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__qualname__} object>"


def is_staff(request: HttpRequest) -> bool:
    """A logged-in staff user (needs Django's auth middleware)."""
    user = getattr(request, "user", None)
    return user is not None and bool(user.is_authenticated and user.is_staff)


def may_see_details(request: HttpRequest) -> bool:
    """Whether `request` passes `HEALTH_VIEW_ACCESS`. Fails closed: a broken
    setting, a rule that raises, or the database behind the session and user
    being down (the very thing the view reports) mean no details, never an
    error page."""
    try:
        rule = access_rule(configured_access())
    except ImproperlyConfigured:
        logger.exception("dbha: the health view shows no details")
        return False
    if rule is None:
        return False
    try:
        return rule(request) is True
    except Exception:
        logger.warning(
            "dbha: %s raised; the health view shows no details", ACCESS_KEY, exc_info=True
        )
        return False

"""dbha's settings as Django holds them: read lazily, on first use, never at
import time (the checker calls `read_settings()` when it starts), and read
again when `override_settings` changes `DATABASES` or `DBHA`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core.signals import setting_changed

from dbha import _core

WATCHED_SETTINGS = frozenset({"DATABASES", "DBHA"})


def read_settings() -> tuple[Any, Any, dict[str, str]]:
    """`settings.DATABASES`, `settings.DBHA` (None when unset) and the
    backends' vendors."""
    from django.conf import settings

    databases = settings.DATABASES
    return databases, getattr(settings, "DBHA", None), vendors(databases)


def vendors(databases: Any) -> dict[str, str]:
    """Each alias's backend `vendor` (`"postgresql"`, `"mysql"`...), as the
    backend class says: PostGIS, connection-pool and metrics wrappers are
    then probed as what they speak to. A backend that cannot be loaded is
    left out; dbha then goes by its `ENGINE` name."""
    from django.db.utils import load_backend

    found: dict[str, str] = {}
    if not isinstance(databases, Mapping):
        return found
    try:
        entries = list(databases.items())
    except Exception:
        # A mapping that cannot be read: dbha's validation reports it (or
        # reads it as the dict it is), never this function's exception.
        return found
    for alias, entry in entries:
        try:
            engine = entry.get("ENGINE") if isinstance(entry, Mapping) else None
        except Exception:
            continue
        if not isinstance(alias, str) or not isinstance(engine, str) or not engine:
            continue
        try:
            vendor = load_backend(engine).DatabaseWrapper.vendor
        except Exception:
            # Django raises its own error when the alias is used.
            continue
        if isinstance(vendor, str):
            found[alias] = vendor
    return found


def reset_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting in WATCHED_SETTINGS:
        _core.reset()


# Connected when dbha is imported, not in `AppConfig.ready()`: the router
# works without "dbha" in INSTALLED_APPS, and so must this.
setting_changed.connect(reset_on_change, dispatch_uid="dbha.reset_on_change")

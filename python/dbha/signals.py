"""Restarts the checker from fresh settings when `DATABASES` or `DBHA`
change (`override_settings` in tests).

Connected when `dbha` is imported, not in `AppConfig.ready()`: the router
works without "dbha" in `INSTALLED_APPS`, and so must this.
"""

from typing import Any

from django.core.signals import setting_changed

from dbha import _core

WATCHED_SETTINGS = frozenset({"DATABASES", "DBHA"})


def reset_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting in WATCHED_SETTINGS:
        _core.reset()


setting_changed.connect(reset_on_change, dispatch_uid="dbha.reset_on_change")

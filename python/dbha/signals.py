"""The Django signals dbha listens to: `setting_changed` restarts the
checker from fresh settings when `DATABASES` or `DBHA` change
(`override_settings` in tests); `pre_migrate` stops a migration aimed at a
standby (`dbha.migrate`).

Connected when `dbha` is imported, not in `AppConfig.ready()`: the router
works without "dbha" in `INSTALLED_APPS`, and so must this.
"""

from typing import Any

from django.core.signals import setting_changed
from django.db.models.signals import pre_migrate

from dbha import _core
from dbha.migrate import refuse_non_writer

WATCHED_SETTINGS = frozenset({"DATABASES", "DBHA"})


def reset_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting in WATCHED_SETTINGS:
        _core.reset()


setting_changed.connect(reset_on_change, dispatch_uid="dbha.reset_on_change")
pre_migrate.connect(refuse_non_writer, dispatch_uid="dbha.refuse_non_writer")

"""Keeps `migrate` off a group's standbys and fenced primaries: migrations
apply to the writer, and replication carries them to the rest. The router's
`allow_migrate` already makes `makemigrations` skip those aliases; this
stops `migrate --database <one of them>` with a message naming the writer."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError
from django.db.models.signals import pre_migrate

from dbha import _core


def refuse_non_writer(*, using: str, **kwargs: Any) -> None:
    """A `pre_migrate` receiver."""
    record = next((r for r in _core.status() if r.alias == using), None)
    if record is None or not (record.role == "standby" or record.split_brain):
        return
    what = "a standby" if record.role == "standby" else "a fenced primary (split brain)"
    writer = _core.group_writer(using)
    raise CommandError(
        f"dbha: {using!r} is {what}: migrations apply to the writer of group "
        f"{record.group!r}, now {writer!r}, and replication carries them to "
        f"{using!r}. Run: migrate --database {writer}"
    )


# Connected when dbha is imported (see `dbha.conf`).
pre_migrate.connect(refuse_non_writer, dispatch_uid="dbha.refuse_non_writer")

"""Tells dbha when a `transaction.atomic()` block opens and closes in a
thread, so that reads inside one on the writer stay on the writer (a read
from a standby there could see older data than the transaction writes on).

Installed by the checker when `DBHA["READS"]` lets reads leave the writer.
It wraps `Atomic.__enter__` and `__exit__`: the router then knows of an
open block by a counter of its own, not by asking Django's connection on
every read."""

from __future__ import annotations

import functools
from types import TracebackType
from typing import Any

from django.db import DEFAULT_DB_ALIAS
from django.db.transaction import Atomic

from dbha import _core


def track_atomic_blocks() -> None:
    """Wraps `Atomic` once per process (idempotent)."""
    if getattr(Atomic, "_dbha_tracked", False):
        return
    enter, exit_ = Atomic.__enter__, Atomic.__exit__

    @functools.wraps(enter)
    def __enter__(self: Atomic) -> Any:
        entered = enter(self)
        _core.count_atomic(self.using or DEFAULT_DB_ALIAS, True)
        return entered

    @functools.wraps(exit_)
    def __exit__(
        self: Atomic,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> Any:
        try:
            return exit_(self, exc_type, exc, traceback)
        finally:
            _core.count_atomic(self.using or DEFAULT_DB_ALIAS, False)

    Atomic.__enter__ = __enter__  # type: ignore[method-assign]
    Atomic.__exit__ = __exit__  # type: ignore[method-assign]
    Atomic._dbha_tracked = True  # type: ignore[attr-defined]

"""Tells dbha when a transaction opens and closes in a thread, so that
reads inside one on the writer stay on the writer (a read from a standby
there could see older data than the transaction writes on).

Installed by the checker when `DBHA["READS"]` lets reads leave the writer.
It wraps `Atomic.__enter__` and `__exit__`, and the connections'
`set_autocommit` (transactions opened by turning autocommit off): the router
then knows of an open transaction by counters of its own, not by asking
Django's connection on every read. A thread's counters start from what
Django's connections know (`open_transactions`), so that blocks opened
before dbha started, or in the parent before a fork, count too."""

from __future__ import annotations

import functools
from types import TracebackType
from typing import Any

from django.db import DEFAULT_DB_ALIAS
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.transaction import Atomic

from dbha import _core


def track_transactions() -> None:
    """Wraps `Atomic` and `set_autocommit` once per process (idempotent)."""
    if getattr(Atomic, "_dbha_tracked", False):
        return
    set_autocommit = BaseDatabaseWrapper.set_autocommit

    @functools.wraps(set_autocommit)
    def tracked_set_autocommit(
        self: BaseDatabaseWrapper,
        autocommit: bool,
        force_begin_transaction_with_broken_autocommit: bool = False,
    ) -> None:
        set_autocommit(self, autocommit, force_begin_transaction_with_broken_autocommit)
        _core.count_autocommit(self.alias, autocommit)

    enter, exit_ = Atomic.__enter__, Atomic.__exit__

    # Counted before Django's own step: a thread's first dbha call (here)
    # starts its count from Django's open blocks, which then must not yet
    # include this one (entering) or must still include it (leaving).
    @functools.wraps(enter)
    def __enter__(self: Atomic) -> Any:
        alias = self.using or DEFAULT_DB_ALIAS
        _core.count_atomic(alias, True)
        try:
            return enter(self)
        except BaseException:
            _core.count_atomic(alias, False)
            raise

    @functools.wraps(exit_)
    def __exit__(
        self: Atomic,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> Any:
        _core.count_atomic(self.using or DEFAULT_DB_ALIAS, False)
        return exit_(self, exc_type, exc, traceback)

    BaseDatabaseWrapper.set_autocommit = tracked_set_autocommit  # type: ignore[method-assign]
    Atomic.__enter__ = __enter__  # type: ignore[method-assign]
    Atomic.__exit__ = __exit__  # type: ignore[method-assign]
    Atomic._dbha_tracked = True  # type: ignore[attr-defined]


def open_transactions(aliases: list[str]) -> list[tuple[int, bool]]:
    """Per alias, this thread's open `atomic()` blocks and whether its
    connection has autocommit off, as Django's connection knows them (never
    opening a connection)."""
    from django.db import connections

    found = []
    for alias in aliases:
        try:
            connection = connections[alias]
        except Exception:
            found.append((0, False))
            continue
        manual = connection.connection is not None and not connection.autocommit
        found.append((len(connection.atomic_blocks), manual))
    return found

"""The hook the dbha backends put into Django: its error wrapper, which sees
every driver exception before Django converts it, reports those that count
(`dbha.backends.failures`) with `dbha.report_failure()`."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from types import ModuleType, TracebackType
from typing import Any

from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.utils import DatabaseErrorWrapper

import dbha
from dbha.backends.failures import Verdict

log = logging.getLogger(__name__)

#: A vendor's classification: driver exception and DB-API module → verdict.
Classifier = Callable[[BaseException, ModuleType], Verdict]


class FailureReporter(DatabaseErrorWrapper):
    """Django's `DatabaseErrorWrapper` (every connect, execute, fetch,
    commit and rollback runs inside it) that first reports a failure of
    the server, then lets Django convert and raise the error as usual."""

    def __init__(
        self, wrapper: BaseDatabaseWrapper, driver: ModuleType, classify: Classifier
    ) -> None:
        super().__init__(wrapper)
        self.database_wrapper = wrapper
        self.driver = driver
        self.classify = classify
        # The driver connection last reported lost: its later errors (the
        # rollback after a failed query) are the same failure.
        self._lost: weakref.ref[Any] | None = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Every successful query comes here: exactly Django's own cost.
        if exc_type is None:
            return
        if exc_value is not None:
            self._consider(exc_value)
        DatabaseErrorWrapper.__exit__(self, exc_type, exc_value, traceback)

    def _consider(self, exc: BaseException) -> None:
        wrapper = self.database_wrapper
        try:
            verdict = self.classify(exc, self.driver)
            if not verdict.counts:
                return
            if verdict.kind == "connection" and self._seen_lost(wrapper.connection):
                return
            report(wrapper.alias, verdict, wrapper.settings_dict.get("PASSWORD"))
        except Exception as error:
            # A bug here must not replace the database error the caller sees.
            log.warning(
                "dbha: could not classify a database error of %r: %s",
                wrapper.alias,
                type(error).__name__,
            )

    def _seen_lost(self, connection: object) -> bool:
        """Whether `connection` was reported lost before; remembers it."""
        if connection is None:
            return False  # a failed connect: every attempt is news
        if self._lost is not None and self._lost() is connection:
            return True
        try:
            self._lost = weakref.ref(connection)
        except TypeError:  # a driver object without weak references
            self._lost = None
        return False


def report(alias: str, verdict: Verdict, password: object = None) -> None:
    """Reports `alias` to dbha; never raises, never logs a password."""
    if alias == NO_DB_ALIAS:
        return  # Django's maintenance connection (test databases): no alias of dbha's
    try:
        dbha.report_failure(alias)
    except ValueError:
        log.debug("dbha: %r failed (%s); dbha does not watch it", alias, verdict.reason)
        return
    except Exception as error:
        # A settings problem (ImproperlyConfigured) must not hide the
        # database error; dbha's own messages never hold a password, and
        # this one's is taken out of anything else.
        text = str(error)
        if isinstance(password, str) and password:
            text = text.replace(password, "***")
        log.warning(
            "dbha: could not report that %r failed (%s): %s: %s",
            alias,
            verdict.reason,
            type(error).__name__,
            text,
        )
        return
    log.info("dbha: %r failed for the application (%s); reported", alias, verdict.reason)

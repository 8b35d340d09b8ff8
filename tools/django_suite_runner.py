"""The test runner named by the settings that tools/django_suite.py writes:
Django's own DiscoverRunner, which also appends each test's outcome as a JSON
line to the file in $DBHA_SUITE_OUTCOMES, so that runs compare test by test
rather than by parsing interleaved console text."""

from __future__ import annotations

import json
import os
import time
import unittest
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.test.runner import DiscoverRunner

if TYPE_CHECKING:
    from _typeshed import OptExcInfo as _ExcInfo


def _append(record: dict[str, Any]) -> None:
    # Opened per record: a run killed at its timeout still leaves every
    # outcome so far.
    with open(os.environ["DBHA_SUITE_OUTCOMES"], "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


class RecordingResult(unittest.TextTestResult):
    """unittest's console result (the `-v 2` lines are unchanged), plus the
    outcome file. Under `--parallel` the workers' events are replayed on
    this object in the parent, so only one process writes the file."""

    def _record(self, test: Any, outcome: str, err: _ExcInfo | None = None) -> None:
        record = {"test": test.id(), "outcome": outcome}
        if err is not None and err[0] is not None:
            # Enough to tell one cause from another; the log has the traceback.
            text = str(err[1]).strip().splitlines()
            record["error"] = f"{err[0].__name__}: {text[0] if text else ''}"[:300]
        _append(record)

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test: unittest.TestCase, err: _ExcInfo) -> None:
        super().addFailure(test, err)
        self._record(test, "failed", err)

    def addError(self, test: unittest.TestCase, err: _ExcInfo) -> None:
        super().addError(test, err)
        self._record(test, "error", err)

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._record(test, "skipped")

    def addExpectedFailure(self, test: unittest.TestCase, err: _ExcInfo) -> None:
        super().addExpectedFailure(test, err)
        self._record(test, "expected failure")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._record(test, "unexpected success")

    def addSubTest(
        self, test: unittest.TestCase, subtest: unittest.TestCase, err: _ExcInfo | None
    ) -> None:
        super().addSubTest(test, subtest, err)
        # A passing subtest is not reported on its own (unittest does the
        # same); a failing one makes its test report neither success nor
        # failure, so the subtest's line is the only trace of it.
        if err is not None and err[0] is not None:
            failed = issubclass(err[0], test.failureException)
            self._record(subtest, "failed" if failed else "error", err)


#: How long a standby may take to qualify for reads once the test databases exist.
READERS_TIMEOUT = 30.0


class RecordingRunner(DiscoverRunner):
    def get_resultclass(self) -> Any:
        # Debug options pick their own result classes; the suite uses none.
        return super().get_resultclass() or RecordingResult

    def setup_databases(self, **kwargs: Any) -> Any:
        old_config = super().setup_databases(**kwargs)
        config = getattr(settings, "DBHA", {})
        if config.get("READS", "writer") != "writer":
            _await_replica_reads(list(config.get("GROUPS", [None])))
        return old_config

    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        if "dbha.ModelDatabaseRouter" in settings.DATABASE_ROUTERS:
            # What dbha saw at the end: evidence that it watched the run.
            import dbha

            nodes = [
                {"alias": n.alias, "role": n.role, "state": n.state, "writer": n.is_writer}
                for n in dbha.status()
            ]
            _append({"dbha": nodes})
        super().teardown_databases(old_config, **kwargs)


def _await_replica_reads(groups: list[str | None]) -> None:
    """Wait until a standby of every group takes reads. The test processes
    fork from this one and start from its health snapshot, so every test
    then runs with replica reads on, not only those that come after the
    standby's first probes (the whole run takes a few seconds)."""
    import dbha

    def standby_reads(group: str | None) -> bool:
        # Not compared with available_db(): that counts as a write, after
        # which this thread's reads wait for the standby to replay it.
        standbys = {r.alias for r in dbha.status(group) if r.role == "standby"}
        return dbha.read_db(group) in standbys

    deadline = time.monotonic() + READERS_TIMEOUT
    while not all(standby_reads(group) for group in groups):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"no standby took reads within {READERS_TIMEOUT:g} s: {dbha.status()}"
            )
        time.sleep(0.1)

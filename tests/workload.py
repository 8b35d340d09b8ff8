"""What the tests do to the databases through dbha, as an application would:
write through the router and remember who acknowledged what."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connections

import dbha
from tests.conftest import Cluster
from tests.testapp.models import Item


def status(alias: str) -> dbha.NodeStatus:
    return next(s for s in dbha.status() if s.alias == alias)


def writer_is(alias: str) -> bool:
    try:
        return dbha.available_db() == alias
    except dbha.NoHealthyDatabase:
        # The writer is down and reported failing: not yet `alias`.
        return False


def names_on(cluster: Cluster, alias: str) -> set[str]:
    out = cluster.servers[alias].query("select name from testapp_item")
    return set(out.split()) if out else set()


class Writer:
    """Writes through the router in a background thread, as an application
    would (a connection per write, failures reported), and remembers which
    alias acknowledged each write."""

    def __init__(self, report_failures: bool = True) -> None:
        self.report_failures = report_failures
        self.acked: dict[str, str] = {}  # write name -> alias that committed it
        self.acked_at: dict[str, float] = {}
        #: Writes that raised: a commit whose answer was lost may still be
        #: on a server (and on the standbys that replayed it).
        self.unacknowledged: set[str] = set()
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set() and n < 100_000:
            n += 1
            name = f"w{n}"
            try:
                alias = Item.objects.create(name=name)._state.db
                self.acked[name] = alias
                self.acked_at[name] = time.monotonic()
            except Exception:
                self.failed += 1
                self.unacknowledged.add(name)
                if self.report_failures:
                    dbha.report_failure("default")  # any alias of the group
            finally:
                connections.close_all()
            time.sleep(0.01)

    @contextmanager
    def running(self) -> Iterator[Writer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=30)

    def by(self, alias: str) -> set[str]:
        return {name for name, a in self.acked.items() if a == alias}

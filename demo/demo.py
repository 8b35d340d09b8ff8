"""The django-dbha demo: a real PostgreSQL primary and two streaming
standbys, a small Django workload routed by dbha, the primary killed, a
standby promoted, and a timeline of where every write went.

    make demo        (or: python demo/demo.py, with dbha installed)
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import localdjango

import localdb

WRITE_EVERY = 0.05  # seconds between writes
KILL_AFTER = 3.0  # seconds of normal operation before the primary dies
PROMOTE_AFTER = 2.0  # seconds the cluster has no primary (an operator's delay)
RUN_AFTER = 3.0  # seconds of operation on the new primary


@dataclass
class Write:
    at: float
    alias: str
    ok: bool
    error: str = ""


def require_postgres() -> None:
    if not (localdb.pg_bindir() / "initdb").exists():
        sys.exit(
            "PostgreSQL server binaries were not found (initdb, postgres).\n"
            "Install them, e.g. on Debian/Ubuntu:  sudo apt-get install postgresql\n"
            "(`make demo` does this for you when run as root or with sudo)."
        )


def main() -> int:
    require_postgres()
    print("Starting PostgreSQL: a primary and two streaming standbys on loopback...")
    with localdb.PgCluster(standbys=2) as cluster:
        Order = localdjango.configure(cluster)
        from django.db import connections

        import dbha

        servers = zip(connections, cluster.servers, strict=True)
        print("  " + ", ".join(f"{alias} on port {server.port}" for alias, server in servers))
        events: list[tuple[float, str]] = []
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        handler = EventHandler(events)
        logging.getLogger("dbha").addHandler(handler)
        logging.getLogger("dbha").propagate = False

        writes: list[Write] = []
        stop = threading.Event()
        start = time.monotonic()

        def workload() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                at = time.monotonic() - start
                try:
                    order = Order.objects.create(note=f"order {n}")
                    writes.append(Write(at, order._state.db, True))
                except dbha.NoHealthyDatabase:  # dbha fails it at once: no primary
                    writes.append(Write(at, "-", False, "no healthy database"))
                except Exception as e:  # a failed request; the app goes on
                    # (dbha's backend has reported the failure to dbha.)
                    writes.append(Write(at, "default", False, str(e).splitlines()[0][:45]))
                finally:
                    connections.close_all()
                time.sleep(WRITE_EVERY)

        handler.start = start
        print(
            f"Writing an order every {WRITE_EVERY * 1000:.0f} ms through dbha.ModelDatabaseRouter "
            "and dbha's backend"
        )
        worker = threading.Thread(target=workload)
        worker.start()
        try:
            time.sleep(KILL_AFTER)
            events.append((time.monotonic() - start, "kill -9 the primary (default)"))
            cluster.primary.kill()
            time.sleep(PROMOTE_AFTER)
            promoted = time.monotonic() - start
            events.append((promoted, "promote failover1 (pg_promote)"))
            cluster.standbys[0].promote()
            events.append((time.monotonic() - start, "pg_promote() returned"))
            time.sleep(RUN_AFTER)
        finally:
            stop.set()
            worker.join(timeout=30)
        print_timeline(writes, events, promoted)
        dbha.close()
    return 0


class EventHandler(logging.Handler):
    """Collects dbha's log lines for the timeline."""

    def __init__(self, events: list[tuple[float, str]]) -> None:
        super().__init__()
        self.events = events
        self.start = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((time.monotonic() - self.start, f"dbha: {record.getMessage()}"))


def print_timeline(writes: list[Write], events: list[tuple[float, str]], promoted: float) -> None:
    width = shutil.get_terminal_size((100, 20)).columns
    lines: list[tuple[float, str]] = list(events)
    # Collapse runs of writes with the same outcome into one line.
    run: list[Write] = []
    for write in [*writes, None]:
        if run and (write is None or (write.alias, write.ok) != (run[0].alias, run[0].ok)):
            first, last = run[0], run[-1]
            outcome = "ok" if first.ok else f"FAILED ({first.error})"
            lines.append(
                (
                    first.at,
                    f"{len(run):4d} writes -> {first.alias:<9} {outcome}"
                    f"  [{first.at:6.2f} .. {last.at:6.2f} s]",
                )
            )
            run = []
        if write is not None:
            run.append(write)
    print()
    print("Timeline (seconds since the workload started)")
    print("-" * min(width, 100))
    for at, text in sorted(lines, key=lambda line: line[0]):
        print(f"{at:7.2f}  {text}"[:width])
    print("-" * min(width, 100))
    ok_after = [w for w in writes if w.ok and w.at >= promoted]
    failed = [w for w in writes if not w.ok]
    print(f"writes: {len(writes)} attempted, {len(writes) - len(failed)} ok, {len(failed)} failed")
    print("(a write fails while no server is primary: between the kill and the promotion)")
    if ok_after:
        print(
            f"writes resumed on {ok_after[0].alias} {ok_after[0].at - promoted:.3f} s "
            "after the promotion was requested"
        )


if __name__ == "__main__":
    sys.exit(main())

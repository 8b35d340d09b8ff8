"""The django-dbha demo: a real PostgreSQL primary and two streaming
standbys, a small Django workload routed by dbha (writes, and reads from
the standbys), the primary killed, a standby promoted, the old primary
rewound and rejoined as a standby; a timeline of where every write and
read went, and the same as a picture.

    make demo        (or: python demo/demo.py [--png PATH], with dbha installed)
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import localdjango

import localdb

WRITE_EVERY = 0.05  # seconds between writes
READ_EVERY = 0.05  # seconds between reads
KILL_AFTER = 3.0  # seconds of normal operation before the primary dies
PROMOTE_AFTER = 2.0  # seconds the cluster has no primary (an operator's delay)
REJOIN_AFTER = 2.0  # seconds on the new primary before the old one is rewound
RUN_AFTER = 3.0  # seconds of operation once the old primary is back
ALIASES = ("default", "failover1", "failover2")


@dataclass
class Operation:
    at: float
    kind: str  # "write" or "read"
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--png",
        type=Path,
        default=Path("target/demo-failover.png"),
        help="where to draw the picture (needs matplotlib; default: %(default)s)",
    )
    args = parser.parse_args()
    require_postgres()
    print("Starting PostgreSQL: a primary and two streaming standbys on loopback...")
    with localdb.PgCluster(standbys=2) as cluster:
        Order = localdjango.configure(cluster, {"READS": "replicas"})
        from django.db import connections

        import dbha

        servers = zip(connections, cluster.servers, strict=True)
        print("  " + ", ".join(f"{alias} on port {server.port}" for alias, server in servers))
        events: list[tuple[float, str]] = []
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        handler = EventHandler(events)
        logging.getLogger("dbha").addHandler(handler)
        logging.getLogger("dbha").propagate = False

        operations: list[Operation] = []
        stop = threading.Event()
        start = time.monotonic()

        def run(kind: str, every: float, action: Any) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                at = time.monotonic() - start
                try:
                    operations.append(Operation(at, kind, action(n), True))
                except dbha.NoHealthyDatabase:  # dbha fails it at once: no primary
                    operations.append(Operation(at, kind, "-", False, "no healthy database"))
                except Exception as e:  # a failed request; the app goes on
                    # (dbha's backend has reported the failure to dbha.)
                    error = str(e).splitlines()[0][:45]
                    operations.append(Operation(at, kind, "?", False, error))
                finally:
                    connections.close_all()
                time.sleep(every)

        def write(n: int) -> str:
            return str(Order.objects.create(note=f"order {n}")._state.db)

        def read(n: int) -> str:
            newest = Order.objects.order_by("-pk").first()
            return "-" if newest is None else str(newest._state.db)  # where it was read

        handler.start = start
        print(
            f"Writing an order every {WRITE_EVERY * 1000:.0f} ms and reading the newest every "
            f"{READ_EVERY * 1000:.0f} ms, through dbha.ModelDatabaseRouter and dbha's backend "
            '(READS="replicas")'
        )
        workers = [
            threading.Thread(target=run, args=("write", WRITE_EVERY, write)),
            threading.Thread(target=run, args=("read", READ_EVERY, read)),
        ]
        for worker in workers:
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
            time.sleep(REJOIN_AFTER)
            events.append((time.monotonic() - start, "rewind default (pg_rewind), restart it"))
            cluster.primary.rejoin(cluster.standbys[0])
            events.append((time.monotonic() - start, "default is back, as a standby"))
            time.sleep(RUN_AFTER)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=30)
        print_timeline(operations, events, promoted)
        draw(operations, events, args.png)
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


def print_timeline(
    operations: list[Operation], events: list[tuple[float, str]], promoted: float
) -> None:
    width = shutil.get_terminal_size((100, 20)).columns
    lines: list[tuple[float, str]] = list(events)
    # Writes: runs with the same outcome, one line each.
    run: list[Operation] = []
    for op in [*(o for o in operations if o.kind == "write"), None]:
        if run and (op is None or (op.alias, op.ok) != (run[0].alias, run[0].ok)):
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
        if op is not None:
            run.append(op)
    # Reads spread over the standbys: one line per stretch between the
    # operator's actions, with where they went.
    cuts = [0.0, *(at for at, text in events if not text.startswith("dbha:")), float("inf")]
    for begin, end in itertools.pairwise(cuts):
        reads = [o for o in operations if o.kind == "read" and begin <= o.at < end]
        if not reads:
            continue
        where = ", ".join(
            f"{alias} {sum(o.alias == alias and o.ok for o in reads)}"
            for alias in ALIASES
            if any(o.alias == alias and o.ok for o in reads)
        )
        failed = sum(not o.ok for o in reads)
        outcome = f"ok ({where})" + (f", {failed} FAILED" if failed else "")
        lines.append(
            (
                reads[0].at,
                f"{len(reads):4d} reads  {outcome}  [{reads[0].at:6.2f} .. {reads[-1].at:6.2f} s]",
            )
        )
    print()
    print("Timeline (seconds since the workload started)")
    print("-" * min(width, 100))
    for at, text in sorted(lines, key=lambda line: line[0]):
        print(f"{at:7.2f}  {text}"[:width])
    print("-" * min(width, 100))
    for kind in ("write", "read"):
        done = [o for o in operations if o.kind == kind]
        failed = [o for o in done if not o.ok]
        print(f"{kind}s: {len(done)} attempted, {len(done) - len(failed)} ok, {len(failed)} failed")
    print("(writes fail while no server is primary, between the kill and the promotion;")
    print(" reads go on from the standbys)")
    ok_after = [o for o in operations if o.kind == "write" and o.ok and o.at >= promoted]
    if ok_after:
        print(
            f"writes resumed on {ok_after[0].alias} {ok_after[0].at - promoted:.3f} s "
            "after the promotion was requested"
        )


def draw(operations: list[Operation], events: list[tuple[float, str]], path: Path) -> None:
    """Which node served each write and read over time, failures marked,
    the operator's actions drawn: a PNG at `path`, if matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(for the picture, install matplotlib: pip install matplotlib)")
        return
    rows = [*ALIASES, "failed"]
    figure, axes = plt.subplots(figsize=(11, 4), dpi=110)
    styles = {"write": ("o", 0.12, "#1f77b4"), "read": ("s", -0.12, "#2ca02c")}
    for kind, (marker, offset, colour) in styles.items():
        done = [o for o in operations if o.kind == kind and o.ok and o.alias in ALIASES]
        axes.scatter(
            [o.at for o in done],
            [rows.index(o.alias) + offset for o in done],
            s=9,
            marker=marker,
            color=colour,
            label=f"{kind}s",
        )
        failed = [o for o in operations if o.kind == kind and not o.ok]
        axes.scatter(
            [o.at for o in failed],
            [rows.index("failed") + offset for _ in failed],
            s=14,
            marker="x",
            color="#d62728",
            label=f"failed {kind}s" if failed else None,
        )
    operator = [(at, text) for at, text in events if not text.startswith("dbha:")]
    for i, (at, text) in enumerate(operator):
        axes.axvline(at, color="#7f7f7f", linestyle="--", linewidth=0.9)
        # Above the plot, staggered: actions a few tenths apart stay legible.
        axes.text(
            at,
            1.02 + 0.07 * (i % 2),
            text.split(" (")[0],
            transform=axes.get_xaxis_transform(),
            fontsize=7,
            ha="center",
            color="#444444",
        )
    axes.set_yticks(range(len(rows)), rows)
    axes.set_ylim(-0.6, len(rows) - 0.4)
    axes.invert_yaxis()
    axes.set_xlabel("seconds since the workload started")
    figure.suptitle("django-dbha: where each write and read went through a failover", fontsize=10)
    axes.legend(loc="lower right", fontsize=7, ncol=4)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    print(f"picture: {path}")


if __name__ == "__main__":
    sys.exit(main())

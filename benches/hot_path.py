"""Hot-path benchmark: ns per call of `dbha.available_db()`, `read_db()` and
the router, against a floor (a Python function returning a constant) and two
reference implementations, all measured in this run. dbha watches a real
local PostgreSQL primary and standby (READS="replicas"), but no call here
touches them: only the background checker does.

    python benches/hot_path.py [--repeat 7] [--number 200000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import timeit
from datetime import datetime, timedelta
from pathlib import Path

import django

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import localdjango

import localdb


class ConstantRouter:
    def db_for_write(self, model: type, **hints: object) -> str:
        return "default"

    def db_for_read(self, model: type, **hints: object) -> str:
        return "failover1"


class RecipeRouter:
    """The blog recipe's cache: a text file holding the chosen alias and the
    time it was chosen, read and parsed on every call."""

    FORMAT = "%Y-%m-%d %H:%M:%S.%f"

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text(f"default|{datetime.now().strftime(self.FORMAT)}")

    def available_db(self) -> str:
        alias, stamp = self.path.read_text().split("|")
        if datetime.now() - datetime.strptime(stamp, self.FORMAT) < timedelta(seconds=10):
            return alias
        return "default"


class LockedCache:
    """A pure-Python in-memory cache updated by a background thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._alias = "default"

    def available_db(self) -> str:
        with self._lock:
            return self._alias


def constant() -> str:
    return "default"


def measure_all(
    statements: list[str], namespace: dict[str, object], number: int, repeat: int
) -> list[float]:
    """Median ns per call of each statement over `repeat` rounds of `number`
    calls. Rounds interleave the statements, so that the machine's drift
    (other tenants, clock changes) reaches every one alike. Each run is in a
    thread of its own, so that writes one statement notes for
    read-your-writes do not change another's path. Statements, not lambdas,
    so that no extra Python frame is timed."""
    runs: list[list[float]] = [[] for _ in statements]

    def run(index: int) -> None:
        runs[index].append(timeit.timeit(statements[index], globals=namespace, number=number))

    for _ in range(repeat):
        for index in range(len(statements)):
            thread = threading.Thread(target=run, args=(index,))
            thread.start()
            thread.join()
    return [statistics.median(times) / number * 1e9 for times in runs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()

    cluster = localdb.PgCluster(standbys=1).start()
    Thing = localdjango.configure(cluster, {"READS": "replicas"})

    from django.db.utils import ConnectionRouter

    import dbha

    assert dbha.available_db() == "default"
    deadline = time.monotonic() + 30
    # The standby's first lag reading, and (this thread just wrote) a probe
    # showing it has caught up.
    while dbha.read_db() != "failover1":
        assert time.monotonic() < deadline, "the standby never became a reader"
        time.sleep(0.1)
    ours = dbha.ModelDatabaseRouter()
    django_ours = ConnectionRouter(["dbha.ModelDatabaseRouter"])
    django_constant = ConnectionRouter([ConstantRouter()])
    with tempfile.TemporaryDirectory() as tmp:
        recipe = RecipeRouter(Path(tmp) / "db_cache.txt")
        locked = LockedCache()
        namespace: dict[str, object] = {
            "constant": constant,
            "available_db": dbha.available_db,
            "read_db": dbha.read_db,
            "ours": ours,
            "Thing": Thing,
            "recipe": recipe,
            "locked": locked,
            "django_ours": django_ours,
            "django_constant": django_constant,
        }
        cases = [
            ("Python function returning a constant (floor)", "constant()", "floor"),
            ("dbha.available_db()", "available_db()", "floor"),
            ('dbha.read_db(), READS="replicas"', "read_db()", "floor"),
            ("ModelDatabaseRouter().db_for_write(Model)", "ours.db_for_write(Thing)", "floor"),
            ("ModelDatabaseRouter().db_for_read(Model)", "ours.db_for_read(Thing)", "floor"),
            ("recipe: file read + strptime per call", "recipe.available_db()", "floor"),
            ("pure-Python cache behind threading.Lock", "locked.available_db()", "floor"),
            (
                "Django ConnectionRouter.db_for_write, constant router",
                "django_constant.db_for_write(Thing)",
                "django",
            ),
            (
                "Django ConnectionRouter.db_for_write, dbha router",
                "django_ours.db_for_write(Thing)",
                "django",
            ),
            (
                "Django ConnectionRouter.db_for_read, constant router",
                "django_constant.db_for_read(Thing)",
                "django_read",
            ),
            (
                "Django ConnectionRouter.db_for_read, dbha router",
                "django_ours.db_for_read(Thing)",
                "django_read",
            ),
            (
                "Django ConnectionRouter, a write then a read, constant router",
                "django_constant.db_for_write(Thing); django_constant.db_for_read(Thing)",
                "django_both",
            ),
            (
                "Django ConnectionRouter, a write then a read, dbha (read-your-writes)",
                "django_ours.db_for_write(Thing); django_ours.db_for_read(Thing)",
                "django_both",
            ),
        ]
        timings = measure_all([c[1] for c in cases], namespace, args.number, args.repeat)
        results = {name: ns for (name, _, _), ns in zip(cases, timings, strict=True)}
    dbha.close()
    cluster.stop()

    baselines = {
        "floor": results[cases[0][0]],
        "django": results["Django ConnectionRouter.db_for_write, constant router"],
        "django_read": results["Django ConnectionRouter.db_for_read, constant router"],
        "django_both": results["Django ConnectionRouter, a write then a read, constant router"],
    }
    print(
        f"Python {sys.version.split()[0]}, Django {django.get_version()}, dbha {dbha.__version__}"
    )
    print(
        f"median of {args.repeat} interleaved runs x {args.number} calls, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    print()
    print("| call | ns/call | ratio |")
    print("|---|---:|---:|")
    for name, _, baseline in cases:
        ratio = results[name] / baselines[baseline]
        against = "floor" if baseline == "floor" else "constant router"
        print(f"| {name} | {results[name]:.1f} | {ratio:.2f}x {against} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Failover benchmark on a real PostgreSQL primary and two streaming
standbys: ORM writes and reads from several threads (CONN_MAX_AGE=0), the
primary killed (kill -9) or hung (SIGSTOP), failover1 promoted a little
later; prints how long writes took to resume and what latency did.

    python benches/failover.py [--scenario kill|hang|all] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import localdjango

import dbha
import localdb


@dataclass
class Operation:
    kind: str  # "write" or "read"
    started: float
    ended: float
    ok: bool

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class Result:
    scenario: str
    resume: float | None  # first successful write after the promotion completed
    failed: int
    total: int
    before: list[float]
    after: list[float]


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_load(model: Any, threads: int, stop: threading.Event) -> list[Operation]:
    """Each thread: a write, then a read, each on a fresh connection (as a
    request would), reporting failures to dbha as an application should."""
    from django.db import connections

    operations: list[Operation] = []
    lock = threading.Lock()

    def one(kind: str, action: Any) -> None:
        started = time.monotonic()
        ok = True
        try:
            action()
        except Exception:
            ok = False
            dbha.report_failure(dbha.available_db())
        finally:
            connections.close_all()
        with lock:
            operations.append(Operation(kind, started, time.monotonic(), ok))

    def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            note = f"{n}-{i}"
            one("write", partial(model.objects.create, note=note))
            one("read", partial(model.objects.filter(note=note).count))

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    stop.wait()
    for thread in pool:
        thread.join(timeout=60)
    return operations


def scenario(name: str, model: Any, cluster: localdb.PgCluster, args: argparse.Namespace) -> Result:
    stop = threading.Event()
    operations: list[Operation] = []
    loader = threading.Thread(target=lambda: operations.extend(run_load(model, args.threads, stop)))
    loader.start()
    try:
        time.sleep(args.steady)
        failed_at = time.monotonic()
        if name == "kill":
            cluster.primary.kill()
        else:
            cluster.primary.pause()
        time.sleep(args.promote_after)
        cluster.standbys[0].promote()
        promoted = time.monotonic()
        time.sleep(args.steady)
    finally:
        stop.set()
        loader.join(timeout=120)
        cluster.primary.kill()  # also ends a hang
    writes = [op for op in operations if op.kind == "write"]
    resumed = [op.ended for op in writes if op.ok and op.ended >= promoted]
    first_ok = min(resumed) if resumed else None
    return Result(
        scenario=f"{name} (SIGKILL)" if name == "kill" else f"{name} (SIGSTOP)",
        resume=None if first_ok is None else first_ok - promoted,
        failed=sum(not op.ok for op in operations),
        total=len(operations),
        before=[op.latency for op in writes if op.ok and op.ended < failed_at],
        after=[op.latency for op in writes if op.ok and first_ok and op.started >= first_ok],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["kill", "hang", "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steady", type=float, default=4.0, help="seconds before and after")
    parser.add_argument("--promote-after", type=float, default=2.0)
    args = parser.parse_args()
    names = ["kill", "hang"] if args.scenario == "all" else [args.scenario]
    # Django is configured once per process, so every cluster reuses the ports.
    ports = [localdb.free_port() for _ in localdjango.ALIASES]
    model = None
    results = []
    for name in names:
        with localdb.PgCluster(standbys=2, ports=ports) as cluster:
            if model is None:
                model = localdjango.configure(cluster)
            else:
                localdjango.create_table(cluster, model)
            results.append(scenario(name, model, cluster, args))
            dbha.close()  # the next scenario starts from a fresh checker

    import django

    print(f"django-dbha {dbha.__version__}, Django {django.get_version()}, default DBHA settings")
    print(f"{args.threads} threads, each a write then a read per connection, CONN_MAX_AGE=0;")
    print(f"failover1 promoted {args.promote_after} s after the primary failed")
    print()
    print(
        "| scenario | writes resume after promotion | failed ops | write p50 / p99 before "
        "| write p50 / p99 after | p99 after / before |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        resume = "never" if r.resume is None else f"{r.resume:.3f} s"
        p99_before, p99_after = percentile(r.before, 0.99), percentile(r.after, 0.99)
        print(
            f"| {r.scenario} | {resume} | {r.failed} of {r.total} "
            f"| {percentile(r.before, 0.5) * 1000:.1f} / {p99_before * 1000:.1f} ms "
            f"| {percentile(r.after, 0.5) * 1000:.1f} / {p99_after * 1000:.1f} ms "
            f"| {p99_after / p99_before:.2f}x |"
        )
    dbha.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

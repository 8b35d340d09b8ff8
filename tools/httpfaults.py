"""Failover scenarios against the example project (examples/httpapp)
served by gunicorn or uvicorn under HTTP load (tools/localhttp.py): the
fault, `failover2` promoted `promote_after` seconds later, and what the
clients and each worker's health view saw.
benches/http_failover.py prints the outcome; tests/test_http_failover.py
asserts on it.

Times are `time.monotonic()`, reported relative to pg_promote() returning
(negative: while it ran; the server leaves recovery during the call).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localdb import PgCluster
from localhttp import AppServer, HealthAnswer, HealthPoller, Load, Request, migrate

SCENARIOS = {
    "kill": "kill -9 of the primary",
    "listener": "SIGSTOP, postmaster only",
    "hang": "SIGSTOP, whole server",
    "alive": "promotion, old primary alive",
}
#: dbha's default: how often a group without a healthy writer is probed.
FAST_INTERVAL = 0.1
#: A request this long was stuck (libpq's connect_timeout is 2 s): a query
#: in flight on a stopped server waits for it.
STUCK = 5.0
#: A worker whose newest probe is older than this when it answers has no
#: running checker (CHECK_INTERVAL 1 s, CONNECT_TIMEOUT 0.5 s, jitter).
PROBE_AGE_LIMIT = 3.0


@dataclass
class Timing:
    """Seconds each phase lasts."""

    warmup: float = 1.0  # load not measured: each worker's first requests
    steady: float = 5.0  # measured load before the fault
    promote_after: float = 2.0  # fault to pg_promote()
    after: float = 7.0  # pg_promote() returning to the end of the load
    settle: float = 15.0  # at most, for every worker to report the new writer


@dataclass
class Outcome:
    """What one scenario did, as the clients and the workers saw it."""

    name: str
    server: str
    workers: int
    timing: Timing
    measured_from: float
    fault_at: float
    promoting: float
    promoted: float
    load_stopped: float
    requests: list[Request]
    answers: list[HealthAnswer]
    initial_pids: list[int]
    final_pids: list[int]
    on_failover2: set[str] = field(default_factory=set)

    def at(self, moment: float) -> float:
        """`moment` relative to pg_promote() returning."""
        return moment - self.promoted

    @property
    def measured(self) -> list[Request]:
        return [r for r in self.requests if r.started >= self.measured_from]

    @property
    def failed(self) -> list[Request]:
        return [r for r in self.measured if not r.ok]

    @property
    def recovery_deadline(self) -> float:
        """One FAST_INTERVAL round after pg_promote() returned: a request
        that starts (begins its connect) later must not fail."""
        return self.promoted + FAST_INTERVAL

    @property
    def failed_after_recovery(self) -> list[Request]:
        return [r for r in self.failed if r.started > self.recovery_deadline]

    @property
    def last_failure(self) -> float | None:
        return max((self.at(r.started) for r in self.failed), default=None)

    @property
    def first_on_failover2(self) -> float | None:
        """When failover2 first acknowledged a write (its answer's arrival)."""
        return min(
            (r.ended for r in self.measured if r.ok and r.db == "failover2"),
            default=None,
        )

    @property
    def recover(self) -> float | None:
        first = self.first_on_failover2
        return None if first is None else self.at(first)

    def window(self, which: str) -> list[Request]:
        """Requests that started before the fault, during the failover (up
        to 0.5 s after failover2's first write) and after it."""
        first = self.first_on_failover2
        settled = float("inf") if first is None else first + 0.5
        bounds = {
            "before": (self.measured_from, self.fault_at),
            "during": (self.fault_at, settled),
            "after": (settled, self.load_stopped),
        }[which]
        return [r for r in self.measured if bounds[0] <= r.started < bounds[1]]

    def percentile(self, which: str, fraction: float) -> float:
        """Latency percentile (seconds) of every request in the window,
        failed ones included; NaN for an empty window."""
        return percentile([r.latency for r in self.window(which)], fraction)

    @property
    def p99_ratio(self) -> float:
        return self.percentile("after", 0.99) / self.percentile("before", 0.99)

    @property
    def stuck(self) -> int:
        return sum(r.latency > STUCK for r in self.measured)

    @property
    def by_non_primary(self) -> int:
        """Writes acknowledged by failover1, by failover2 before its
        promotion began, or by the old primary after its fault."""
        faulty = self.name != "alive"
        return sum(
            r.ok
            and (
                r.db == "failover1"
                or (r.db == "failover2" and r.started < self.promoting)
                or (faulty and r.db == "default" and r.started > self.fault_at)
            )
            for r in self.measured
        )

    @property
    def lost(self) -> list[float]:
        """With the old primary alive: its acknowledgements from the
        pg_promote() call on (lost: failover2 is on a new timeline)."""
        if self.name != "alive":
            return []
        return [
            self.at(r.ended)
            for r in self.measured
            if r.ok and r.db == "default" and r.ended >= self.promoting
        ]

    @property
    def absent(self) -> int:
        """Acknowledged writes failover2 does not hold at the end."""
        return sum(r.ok and r.note not in self.on_failover2 for r in self.measured)

    @property
    def read_back_missed(self) -> int:
        """Read-backs that did not find the row just written, on a node
        that should have it: not failover2 reading back a write the old
        primary took, alive, as failover2 took over (lost, in `lost`)."""
        return sum(
            r.ok
            and not r.found
            and not (self.name == "alive" and r.db == "default" and r.read_db == "failover2")
            for r in self.measured
        )

    def switches(self) -> dict[int, float | None]:
        """Per worker still running at the end: when its health view first
        named failover2 the writer after pg_promote() was called, relative
        to its return; None if it never did. An upper bound: a worker is
        asked only when the kernel hands it a poll, and a busy one later."""
        found: dict[int, float | None] = dict.fromkeys(self.final_pids)
        for answer in sorted(self.answers, key=lambda a: a.at):
            if (
                answer.pid in found
                and found[answer.pid] is None
                and answer.at >= self.promoting
                and answer.writer == "failover2"
            ):
                found[answer.pid] = self.at(answer.at)
        return found

    def probe_ages(self) -> dict[int, float]:
        """Per worker still running at the end: the age of its newest probe
        in its last answer (its checker runs if that is small)."""
        ages: dict[int, float] = {}
        for answer in sorted(self.answers, key=lambda a: a.at):
            if answer.pid in self.final_pids:
                ages[answer.pid] = answer.probe_age
        return ages

    @property
    def workers_switched(self) -> int:
        ages = self.probe_ages()
        return sum(
            at is not None and ages.get(pid, float("inf")) <= PROBE_AGE_LIMIT
            for pid, at in self.switches().items()
        )

    @property
    def replaced(self) -> list[int]:
        """Workers the server replaced during the scenario."""
        return sorted(set(self.initial_pids) - set(self.final_pids))

    def failed_by_error(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.failed:
            counts[r.error] = counts.get(r.error, 0) + 1
        return counts

    def as_dict(self) -> dict[str, Any]:
        """The JSON row of `--json-out`."""

        def ms(value: float) -> float | None:
            return None if value != value else round(value * 1000, 2)  # NaN: empty

        def s(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        ratio = self.p99_ratio
        return {
            "name": self.name,
            "fault": SCENARIOS[self.name],
            "server": self.server,
            "workers": self.workers,
            "workers_switched": self.workers_switched,
            "worker_switch_s": {str(pid): s(at) for pid, at in self.switches().items()},
            "worker_probe_age_s": {str(pid): s(a) for pid, a in self.probe_ages().items()},
            "workers_replaced": len(self.replaced),
            "requests": len(self.measured),
            "failed": len(self.failed),
            "failed_by_error": self.failed_by_error(),
            "failed_after_recovery": len(self.failed_after_recovery),
            # Each: when it started, relative to pg_promote() returning, the
            # worker that answered, and its error.
            "failed_after_recovery_detail": [
                [s(self.at(r.started)), r.pid, r.error] for r in self.failed_after_recovery
            ],
            "last_failure_s": s(self.last_failure),
            "recover_s": s(self.recover),
            "stuck": self.stuck,
            **{
                f"p{int(q * 100)}_{w}_ms": ms(self.percentile(w, q))
                for w in ("before", "during", "after")
                for q in (0.5, 0.99)
            },
            "p99_ratio": None if ratio != ratio else round(ratio, 3),
            "acked_by_non_primary": self.by_non_primary,
            "lost": len(self.lost),
            "latest_lost_s": s(max(self.lost, default=None)),
            "absent_from_failover2": self.absent,
            "read_back_missed": self.read_back_missed,
        }


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def run(
    name: str,
    server_kind: str,
    cluster: PgCluster,
    log_dir: Path,
    timing: Timing | None = None,
    clients: int = 4,
    rate: float = 40.0,
    log_name: str | None = None,
    workers: int | None = None,
    dbha: dict[str, Any] | None = None,
) -> Outcome:
    """Runs scenario `name` once on a fresh `cluster` (which it changes:
    the caller starts a new one for the next scenario). `workers` and
    `dbha` (DBHA keys) override the server's defaults."""
    timing = timing or Timing()
    primary, _, failover2 = cluster.servers
    fault: Callable[[], None] = {
        "kill": primary.kill,
        "listener": primary.pause_listener,
        "hang": primary.pause,
        "alive": lambda: None,
    }[name]
    migrate(cluster)
    log_file = log_dir / (log_name or f"{name}-{server_kind}.log")
    with AppServer(server_kind, cluster, log_file, workers, dbha=dbha) as server:
        initial = server.worker_pids()
        load = Load(server.port, server.path, clients=clients, rate=rate)
        poller = HealthPoller(server.port, interval=0.03)
        with poller.running():
            with load.running():
                measured_from = time.monotonic() + timing.warmup
                time.sleep(timing.warmup + timing.steady)
                fault()
                # Once it has happened: kill() first lists the server's processes.
                fault_at = time.monotonic()
                time.sleep(timing.promote_after)
                promoting = time.monotonic()
                failover2.promote()
                promoted = time.monotonic()
                time.sleep(timing.after)
                load.halt()
                load_stopped = time.monotonic()
                if name in ("hang", "listener"):
                    # Frees requests stuck on it: a query sent to a stopped
                    # server waits for ever (libpq has no query timeout), and
                    # so does the sync worker that sent it.
                    primary.kill()
            final = server.worker_pids()
            poller.wait(final, "failover2", promoting, timing.settle)
            final = server.worker_pids()
        requests = load.snapshot()
        answers = poller.snapshot()
    on_failover2 = set(failover2.query("select note from httpapp_order", timeout=60).splitlines())
    return Outcome(
        name=name,
        server=server_kind,
        workers=server.workers,
        timing=timing,
        measured_from=measured_from,
        fault_at=fault_at,
        promoting=promoting,
        promoted=promoted,
        load_stopped=load_stopped,
        requests=requests,
        answers=answers,
        initial_pids=initial,
        final_pids=final,
        on_failover2=on_failover2,
    )

"""Soak: the example project (examples/httpapp) under gunicorn (`--preload`,
4 sync workers) and a steady HTTP load for --minutes, with a database fault
every --fault-every seconds, in a cycle that always leaves a healthy
cluster (a primary and two streaming standbys):

    standby-hang    SIGSTOP of a standby for 5 s, then SIGCONT
    primary-hang    SIGSTOP of the whole primary for 3 s, then SIGCONT
    switchover      kill -9 of the primary; a standby promoted; the old
                    primary rewound (pg_rewind) and the other standby
                    restarted, both streaming from the new primary
    listener-hang   SIGSTOP of the primary's postmaster for 3 s, then SIGCONT
    promote-alive   a standby promoted while the primary runs; then the old
                    primary and the other standby rejoin it, as above

Sampled every --sample-every seconds, per gunicorn process (master and
workers): RSS, threads and open file descriptors (from /proc; before each
fault, the fewest of ten samples 10 ms apart, so that a request in flight
does not count); and, just before each fault (the previous one settled),
on each server: dbha's probe sessions (pg_stat_activity, application_name
'dbha') and the other client sessions (the application's: CONN_MAX_AGE=0).

Verdicts: RSS flat (growth from the first sample after the warm-up, the
first fault cycle, to the last below 10 %); threads the same before every
fault after the warm-up, and descriptors not growing (the lowest count
before a fault in the last third of the run no higher than in the first
third); dbha's sessions one per process per server before every fault;
and each fault followed: every
worker's health view names the expected writer within 2 s of the fault's
end (SIGCONT, or pg_promote() returning) and no other writer until the
next fault.

    python benches/soak.py [--minutes 30] [--fault-every 20] [--rate 20] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import localdb
import localhttp

ROOT = Path(__file__).resolve().parent.parent
ALIASES = ("default", "failover1", "failover2")
CYCLE = ("standby-hang", "primary-hang", "switchover", "listener-hang", "promote-alive")
#: How long the hangs last.
HOLD = {"standby-hang": 5.0, "primary-hang": 3.0, "listener-hang": 3.0}
#: Each worker must name the expected writer this soon after a fault ends.
FOLLOW_WITHIN = 2.0
RSS_GROWTH_LIMIT = 0.10
#: dbha's probe sessions, and every other client session but this query's.
SESSIONS_SQL = (
    "select count(*) filter (where application_name = 'dbha'), "
    "count(*) filter (where backend_type = 'client backend' and application_name <> 'dbha' "
    "and pid <> pg_backend_pid()) from pg_stat_activity"
)


@dataclass
class Fault:
    kind: str
    began: float  # time.monotonic()
    ended: float = 0.0  # SIGCONT sent, or pg_promote() returned
    expected: str = ""  # the writer every worker must name
    # Per worker: its first answer naming `expected` after `ended`, relative
    # to it; None if it never did before the next fault.
    answers: dict[int, float | None] = field(default_factory=dict)
    # Workers that named another writer after naming `expected`.
    flapped: list[int] = field(default_factory=list)
    failed: int = 0  # requests that failed from this fault to the next
    requests: int = 0

    @property
    def followed(self) -> bool:
        return (
            bool(self.answers)
            and not self.flapped
            and all(t is not None and t <= FOLLOW_WITHIN for t in self.answers.values())
        )


@dataclass
class Sample:
    at: float
    rss_kb: int
    threads: int
    fds: int
    #: What the descriptors are (socket, pipe, a path...): settled samples only.
    kinds: dict[str, int] = field(default_factory=dict)
    #: Socket inodes: settled samples only.
    sockets: set[str] = field(default_factory=set)


def sample(pid: int, detail: bool = False) -> Sample | None:
    """RSS, threads and open descriptors of `pid`, from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    found = Sample(
        at=time.monotonic(),
        rss_kb=int(fields["VmRSS"].split()[0]),
        threads=int(fields["Threads"]),
        fds=len(fds),
    )
    for fd in fds if detail else []:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":[")[0] if target.startswith(("socket:", "pipe:")) else target
        found.kinds[kind] = found.kinds.get(kind, 0) + 1
        if target.startswith("socket:"):
            found.sockets.add(target)
    return found


class Soak:
    """The cluster, the app server, the load, the poller and the record."""

    def __init__(self, cluster: localdb.PgCluster, server: localhttp.AppServer) -> None:
        self.cluster = cluster
        self.server = server
        self.primary = 0  # index of the current primary in cluster.servers
        self.next_standby = 1  # the standby the next promotion picks
        self.faults: list[Fault] = []
        self.samples: dict[int, list[Sample]] = {}  # per process, continuous
        self.settled: dict[int, list[Sample]] = {}  # per process, before each fault
        self.sessions: dict[str, list[tuple[int, int] | None]] = {a: [] for a in ALIASES}
        self.workers_seen: set[int] = set()

    def processes(self) -> list[int]:
        master = self.server.pid
        return [*([master] if master else []), *self.server.worker_pids()]

    def take_samples(self, into: dict[int, list[Sample]], idle: bool = False) -> None:
        """One sample per process; `idle`: the fewest descriptors of 30
        samples 20 ms apart, so that a request in flight (its client socket
        and database connection) or a probe's new connection does not
        count, with what each descriptor is."""
        for pid in self.processes():
            found = sample(pid, detail=idle)
            if found is None:
                continue
            for _ in range(29 if idle else 0):
                time.sleep(0.02)
                again = sample(pid, detail=True)
                if again is not None and again.fds < found.fds:
                    found = again
            into.setdefault(pid, []).append(found)
        self.workers_seen.update(self.server.worker_pids())

    def take_sessions(self) -> None:
        for alias, server in zip(ALIASES, self.cluster.servers, strict=True):
            try:
                dbha, clients = server.query(SESSIONS_SQL, timeout=10).split("|")
                self.sessions[alias].append((int(dbha), int(clients)))
            except (localdb.LocalDbError, ValueError):
                self.sessions[alias].append(None)

    def standby(self) -> int:
        """The standby the next fault picks (alternating)."""
        standbys = [i for i in range(3) if i != self.primary]
        pick = self.next_standby if self.next_standby in standbys else standbys[0]
        self.next_standby = next(i for i in standbys if i != pick)
        return pick

    def hang(self, target: localdb.PgServer, hold: float, listener: bool = False) -> float:
        (target.pause_listener if listener else target.pause)()
        time.sleep(hold)
        target.resume()
        return time.monotonic()

    def switchover(self, kill: bool) -> float:
        """Promotes a standby (after a kill -9 of the primary, or with it
        alive), then makes the two others stream from it."""
        servers = self.cluster.servers
        old, new = servers[self.primary], servers[self.standby()]
        if kill:
            old.kill()
        new.promote()
        promoted = time.monotonic()
        for other in servers:
            if other is not new:
                # pg_rewind: the old primary diverged; the other standby
                # may have too (it got WAL the new primary lacked), or is
                # only pointed at the new primary.
                other.rejoin(new)
        self.primary = servers.index(new)
        return promoted

    def run_fault(self, kind: str) -> Fault:
        servers = self.cluster.servers
        fault = Fault(kind, began=time.monotonic())
        if kind == "standby-hang":
            fault.ended = self.hang(servers[self.standby()], HOLD[kind])
        elif kind == "primary-hang":
            fault.ended = self.hang(servers[self.primary], HOLD[kind])
        elif kind == "listener-hang":
            fault.ended = self.hang(servers[self.primary], HOLD[kind], listener=True)
        else:
            fault.ended = self.switchover(kill=kind == "switchover")
        fault.expected = ALIASES[self.primary]
        return fault


def judge(
    fault: Fault, until: float, answers: list[localhttp.HealthAnswer], pids: list[int]
) -> None:
    """Fills in `fault.answers` and `fault.flapped` from the health polls
    between the fault's end and `until`."""
    fault.answers = dict.fromkeys(pids)
    named: set[int] = set()
    for answer in answers:
        if not fault.ended <= answer.at < until or answer.pid not in fault.answers:
            continue
        if answer.writer == fault.expected:
            named.add(answer.pid)
            if fault.answers[answer.pid] is None:
                fault.answers[answer.pid] = answer.at - fault.ended
        elif answer.pid in named and answer.pid not in fault.flapped:
            fault.flapped.append(answer.pid)


def span(values: list[int]) -> tuple[int, int, int]:
    """(start, end, max)."""
    return values[0], values[-1], max(values)


def report(soak: Soak, warmup_until: float, args: argparse.Namespace) -> dict[str, Any]:
    master = soak.server.pid
    rows: dict[str, Any] = {}
    verdicts: dict[str, bool] = {}
    print(
        "| process | RSS start / end / max (MB) | RSS growth | threads start / end / max "
        "| fds start / end / max | before each fault: threads | fds, lowest / highest "
        "| sockets shared with the master |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for pid, all_samples in sorted(soak.samples.items(), key=lambda item: item[0] != master):
        samples = [s for s in all_samples if s.at >= warmup_until] or all_samples
        settled = [s for s in soak.settled.get(pid, []) if s.at >= warmup_until]
        rss = span([s.rss_kb for s in samples])
        threads = span([s.threads for s in samples])
        fds = span([s.fds for s in samples])
        growth = (rss[1] - rss[0]) / rss[0]
        settled_threads = sorted({s.threads for s in settled})
        settled_fds = [s.fds for s in settled]
        # A leak raises the floor: the lowest count of the last third of
        # the run above the lowest of the first third.
        third = max(1, len(settled_fds) // 3)
        fds_grew = bool(settled_fds) and min(settled_fds[-third:]) > min(settled_fds[:third])
        masters = soak.settled.get(master, []) if master else []
        shared = (
            len(settled[-1].sockets & masters[-1].sockets)
            if settled and masters and pid != master
            else 0
        )
        name = "master" if pid == master else f"worker {pid}"
        rows[name] = {
            "pid": pid,
            "rss_kb": rss,
            "rss_growth": round(growth, 4),
            "threads": threads,
            "fds": fds,
            "settled_threads": settled_threads,
            "settled_fds": settled_fds,
            "fd_kinds_first": settled[0].kinds if settled else {},
            "fd_kinds_last": settled[-1].kinds if settled else {},
            "sockets_shared_with_master": shared,
            "samples": len(samples),
        }
        verdicts[f"{name}: RSS growth < {RSS_GROWTH_LIMIT:.0%}"] = growth < RSS_GROWTH_LIMIT
        verdicts[f"{name}: threads the same before every fault"] = len(settled_threads) <= 1
        verdicts[f"{name}: no descriptor growth"] = not fds_grew
        print(
            f"| {name} | {rss[0] / 1024:.1f} / {rss[1] / 1024:.1f} / {rss[2] / 1024:.1f} "
            f"| {growth:+.1%} | {threads[0]} / {threads[1]} / {threads[2]} "
            f"| {fds[0]} / {fds[1]} / {fds[2]} "
            f"| {', '.join(map(str, settled_threads)) or '-'} "
            f"| {min(settled_fds, default=0)} / {max(settled_fds, default=0)} "
            f"| {shared if pid != master else '-'} |"
        )
    processes = 1 + soak.server.workers
    print()
    print(
        "| server | dbha sessions before each fault: start / end / min / max "
        "| other sessions: start / end / max |"
    )
    print("|---|---:|---:|")
    nodes: dict[str, Any] = {}
    for alias, counts in soak.sessions.items():
        known = [c for c in counts if c is not None]
        if not known:
            print(f"| {alias} | - | - |")
            continue
        dbha = [c[0] for c in known]
        clients = [c[1] for c in known]
        nodes[alias] = {"dbha": dbha, "clients": clients, "unreadable": len(counts) - len(known)}
        verdicts[f"{alias}: {processes} dbha sessions before every fault"] = set(dbha) == {
            processes
        }
        print(
            f"| {alias} | {dbha[0]} / {dbha[-1]} / {min(dbha)} / {max(dbha)} "
            f"| {clients[0]} / {clients[-1]} / {max(clients)} |"
        )
    print()
    print("| fault | count | followed | slowest worker | failed requests |")
    print("|---|---:|---:|---:|---:|")
    for kind in CYCLE:
        of_kind = [f for f in soak.faults if f.kind == kind]
        if not of_kind:
            continue
        times = [t for f in of_kind for t in f.answers.values() if t is not None]
        print(
            f"| {kind} | {len(of_kind)} | {sum(f.followed for f in of_kind)} "
            f"| {max(times):+.3f} s | {sum(f.failed for f in of_kind)} of "
            f"{sum(f.requests for f in of_kind)} |"
            if times
            else f"| {kind} | {len(of_kind)} | 0 | never | - |"
        )
    followed = sum(f.followed for f in soak.faults)
    verdicts["every fault followed"] = followed == len(soak.faults)
    replaced = sorted(soak.workers_seen - set(soak.server.worker_pids()))
    verdicts["no worker replaced"] = not replaced
    print()
    print(f"faults followed: {followed} of {len(soak.faults)}")
    print(f"workers replaced: {len(replaced)}")
    flat = all(verdicts.values())
    print(f"verdict: {'FLAT' if flat else 'NOT FLAT'}")
    for what, ok in verdicts.items():
        if not ok:
            print(f"  missed: {what}")
    return {
        "minutes": args.minutes,
        "fault_every": args.fault_every,
        "processes": rows,
        "nodes": nodes,
        "faults": [asdict(f) | {"followed": f.followed} for f in soak.faults],
        "faults_followed": followed,
        "workers_replaced": len(replaced),
        "verdicts": verdicts,
        "flat": flat,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second, in all")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--log-dir", type=Path, default=ROOT / "target" / "soak",
        help="the app server's log (default target/soak)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.fault_every < 15:
        parser.error("--fault-every: at least 15 s (a switchover takes several)")
    localhttp.terminate_on_sigterm()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    faults = int(args.minutes * 60 // args.fault_every)

    with localdb.PgCluster(standbys=2) as cluster:
        localhttp.migrate(cluster)
        log_file = args.log_dir / "gunicorn.log"
        with localhttp.AppServer("gunicorn", cluster, log_file) as server:
            soak = Soak(cluster, server)
            load = localhttp.Load(server.port, server.path, clients=args.clients, rate=args.rate)
            poller = localhttp.HealthPoller(server.port, interval=0.05)
            warmup_until = time.monotonic() + args.fault_every * len(CYCLE)
            next_sample = time.monotonic()
            with load.running(), poller.running():
                for n in range(faults):
                    soak.take_samples(soak.settled, idle=True)
                    soak.take_sessions()
                    fault = soak.run_fault(CYCLE[n % len(CYCLE)])
                    soak.faults.append(fault)
                    next_fault = fault.began + args.fault_every
                    while time.monotonic() < next_fault:
                        if time.monotonic() >= next_sample:
                            soak.take_samples(soak.samples)
                            next_sample += args.sample_every
                        time.sleep(max(0.0, min(next_sample, next_fault) - time.monotonic()))
                    requests = [r for r in load.snapshot() if fault.began <= r.started < next_fault]
                    fault.requests = len(requests)
                    fault.failed = sum(not r.ok for r in requests)
                    judge(fault, next_fault, poller.snapshot(), server.worker_pids())
                    print(
                        f"# {n + 1}/{faults} {fault.kind}: writer {fault.expected}, "
                        f"followed {fault.followed}, {fault.failed} of {fault.requests} failed",
                        file=sys.stderr,
                    )
                soak.take_samples(soak.settled, idle=True)
                soak.take_sessions()
            print(
                f"soak: {args.minutes:g} min, a fault every {args.fault_every:g} s "
                f"({len(soak.faults)} faults), gunicorn --preload, {server.workers} sync "
                f"workers, {args.clients} clients at {args.rate:g} requests/s, "
                f"{time.strftime('%Y-%m-%d')}; warm-up: the first {len(CYCLE)} faults"
            )
            print()
            result = report(soak, warmup_until, args)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Network-fault benchmark: a real PostgreSQL primary and two streaming
standbys, each in its own network namespace on this machine (tools/localnet.py:
veth pairs to a bridge, private addresses; replication runs over them), under
Django ORM load through `dbha.backends.postgresql` (unless stated): two threads writing a
row each per connection and one reading the newest row (READS="replicas"),
CONN_MAX_AGE=0, libpq connect_timeout 2 s. Needs root.

Scenarios (tools/netfaults.py), each on a fresh cluster:

    partition       every packet to and from the primary dropped (nft): SYNs
                    vanish, nothing is refused; failover2 promoted; healed
    cut             the primary's traffic with the standbys dropped both ways,
                    the application still reaches it; failover2 promoted
                    while the old primary answers; healed
    lossy-standby   loss and latency, both ways, on failover1's link (localnet's
                    wire, as tc netem would: this kernel has no netem)
    lossy-primary   the same on the primary's link

Each run is one of those with its own link, settings and client: DBHA
defaults unless stated, plus READS="replicas", MAX_REPLICA_LAG=1; libpq
OPTIONS connect_timeout 2 s, and for "+ tcp_user_timeout" also
tcp_user_timeout 2 s and keepalives (1 s idle, 1 s interval, 2 probes);
"no reports": Django's own backend. Times are relative to the fault
(detection) or to pg_promote() returning (negative: while it ran).

    python benches/network_faults.py [--runs partition,cut,...] [--promote-after 3]
        [--degraded 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import localdjango

import dbha
import localdb
import localnet
import netfaults


@dataclass
class Run:
    scenario: str
    label: str
    netem: netfaults.Netem | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    reports: bool = True  # dbha's backend, else Django's
    keepalive: bool = False  # libpq tcp_user_timeout and keepalives


SLOW_LOSSY = netfaults.Netem(delay_ms=100, jitter_ms=30, loss_pct=20)
LOSSY = netfaults.Netem(delay_ms=0, jitter_ms=0, loss_pct=25)
RUNS = {
    "partition": Run("partition", "partition of the primary"),
    "partition-keepalive": Run(
        "partition", "partition of the primary, + tcp_user_timeout", keepalive=True
    ),
    "cut": Run("cut", "primary cut off from the standbys only"),
    "slow-standby": Run("lossy-standby", "failover1's link", SLOW_LOSSY),
    "slow-primary": Run("lossy-primary", "the primary's link", SLOW_LOSSY),
    "slow-primary-timeout": Run(
        "lossy-primary",
        "the primary's link",
        SLOW_LOSSY,
        {"CONNECT_TIMEOUT": 1.5, "CHECK_INTERVAL": 2.0},
    ),
    "lossy-primary": Run("lossy-primary", "the primary's link", LOSSY),
    "lossy-primary-unreported": Run("lossy-primary", "the primary's link", LOSSY, reports=False),
}
BASE: dict[str, Any] = {"READS": "replicas", "MAX_REPLICA_LAG": 1.0}
OPTIONS = {"connect_timeout": 2}
KEEPALIVE = {
    "tcp_user_timeout": 2000,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 2,
}


def seconds(value: float | None, since: float | None) -> str:
    if value is None:
        return "never"
    return f"{value - (since or 0):+.3f} s"


def common(o: netfaults.Outcome) -> str:
    """Failed operations, misplaced writes and stale reads."""
    stale = o.stale_reads()
    worst = max((s for _, s in o.staleness()), default=0.0)
    reads = sum(op.kind == "read" and op.ok for op in o.ops)
    return (
        f"| {sum(not op.ok for op in o.ops)} of {len(o.ops)} | {len(o.on_non_primary())} "
        f"| {len(stale)} of {reads} (worst {worst:.2f} s) "
    )


def failover_row(run: Run, o: netfaults.Outcome) -> str:
    missing = o.missing()
    explained = sum(o.explained(op) for op in missing)
    lost = o.lost_after_promotion()
    latest = f" ({max(op.ended for op in lost) - (o.promoted or 0):+.3f} s)" if lost else ""
    detected = "-"
    if o.scenario == "partition":
        detected = seconds(o.first("default", "down", o.fault_at), o.fault_at)
    fenced = o.first("default", "fenced", o.promoting or 0)
    healed = " (after the heal)" if fenced and fenced > o.healed_at else ""
    after_heal = sum(at >= o.healed_at for at, name, _ in o.signals if name == "writer_changed")
    return (
        f"| {run.label} | {detected} | {seconds(o.switched_at(), o.promoted)} "
        f"| {seconds(o.first_write_on('failover2', o.promoting or 0), o.promoted)} "
        f"| {seconds(fenced, o.promoted)}{healed} "
        f"{common(o)}| {len(missing)} of {sum(op.ok for op in o.writes())} ({explained} explained) "
        f"| {len(lost)}{latest} | {after_heal} |"
    )


def no_writer(o: netfaults.Outcome) -> float:
    """Seconds available_db() had no writer to answer."""
    total = 0.0
    for (at, writer), (then, _) in zip(
        o.writers, [*o.writers[1:], (o.ended_at, None)], strict=True
    ):
        if writer is None:
            total += then - at
    return total


def lossy_row(run: Run, o: netfaults.Outcome) -> str:
    victim = "failover1" if o.scenario == "lossy-standby" else "default"
    errors = o.probe_errors.get(victim, {})
    shown = ", ".join(f"{k} {n}" for k, n in sorted(errors.items())) or "0"
    others = sum(a != victim for _, n, a in o.signals if n in ("node_down", "node_up"))
    settings = ", ".join(f"{k}={v:g}" for k, v in run.settings.items()) or "defaults"
    stable = o.final_writer == "default" and not any(
        n in ("node_down", "node_up") and at > o.healed_at + 2.0 for at, n, _ in o.signals
    )
    return (
        f"| {run.label} | {run.netem} | {settings} | {'dbha' if run.reports else 'none'} "
        f"| {shown} | {o.transitions('node_down', victim)} / {o.transitions('node_up', victim)} "
        f"| {others} | {o.writer_changes} | {no_writer(o):.1f} s {common(o)}"
        f"| {'yes' if stable else 'no'} |"
    )


FAILOVER_HEADER = (
    "| fault | fault to marked down | promotion to available_db() = failover2 "
    "| promotion to first write on failover2 | promotion to old primary fenced | failed ops "
    "| acked by a non-primary | standby reads staler than MAX_REPLICA_LAG "
    "| acked, missing from failover2 | acked by the old primary after promotion began (latest) "
    "| writer changes after the heal |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)
LOSSY_HEADER = (
    "| faulty link | netem, each way | DBHA | failure reports | probe errors on it "
    "| its down / up signals | other nodes' signals | writer changes | no writer for "
    "| failed ops | acked by a non-primary | standby reads staler than MAX_REPLICA_LAG "
    "| healed, stable on default |\n"
    "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"from: {','.join(RUNS)}")
    parser.add_argument("--promote-after", type=float, default=3.0)
    parser.add_argument("--degraded", type=float, default=8.0)
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    timing = netfaults.Timing(
        steady=3.0, promote_after=args.promote_after, after=3.0, degraded=args.degraded, healed=4.0
    )
    from django.conf import settings as django_settings

    results: list[tuple[Run, netfaults.Outcome]] = []
    model = None
    with localnet.LocalNet(netfaults.ALIASES) as net:
        hosts = [net.address(h) for h in net.hosts]
        prefixes = [net.exec_prefix(h) for h in net.hosts]
        for name in names:
            run = RUNS[name]
            with localdb.PgCluster(2, ports=[5432] * 3, hosts=hosts, prefixes=prefixes) as cluster:
                if model is None:
                    model = localdjango.configure(cluster)
                else:
                    localdjango.create_table(cluster, model)
                engine = localdjango.REPORTING_ENGINE if run.reports else localdjango.PLAIN_ENGINE
                localdjango.use_engine(engine)
                for entry in django_settings.DATABASES.values():
                    entry["OPTIONS"] = {**OPTIONS, **(KEEPALIVE if run.keepalive else {})}
                settings = {**BASE, **run.settings}
                outcome = netfaults.run(
                    run.scenario, net, cluster, model, "note", settings, timing, run.netem
                )
                results.append((run, outcome))
                dbha.close()

    import django

    print(
        f"django-dbha {dbha.__version__}, Django {django.get_version()}, "
        f"{time.strftime('%Y-%m-%d')}; fault after {timing.steady:g} s of load"
    )
    failovers = [(r, o) for r, o in results if o.promoted is not None]
    if failovers:
        print(
            f"failover2 promoted {timing.promote_after:g} s after the fault, the fault healed "
            f"{timing.after:g} s after the promotion, {timing.healed:g} s more of load"
        )
        print()
        print(FAILOVER_HEADER)
        for run, outcome in failovers:
            print(failover_row(run, outcome))
    lossy = [(r, o) for r, o in results if o.promoted is None]
    if lossy:
        print()
        print(
            f"loss and latency for {timing.degraded:g} s, then healed, {timing.healed:g} s "
            "more of load"
        )
        print()
        print(LOSSY_HEADER)
        for run, outcome in lossy:
            print(lossy_row(run, outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())

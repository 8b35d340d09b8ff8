"""Network-fault benchmark: a real PostgreSQL primary and two streaming
standbys, each in its own network namespace on this machine (tools/localnet.py:
veth pairs to a bridge, private addresses; replication runs over them), under
Django ORM load through `dbha.backends.postgresql`: two threads writing a
row each per connection and one reading the newest row (READS="replicas"),
CONN_MAX_AGE=0, libpq connect_timeout 2 s. Needs root.

Scenarios (tools/netfaults.py), each on a fresh cluster:

    partition       every packet to and from the primary dropped (nft): SYNs
                    vanish, nothing is refused; failover2 promoted; healed
    cut             the primary's traffic with the standbys dropped both ways,
                    the application still reaches it; failover2 promoted
                    while the old primary answers; healed
    lossy-standby   tc netem loss and latency on both ends of failover1's link
    lossy-primary   the same on the primary's link

Times are relative to the fault (detection) or to pg_promote() returning
(negative: while it ran).

    python benches/network_faults.py [--scenarios partition,cut,...]
        [--loss 20] [--delay 100] [--jitter 30] [--max-lag 1]
        [--connect-timeout 0.5] [--check-interval 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import localdjango

import dbha
import localdb
import localnet
import netfaults


def seconds(value: float | None, since: float | None) -> str:
    if value is None or since is None:
        return "-" if since is None else "never"
    return f"{value - since:+.3f} s"


def transitions(o: netfaults.Outcome) -> str:
    """Node down/up signals per alias that had any."""
    parts = []
    for alias in netfaults.ALIASES:
        down, up = o.transitions("node_down", alias), o.transitions("node_up", alias)
        if down or up:
            parts.append(f"{alias} {down}/{up}")
    return ", ".join(parts) or "0"


def probe_errors(o: netfaults.Outcome, alias: str) -> str:
    errors = o.probe_errors.get(alias, {})
    return ", ".join(f"{kind} {n}" for kind, n in sorted(errors.items())) or "0"


def row(o: netfaults.Outcome) -> str:
    victim = "failover1" if o.scenario == "lossy-standby" else "default"
    writes = o.writes()
    missing = o.missing()
    explained = sum(o.explained(op) for op in missing)
    lost = o.lost_after_promotion()
    latest = f" (latest {max(op.ended for op in lost) - (o.promoted or 0):+.3f} s)" if lost else ""
    stale = o.stale_reads()
    worst = max((s for _, s in o.staleness()), default=0.0)
    reads = [op for op in o.ops if op.kind == "read" and op.ok]
    switched = o.switched_at()
    after_heal = sum(at >= o.healed_at for at, name, _ in o.signals if name == "writer_changed")
    fenced = ", ".join(a for a, f in o.final_split_brain.items() if f) or "none"
    detected = "-"
    if o.scenario == "partition":
        detected = seconds(o.first(victim, "down", o.fault_at), o.fault_at)
    return (
        f"| {netfaults.SCENARIOS[o.scenario]} "
        f"| {detected} "
        f"| {seconds(o.first('default', 'fenced', o.promoting or 0), o.promoted)} "
        f"| {seconds(switched, o.promoted)} "
        f"| {seconds(o.first_write_on('failover2', o.promoting or 0), o.promoted)} "
        f"| {sum(not op.ok for op in o.ops)} of {len(o.ops)} "
        f"| {len(missing)} of {sum(op.ok for op in writes)} ({explained} explained) "
        f"| {len(lost)}{latest} "
        f"| {len(o.on_non_primary())} "
        f"| {len(stale)} of {len(reads)} (worst {worst:.2f} s) "
        f"| {o.writer_changes} ({after_heal} after heal) "
        f"| {transitions(o)} "
        f"| {probe_errors(o, victim)} "
        f"| {o.final_writer}; fenced: {fenced} |"
    )


HEADER = (
    "| scenario | fault to marked down | promotion to old primary fenced "
    "| promotion to available_db() = failover2 | promotion to first write on failover2 "
    "| failed ops | acked writes missing from the final primary "
    "| acked by the old primary after promotion began | acked by a non-primary "
    "| standby reads staler than MAX_REPLICA_LAG | writer changes "
    "| node down/up signals | probe errors on the faulty node | after heal: writer |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(netfaults.SCENARIOS))
    parser.add_argument("--loss", type=float, default=20.0, help="%% per direction")
    parser.add_argument("--delay", type=int, default=100, help="ms per direction")
    parser.add_argument("--jitter", type=int, default=30, help="ms")
    parser.add_argument("--max-lag", type=float, default=1.0, help='DBHA["MAX_REPLICA_LAG"]')
    parser.add_argument("--connect-timeout", type=float, help='DBHA["CONNECT_TIMEOUT"]')
    parser.add_argument("--check-interval", type=float, help='DBHA["CHECK_INTERVAL"]')
    parser.add_argument("--promote-after", type=float, default=3.0)
    parser.add_argument("--degraded", type=float, default=10.0)
    args = parser.parse_args()
    names = args.scenarios.split(",")
    unknown = [n for n in names if n not in netfaults.SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(netfaults.SCENARIOS)}")

    settings: dict[str, Any] = {"READS": "replicas", "MAX_REPLICA_LAG": args.max_lag}
    if args.connect_timeout:
        settings["CONNECT_TIMEOUT"] = args.connect_timeout
    if args.check_interval:
        settings["CHECK_INTERVAL"] = args.check_interval
    timing = netfaults.Timing(
        steady=3.0, promote_after=args.promote_after, after=3.0, degraded=args.degraded, healed=4.0
    )
    netem = netfaults.Netem(args.delay, args.jitter, args.loss)
    outcomes = []
    model = None
    with localnet.LocalNet(netfaults.ALIASES) as net:
        for name in names:
            hosts = [net.address(h) for h in net.hosts]
            prefixes = [net.exec_prefix(h) for h in net.hosts]
            with localdb.PgCluster(2, ports=[5432] * 3, hosts=hosts, prefixes=prefixes) as cluster:
                if model is None:
                    model = localdjango.configure(cluster)
                else:
                    localdjango.create_table(cluster, model)
                outcomes.append(
                    netfaults.run(name, net, cluster, model, "note", settings, timing, netem)
                )
                dbha.close()

    import django

    shown = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    print(
        f"django-dbha {dbha.__version__}, Django {django.get_version()}, DBHA: {shown} "
        f"(others default), {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"netem: {netem}; fault after {timing.steady:g} s of load, failover2 promoted "
        f"{timing.promote_after:g} s after it, healed {timing.after:g} s after the promotion "
        f"(loss/latency: after {timing.degraded:g} s); {timing.healed:g} s after the heal"
    )
    print()
    print(HEADER)
    for outcome in outcomes:
        print(row(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())

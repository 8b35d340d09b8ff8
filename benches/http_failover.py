"""HTTP failover benchmark: the example project (examples/httpapp) served
by gunicorn (`--preload`, 4 sync workers forked from a master whose dbha
checker runs) and by uvicorn (ASGI, 2 workers, an async view), under a
bounded load of clients on loopback, in front of a real PostgreSQL primary
and two streaming standbys.

Each request, on a new connection, writes a row and reads it back through
the ORM (dbha's router and backend `dbha.backends.postgresql`,
PinningMiddleware with READS="replicas", CONN_MAX_AGE=0, libpq
connect_timeout 2 s, every DBHA timing at its default). A poller asks the
health view, a connection per request so that every worker answers, for
each worker's own view of dbha.

Scenarios: the fault at t = --steady, `failover2` promoted --promote-after
seconds later (`failover1` stays a standby):

    kill        kill -9 of the whole primary
    listener    SIGSTOP of the postmaster only: sessions answer, new
                connections hang
    hang        SIGSTOP of every process of the primary
    alive       no fault: failover2 is promoted while the old primary runs

Columns, times relative to pg_promote() returning (negative: while it ran):

    failed                  requests without a 200 (no writer, a connect that
                            timed out, a session lost)
    failed after promotion  requests that failed although they started (began
      + FAST_INTERVAL       their connect) more than one FAST_INTERVAL (0.1 s)
                            after pg_promote() returned: target 0
    writes resume           failover2's first acknowledged write (the answer's
                            arrival): the time to recover
    last failure            the start of the last failed request
    p50 / p99               latency of every request (failed ones too) that
                            started before the fault, during the failover (up
                            to 0.5 s after writes resumed) and after it
    p99 after / before      target at most 2x
    workers switched        workers whose health view named failover2 the
                            writer, with a probe less than 3 s old (a running
                            checker): target every worker. The time is the
                            last worker's first such answer: an upper bound,
                            as a worker answers a poll only once it is free.

With --runs above 1, each cell is the median over runs (counts: the sum),
and the ratio's worst run is in brackets.

    python benches/http_failover.py [--quick] [--runs 3] [--servers gunicorn,uvicorn]
        [--scenarios kill,listener,hang,alive] [--rate 40] [--clients 4]
        [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import httpfaults
import localdb
import localhttp
from httpfaults import Outcome, median

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("gunicorn", "uvicorn")
#: The targets.
MAX_P99_RATIO = 2.0


def seconds(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:+.3f} s"


def ms(value: float) -> str:
    return "-" if value != value else f"{value * 1000:.1f}"


def latencies(runs: list[Outcome], which: str) -> str:
    p50 = median([o.percentile(which, 0.5) for o in runs])
    p99 = median([o.percentile(which, 0.99) for o in runs])
    return f"{ms(p50)} / {ms(p99)} ms"


def last_switch(outcome: Outcome) -> float | None:
    """When the last worker named failover2; None if one never did."""
    times = list(outcome.switches().values())
    return None if None in times or not times else max(t for t in times if t is not None)


def median_of(values: list[float | None]) -> float | None:
    """The median, or None if a run has none (never recovered)."""
    return None if None in values else median([v for v in values if v is not None])


def print_table(groups: list[list[Outcome]]) -> None:
    print(
        "| fault | server | failed | failed after promotion + FAST_INTERVAL "
        "| writes resume on failover2 | last failure started "
        "| p50 / p99 before | p50 / p99 during | p50 / p99 after | p99 after / before "
        "| workers switched (last) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for runs in groups:
        first = runs[0]
        ratios = [o.p99_ratio for o in runs]
        ratio = f"{median(ratios):.2f}x"
        if len(runs) > 1:
            ratio += f" ({max(ratios):.2f}x)"
        switched = sum(o.workers_switched for o in runs)
        workers = sum(o.workers for o in runs)
        failures = [o.last_failure for o in runs if o.last_failure is not None]
        print(
            f"| {httpfaults.SCENARIOS[first.name]} | {first.server} ({first.workers}) "
            f"| {sum(len(o.failed) for o in runs)} of {sum(len(o.measured) for o in runs)} "
            f"| {sum(len(o.failed_after_recovery) for o in runs)} "
            f"| {seconds(median_of([o.recover for o in runs]))} "
            f"| {seconds(median(failures) if failures else None)} "
            f"| {latencies(runs, 'before')} | {latencies(runs, 'during')} "
            f"| {latencies(runs, 'after')} | {ratio} "
            f"| {switched}/{workers} ({seconds(median_of([last_switch(o) for o in runs]))}) |"
        )


def print_workers(groups: list[list[Outcome]]) -> None:
    print(
        "| fault | server | run | each worker's first health answer naming failover2 "
        "| its newest probe, oldest | workers replaced |"
    )
    print("|---|---|---:|---|---:|---:|")
    for runs in groups:
        for n, o in enumerate(runs, 1):
            switches = ", ".join(
                f"{pid}: {seconds(at) if at is not None else 'never'}"
                for pid, at in sorted(o.switches().items(), key=lambda item: item[1] or 1e9)
            )
            oldest = max(o.probe_ages().values(), default=float("inf"))
            print(
                f"| {httpfaults.SCENARIOS[o.name]} | {o.server} | {n} | {switches} "
                f"| {oldest:.2f} s | {len(o.replaced)} |"
            )


def print_integrity(groups: list[list[Outcome]]) -> None:
    print(
        "| fault | server | acked by a non-primary | lost: acked by the old primary after "
        "promotion began (latest) | acked, absent from failover2 | read-backs that missed "
        "| stuck > 5 s | failed, by error |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for runs in groups:
        first = runs[0]
        lost = [t for o in runs for t in o.lost]
        errors: dict[str, int] = {}
        for o in runs:
            for error, count in o.failed_by_error().items():
                errors[error] = errors.get(error, 0) + count
        by_error = ", ".join(f"{e} {c}" for e, c in sorted(errors.items())) or "-"
        lost_cell = (
            "-" if first.name != "alive" else f"{len(lost)} ({seconds(max(lost))})" if lost else "0"
        )
        print(
            f"| {httpfaults.SCENARIOS[first.name]} | {first.server} "
            f"| {sum(o.by_non_primary for o in runs)} | {lost_cell} "
            f"| {sum(o.absent for o in runs)} | {sum(o.read_back_missed for o in runs)} "
            f"| {sum(o.stuck for o in runs)} | {by_error} |"
        )


def print_targets(outcomes: list[Outcome]) -> None:
    late = sum(len(o.failed_after_recovery) for o in outcomes)
    ratios = [o.p99_ratio for o in outcomes]
    over = [o for o in outcomes if not o.p99_ratio <= MAX_P99_RATIO]
    unswitched = [o for o in outcomes if o.workers_switched != o.workers]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(
        f"- 0 failed requests started later than pg_promote() + FAST_INTERVAL: "
        f"{verdict(late == 0)} ({late} in {len(outcomes)} runs)"
    )
    print(
        f"- p99 after recovery within {MAX_P99_RATIO:g}x before: {verdict(not over)} "
        f"(median {median(ratios):.2f}x, worst {max(ratios):.2f}x; "
        f"{len(outcomes) - len(over)} of {len(outcomes)} runs)"
    )
    print(
        f"- every worker switched: {verdict(not unswitched)} "
        f"({sum(o.workers_switched for o in outcomes)} of "
        f"{sum(o.workers for o in outcomes)} workers)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios", default=",".join(httpfaults.SCENARIOS),
        help=f"comma-separated, from {','.join(httpfaults.SCENARIOS)}",
    )  # fmt: skip
    parser.add_argument("--servers", default=",".join(SERVERS), help="gunicorn,uvicorn")
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario per server")
    parser.add_argument("--quick", action="store_true", help="each scenario once (--runs 1)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second, in all")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--steady", type=float, default=5.0, help="load before the fault, s")
    parser.add_argument("--promote-after", type=float, default=2.0)
    parser.add_argument("--after", type=float, default=7.0, help="load after promotion, s")
    parser.add_argument(
        "--workers", type=int,
        help="worker processes (default: gunicorn 4, uvicorn 2)",
    )  # fmt: skip
    parser.add_argument(
        "--dbha", type=json.loads, default={},
        help='DBHA keys besides the defaults, as JSON: \'{"CHECK_INTERVAL": 0.2}\'',
    )  # fmt: skip
    parser.add_argument("--json-out", type=Path, help="write the outcome as JSON here")
    parser.add_argument(
        "--log-dir", type=Path, default=ROOT / "target" / "http_failover",
        help="the app servers' logs (default target/http_failover)",
    )  # fmt: skip
    args = parser.parse_args()
    names = args.scenarios.split(",")
    servers = args.servers.split(",")
    unknown = [n for n in names if n not in httpfaults.SCENARIOS]
    unknown += [s for s in servers if s not in SERVERS]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    runs = 1 if args.quick else args.runs
    timing = httpfaults.Timing(
        steady=args.steady, promote_after=args.promote_after, after=args.after
    )
    localhttp.terminate_on_sigterm()
    args.log_dir.mkdir(parents=True, exist_ok=True)

    groups: list[list[Outcome]] = []
    began = time.monotonic()
    for server in servers:
        for name in names:
            group: list[Outcome] = []
            for n in range(runs):
                with localdb.PgCluster(standbys=2) as cluster:
                    outcome = httpfaults.run(
                        name, server, cluster, args.log_dir, timing, args.clients, args.rate,
                        log_name=f"{name}-{server}-{n + 1}.log", workers=args.workers,
                        dbha=args.dbha,
                    )  # fmt: skip
                group.append(outcome)
                row = outcome.as_dict()
                print(
                    f"# {name} on {server}, run {n + 1}: {row['failed']} of {row['requests']} "
                    f"failed, {row['failed_after_recovery']} after recovery, "
                    f"p99 ratio {row['p99_ratio']}, workers switched "
                    f"{row['workers_switched']}/{row['workers']}",
                    file=sys.stderr,
                )
            groups.append(group)

    import django

    import dbha

    print(
        f"django-dbha {dbha.__version__}, Django {django.get_version()}, gunicorn "
        f"{version('gunicorn')}, uvicorn {version('uvicorn')}, "
        f"{'DBHA ' + json.dumps(args.dbha) if args.dbha else 'default DBHA timings'}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{args.clients} clients, {args.rate:g} requests/s in all, each a new connection, a write "
        f"and its read-back; fault after {args.steady:g} s, failover2 promoted "
        f"{args.promote_after:g} s later, {args.after:g} s after; {runs} run(s) each, "
        f"{time.monotonic() - began:.0f} s in all"
    )
    print()
    print_table(groups)
    print()
    print_workers(groups)
    print()
    print_integrity(groups)
    print()
    print_targets([o for group in groups for o in group])
    if args.json_out:
        scenarios = [dict(o.as_dict(), run=n) for g in groups for n, o in enumerate(g, 1)]
        args.json_out.write_text(json.dumps({"scenarios": scenarios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

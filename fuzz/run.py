"""Builds the fuzz targets with cargo-afl and runs each under afl-fuzz, one
at a time, until it has done `--execs` executions (or `--seconds` passed);
then prints a table and exits non-zero if any target crashed or hung.

Unattended (CI, no TTY, no standard input, as root). Needs cargo-afl:
tools/install-fuzz-deps.sh. Python 3.11 stdlib only.

    python3 fuzz/run.py                      # 10 M executions per target
    python3 fuzz/run.py --seconds 20         # CI: about 20 s per target
    python3 fuzz/run.py --targets postgres --execs 1000000

A crash or hang is kept in fuzz/out/<target>/default/{crashes,hangs}/; run
the target outside afl-fuzz with it on standard input to see the panic
(DBHA_FUZZ_SHOW=1 prints each probe's result):

    fuzz/target/release/<target> < fuzz/out/<target>/default/crashes/id:...
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
TARGETS = ("postgres", "mysql", "tls", "patroni", "failure_text")
# Unbounded allocation shows as a crash: past this the allocator fails and
# Rust aborts. The largest legitimate buffers are a few MiB.
MEMORY_MB = 512
# The targets never wait on the network; every step's deadline is 50 ms.
TIMEOUT_MS = 500


@dataclass
class Result:
    target: str
    execs: int
    seconds: float
    corpus: int
    crashes: int
    hangs: int
    stability: str
    ok_start: bool


def afl_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AFL_SKIP_CPUFREQ="1",  # no CPU governor to tune in a container
        AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES="1",  # core_pattern may pipe
        AFL_NO_UI="1",  # no TTY: a status line now and then
        # run.py pins afl-fuzz and the target to one CPU itself: afl-fuzz's
        # own choice fails when no core is idle (shared CI machines).
        AFL_NO_AFFINITY="1",
        AFL_NO_WARN_INSTABILITY="1",
    )
    # Whatever the caller's environment: never stop at the first crash
    # without a report, never resume an old run.
    for name in (
        "AFL_BENCH_UNTIL_CRASH",
        "AFL_BENCH_JUST_ONE",
        "AFL_AUTORESUME",
        "AFL_EXIT_WHEN_DONE",
    ):
        env.pop(name, None)
    return env


def build() -> None:
    # The fuzzed code uses the dependency versions the extension ships with:
    # the main lock file, to which cargo adds the fuzz crate's own few.
    shutil.copyfile(FUZZ.parent / "Cargo.lock", FUZZ / "Cargo.lock")
    subprocess.run(
        ["cargo", "afl", "build", "--release"], cwd=FUZZ, check=True, stdin=subprocess.DEVNULL
    )


def stats(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def count(folder: Path) -> int:
    # AFL++ keeps a README.txt next to what it saves.
    return sum(1 for f in folder.glob("id:*")) if folder.is_dir() else 0


def fuzz(
    target: str, execs: int, seconds: int | None, memory_mb: int, timeout_ms: int, cpu: int
) -> Result:
    out = FUZZ / "out" / target
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(exist_ok=True)
    command = [
        "cargo", "afl", "fuzz",
        "-i", str(FUZZ / "corpus" / target),
        "-o", str(out),
        "-m", str(memory_mb),
        "-t", str(timeout_ms),
        "-E", str(execs),
    ]  # fmt: skip
    if seconds is not None:
        command += ["-V", str(seconds)]
    command += ["--", str(FUZZ / "target" / "release" / target)]
    print(f"== {target}: {' '.join(command)}", flush=True)
    started = time.monotonic()
    with open(FUZZ / "out" / f"{target}.log", "w") as log:
        # Past -V, afl-fuzz still calibrates and syncs: a generous backstop.
        backstop = None if seconds is None else seconds + 300
        try:
            subprocess.run(
                command, cwd=FUZZ, env=afl_env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, timeout=backstop,
                # afl-fuzz and the target on one CPU: each execution is a
                # few wake-ups between them, far cheaper on the same core
                # (twice the executions a second on a virtual machine).
                preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            print(f"   {target}: afl-fuzz overran its time and was stopped", flush=True)
    wall = time.monotonic() - started
    found = stats(out / "default" / "fuzzer_stats")
    return Result(
        target=target,
        execs=int(found.get("execs_done", 0)),
        seconds=wall,
        corpus=int(found.get("corpus_count", 0)),
        crashes=count(out / "default" / "crashes"),
        hangs=count(out / "default" / "hangs"),
        stability=found.get("stability", "?"),
        ok_start=bool(found),
    )


def table(results: list[Result]) -> str:
    head = (
        f"{'target':<14}{'execs':>12}{'execs/s':>10}{'corpus':>8}{'crashes':>9}{'hangs':>7}"
        f"{'stability':>11}{'wall':>9}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rate = r.execs / r.seconds if r.seconds else 0
        minutes, secs = divmod(round(r.seconds), 60)
        rows.append(
            f"{r.target:<14}{r.execs:>12,}{rate:>10,.0f}{r.corpus:>8}{r.crashes:>9}{r.hangs:>7}"
            f"{r.stability:>11}{minutes:>5}m{secs:02}s"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--execs", type=int, default=10_000_000, help="executions per target (default 10,000,000)"
    )
    parser.add_argument("--seconds", type=int, help="wall-clock cap per target (fuzzing time)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument(
        "--memory-mb", type=int, default=MEMORY_MB, help=f"afl-fuzz -m (default {MEMORY_MB})"
    )
    parser.add_argument(
        "--timeout-ms", type=int, default=TIMEOUT_MS, help=f"afl-fuzz -t (default {TIMEOUT_MS})"
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="the CPU to fuzz on (default: the last)",
    )
    parser.add_argument("--no-build", action="store_true", help="use the targets already built")
    args = parser.parse_args()

    if not args.no_build:
        build()
    results = []
    for target in args.targets:
        result = fuzz(target, args.execs, args.seconds, args.memory_mb, args.timeout_ms, args.cpu)
        results.append(result)
        print(table([result]).splitlines()[-1], flush=True)
    print()
    print(table(results))
    failed = False
    for r in results:
        where = FUZZ / "out" / r.target / "default"
        if not r.ok_start:
            print(f"{r.target}: afl-fuzz did not run; see {FUZZ / 'out' / (r.target + '.log')}")
            failed = True
        if r.crashes or r.hangs:
            print(f"{r.target}: {r.crashes} crashes, {r.hangs} hangs in {where}")
            failed = True
        if args.seconds is None and r.ok_start and r.execs < args.execs:
            print(f"{r.target}: stopped after {r.execs:,} of {args.execs:,} executions")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run test apps of Django's own suite on a PostgreSQL primary + streaming
standby, once without a router (the baseline) and once per `DBHA["READS"]`
mode through dbha, and compare the outcomes test by test.

    python tools/django_suite.py --reads writer --reads replicas

The suite comes from the sdist of the installed Django version (downloaded
once into .venv/django-src/<version>/) and runs against the installed Django.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import django

sys.path.insert(0, str(Path(__file__).resolve().parent))

from localdb import LOOPBACK, PgCluster, free_port

log = logging.getLogger("django_suite")

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
CACHE = REPO / ".venv"

APPS = ("multiple_database", "prefetch_related", "transactions", "sessions_tests")
MODES = ("writer", "replicas")
#: The apps a router that reads from standbys can pass: every read of theirs
#: runs inside a transaction (TestCase), where reads stay on the writer, or
#: reads a `WRITER_READS` model. The TransactionTestCase tests of
#: `transactions` also read outside transactions; such a router may then
#: pick the standby, a database those tests forbid queries to.
REPLICA_APPS = ("multiple_database", "prefetch_related", "sessions_tests")
PARALLEL = 2
#: One run of the four apps takes 5-10 s on 2 cores; this bounds a hang.
RUN_TIMEOUT = 180.0
DOWNLOAD_TIMEOUT = 300.0

#: The outcomes a test can have, in the order the summary lists them.
OUTCOMES = ("passed", "failed", "error", "skipped", "expected failure", "unexpected success")


# --- the suite's source ------------------------------------------------------------------------


def django_tests_dir(version: str = django.__version__) -> Path:
    """`tests/` of Django `version`'s sdist, downloaded and unpacked on first use."""
    target = CACHE / "django-src" / version
    if (target / "tests" / "runtests.py").is_file():
        return target / "tests"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", tmp, f"Django=={version}"]
        log.info("downloading the Django %s sdist", version)
        subprocess.run(cmd, check=True, timeout=DOWNLOAD_TIMEOUT, stdin=subprocess.DEVNULL)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(sdist) as tar:
            # Only tests/ is needed: the suite runs against the installed Django.
            members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"]]
            # The "data" filter (refuse links and paths out of the tree) where
            # this Python has it: 3.10.12 and later.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(unpacked, members=members, **safe)  # type: ignore[arg-type]
        (top,) = unpacked.iterdir()
        # A rename, so that a run killed while unpacking leaves no half tree behind.
        with contextlib.suppress(OSError):  # another process got there first
            top.rename(target)
    return target / "tests"


# --- one run -----------------------------------------------------------------------------------


@dataclasses.dataclass
class SuiteRun:
    """The result of one `runtests.py` run."""

    label: str
    apps: tuple[str, ...]
    #: None when the run was killed at its timeout.
    exit_code: int | None
    #: Test id (subtests included) -> outcome; several outcomes joined by "+".
    outcomes: dict[str, str]
    #: Test id -> the first line of its failure or error.
    errors: dict[str, str]
    seconds: float
    log_file: Path
    #: dbha.status() at the end of the run, per alias (None: no dbha).
    dbha_nodes: list[dict[str, Any]] | None = None

    def counts(self) -> dict[str, collections.Counter[str]]:
        """Per app, how many tests had each outcome."""
        per_app: dict[str, collections.Counter[str]] = {
            app: collections.Counter() for app in self.apps
        }
        for test, outcome in self.outcomes.items():
            per_app.setdefault(app_of(test), collections.Counter())[outcome] += 1
        return per_app

    def failed(self, apps: Iterable[str]) -> bool:
        """Whether a test of `apps` did not pass, skip or fail as expected."""
        wanted = set(apps)
        return any(
            app_of(test) in wanted and o not in ("passed", "skipped", "expected failure")
            for test, o in self.outcomes.items()
        )


def apps_for(reads: str | None, apps: Iterable[str] = APPS) -> list[str]:
    """The apps of `apps` that a run with `reads` can be expected to pass."""
    return [app for app in apps if reads != "replicas" or app in REPLICA_APPS]


def app_of(test_id: str) -> str:
    # Class and module fixtures fail as "setUpClass (app.tests.Class)".
    if "(" in test_id and not test_id.startswith(APPS):
        test_id = test_id[test_id.index("(") + 1 :]
    return test_id.split(".", 1)[0]


def _settings_module(cluster: PgCluster, reads: str | None) -> str:
    """The settings runtests.py loads. `reads` None: the baseline, without dbha."""
    primary, standby = cluster.primary, cluster.standbys[0]

    def db(port: int, name: str, **extra: object) -> dict[str, object]:
        return {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": LOOPBACK,
            "PORT": port,
            "NAME": name,
            "USER": "postgres",
            **extra,
        }

    databases = {
        "default": db(primary.port, "dbha_suite"),
        # The standby: Django makes no test database for it, and reads the
        # primary's (replicated) one there, as a deployment with replicas does.
        "failover1": db(standby.port, "dbha_suite", TEST={"MIRROR": "default"}),
        # On the primary's server, outside every dbha group.
        "other": db(primary.port, "dbha_suite_other"),
    }
    lines = [
        '"""Written by tools/django_suite.py for one run of Django\'s test suite."""',
        f"DATABASES = {databases!r}",
        'SECRET_KEY = "django_tests_secret_key"',
        'PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]',
        'DEFAULT_AUTO_FIELD = "django.db.models.AutoField"',
        "USE_TZ = False",
        'TEST_RUNNER = "django_suite_runner.RecordingRunner"',
    ]
    if reads is not None:
        dbha = {"GROUPS": {"main": ["default", "failover1"]}, "READS": reads}
        lines += ['DATABASE_ROUTERS = ["dbha.ModelDatabaseRouter"]', f"DBHA = {dbha!r}"]
    return "\n".join(lines) + "\n"


def run_suite(
    reads: str | None,
    apps: Sequence[str] = APPS,
    *,
    timeout: float = RUN_TIMEOUT,
    log_dir: Path | None = None,
) -> SuiteRun:
    """Start a primary + standby, run `runtests.py` for `apps` through dbha
    with `reads` (None: without a router), stop the servers."""
    label = "baseline" if reads is None else f"dbha READS={reads}"
    tests_dir = django_tests_dir()
    log_dir = log_dir or CACHE / "django-suite-logs" / django.__version__
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"{'baseline' if reads is None else reads}.log"
    with (
        tempfile.TemporaryDirectory(prefix="dbha-suite-") as tmp,
        PgCluster(standbys=1, ports=[free_port(), free_port()]) as cluster,
    ):
        settings_dir = Path(tmp)
        (settings_dir / "dbha_suite_settings.py").write_text(_settings_module(cluster, reads))
        outcomes_file = settings_dir / "outcomes.jsonl"
        # Absolute: runtests.py runs in the sdist's tests directory.
        inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        path = [str(settings_dir), str(TOOLS), *(str(Path(p).resolve()) for p in inherited if p)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            "DBHA_SUITE_OUTCOMES": str(outcomes_file),
        }
        cmd = [sys.executable, str(tests_dir / "runtests.py"), "--settings=dbha_suite_settings"]
        cmd += ["--parallel", str(PARALLEL), "-v", "2", "--noinput", *apps]
        log.info("%s: %s", label, " ".join(cmd))
        began = time.monotonic()
        with log_file.open("w") as out:
            exit_code = _run_bounded(cmd, tests_dir, env, out, timeout)
        seconds = time.monotonic() - began
        outcomes, errors, nodes = _read_outcomes(outcomes_file)
    return SuiteRun(label, tuple(apps), exit_code, outcomes, errors, seconds, log_file, nodes)


def _run_bounded(
    cmd: list[str], cwd: Path, env: dict[str, str], out: TextIO, timeout: float
) -> int | None:
    """Run `cmd`; on timeout (or our own interruption) kill it and its workers."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the test workers die with it
    )
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.error("runtests.py did not finish within %gs; killed", timeout)
        return None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _read_outcomes(
    path: Path,
) -> tuple[dict[str, str], dict[str, str], list[dict[str, Any]] | None]:
    outcomes: dict[str, list[str]] = collections.defaultdict(list)
    errors: dict[str, str] = {}
    nodes = None
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "dbha" in record:
                nodes = record["dbha"]
                continue
            outcomes[record["test"]].append(record["outcome"])
            if "error" in record:
                errors.setdefault(record["test"], record["error"])
    # A test can fail and then error in tearDown: keep both.
    merged = {test: "+".join(sorted(set(o))) for test, o in outcomes.items()}
    return merged, errors, nodes


# --- comparison --------------------------------------------------------------------------------


def differences(baseline: SuiteRun, run: SuiteRun) -> list[str]:
    """How `run` differs from `baseline` on `run`'s apps; empty when equal."""
    apps = set(run.apps)
    before = {t: o for t, o in baseline.outcomes.items() if app_of(t) in apps}
    found = []
    for test in sorted(before.keys() | run.outcomes.keys()):
        if before.get(test) != run.outcomes.get(test):
            why = run.errors.get(test) or baseline.errors.get(test)
            found.append(
                f"{test}: {before.get(test, 'not run')} without dbha, "
                f"{run.outcomes.get(test, 'not run')} with" + (f" ({why})" if why else "")
            )
    # The baseline may cover more apps: its exit code then speaks of those too.
    expected_exit: int | None = int(baseline.failed(apps))
    if set(baseline.apps) == apps or baseline.exit_code is None:
        expected_exit = baseline.exit_code
    if run.exit_code != expected_exit:
        found.append(
            f"runtests.py exit code: {expected_exit} without dbha, {run.exit_code} with "
            f"(log: {run.log_file})"
        )
    return found


def summary(runs: Sequence[SuiteRun]) -> str:
    lines = []
    for run in runs:
        code = "killed at timeout" if run.exit_code is None else f"exit {run.exit_code}"
        lines.append(f"{run.label}: {code}, {run.seconds:.1f} s, log {run.log_file}")
        if run.dbha_nodes is not None:
            nodes = [
                f"{n['alias']} {n['role']} {n['state']}" + (" (writer)" if n["writer"] else "")
                for n in run.dbha_nodes
            ]
            lines.append(f"  dbha at the end: {', '.join(nodes)}")
        for app, counts in sorted(run.counts().items()):
            shown = [f"{counts[o]} {o}" for o in OUTCOMES if counts[o]]
            shown += [f"{n} {o}" for o, n in sorted(counts.items()) if o not in OUTCOMES]
            lines.append(f"  {app}: {', '.join(shown) or 'no tests'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reads",
        action="append",
        choices=MODES,
        help="a dbha READS mode to run (repeatable; default: every mode)",
    )
    parser.add_argument("--apps", nargs="+", default=list(APPS), help="Django test apps")
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT, help="seconds per run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    print(f"Django {django.__version__}, tests from {django_tests_dir()}", flush=True)
    baseline = run_suite(None, args.apps, timeout=args.timeout)
    runs = [baseline]
    diffs: dict[str, list[str]] = {}
    for reads in args.reads or MODES:
        run = run_suite(reads, apps_for(reads, args.apps), timeout=args.timeout)
        runs.append(run)
        diffs[run.label] = differences(baseline, run)
    print(summary(runs))
    for label, found in diffs.items():
        print(f"{label}: {'same as the baseline' if not found else 'DIFFERS from the baseline'}")
        for line in found:
            print(f"  {line}")
    return 1 if any(diffs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

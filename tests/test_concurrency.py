"""Concurrency and endurance: 8 threads ask dbha where to write and read
while another thread flips every node's state, reconfigures dbha, forces
probe rounds, reports failures, closes dbha and forks children. No crash,
no deadlock, no answer that is not an alias, and no leak of memory or
threads.

Probes are scripted (`_core.simulate`): no server needed, and states flip
as fast as the checker takes them. `DBHA_STRESS=full` runs the by-hand size
(8 threads x 1,000,000 calls, 200 forks) and prints its figures; CI runs a
smaller sample of the same workload."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

import dbha
from dbha import _core
from localdb import free_port
from tests.conftest import pg_settings
from tests.testapp.models import Item, Report

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")

FULL = os.environ.get("DBHA_STRESS") == "full"
THREADS = 8
#: Calls per thread (each one `available_db()`, `read_db()` or a router call).
CALLS = int(os.environ.get("DBHA_STRESS_CALLS", 1_000_000 if FULL else 400_000))
FORKS = 200 if FULL else 30
#: Past this, a thread still running is deadlocked (CI: about 10x a normal run).
TIME_LIMIT = 900.0 if FULL else 180.0
#: Growth of the resident set over the measured run: a leak of even a few
#: bytes per call passes this after millions of calls.
RSS_GROWTH_LIMIT = 20 * 2**20

#: Nothing listens on these ports; every alias is scripted anyway.
SERVERS = {
    alias: pg_settings(free_port())
    for alias in ("default", "failover1", "failover2", "reports1", "reports2", "east", "west")
}
FAST = {
    "CHECK_INTERVAL": 0.02,
    "FAST_INTERVAL": 0.01,
    "CONNECT_TIMEOUT": 0.01,
    "RISE": 1,
    "FALL": 1,
}


def databases(*aliases: str) -> dict[str, Any]:
    return {alias: SERVERS[alias] for alias in aliases}


@dataclass(frozen=True)
class Configuration:
    name: str
    databases: dict[str, Any]
    dbha: dict[str, Any]
    #: Every alias an answer may be under this configuration.
    aliases: frozenset[str]


CONFIGURATIONS = [
    Configuration(
        "writer reads",
        databases("default", "failover1", "failover2"),
        {**FAST},
        frozenset({"default", "failover1", "failover2"}),
    ),
    Configuration(
        "replica reads",
        databases("default", "failover1", "failover2"),
        {**FAST, "READS": "replicas", "LOAD_BALANCE": "random", "ON_ALL_DOWN": "last"},
        frozenset({"default", "failover1", "failover2"}),
    ),
    Configuration(
        "two groups, routes",
        databases("default", "failover1", "reports1", "reports2"),
        {
            **FAST,
            "GROUPS": {"main": ["failover1", "default"], "reports": ["reports1", "reports2"]},
            "ROUTES": {"testapp.Report": "reports"},
            "READS": "any",
        },
        frozenset({"default", "failover1", "reports1", "reports2"}),
    ),
    Configuration(
        "other aliases",
        databases("default", "east", "west"),
        {**FAST, "DATABASES": ["west", "east"], "FAILBACK": "auto"},
        frozenset({"east", "west"}),
    ),
]
#: The settings the test starts from (and returns to between the others).
BASE = CONFIGURATIONS[0]


def proc_status(key: str) -> int:
    """A number from /proc/self/status (VmRSS in kB, Threads)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE)
    assert match, key
    return int(match.group(1))


def thread_names() -> list[str]:
    """Every thread's name as the kernel knows it (dbha's Rust threads are
    `dbha-...`), and Python's threads by their names."""
    names = [t.name for t in threading.enumerate()]
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # exited meanwhile
            names.append((task / "comm").read_text().strip())
    return names


def settled_threads(timeout: float = 10.0) -> int:
    """The thread count once dbha's threads are gone and the count holds
    still: threads a reset stopped without joining exit on their own, soon.
    Bounded: a thread that never exits stays counted."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline:
        names = thread_names()
        count = proc_status("Threads")
        if not any(n.startswith("dbha") for n in names):
            seen.append(count)
            if seen[-4:] == [count] * 4:
                break
        time.sleep(0.05)
    return proc_status("Threads")


@dataclass
class Run:
    """What the threads share: the configurations in force, in order (the
    generation is the index), and what they found."""

    generations: list[Configuration] = field(default_factory=lambda: [BASE])
    stop: threading.Event = field(default_factory=threading.Event)
    bad: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    no_writer: int = 0
    #: Answers from a configuration older than the previous one.
    calls: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    forks: int = 0
    #: Forks made while the readers were still calling.
    forks_under_load: int = 0
    readers_done: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allowed(self, first: int, last: int) -> frozenset[str]:
        """The aliases of the configurations in force from just before
        generation `first` (the previous one may still answer) to `last`."""
        found: frozenset[str] = frozenset()
        for config in self.generations[max(first - 1, 0) : last + 1]:
            found |= config.aliases
        return found


def reader(run: Run, calls: int) -> None:
    router = dbha.ModelDatabaseRouter()
    asks: list[Callable[[], str | None]] = [
        dbha.available_db,
        dbha.read_db,
        lambda: router.db_for_write(Item),
        lambda: router.db_for_read(Item),
        lambda: router.db_for_read(Report),
    ]
    answers: Counter[str] = Counter()
    no_writer = i = 0
    generations = run.generations
    cache: dict[tuple[int, int], frozenset[str]] = {}
    try:
        for i in range(calls):
            first = len(generations) - 1
            try:
                answer = asks[i % len(asks)]()
            except dbha.NoHealthyDatabase:
                # A writer reported failing whose probes fail too: an answer.
                no_writer += 1
                continue
            last = len(generations) - 1
            allowed = cache.get((first, last))
            if allowed is None:
                allowed = cache[first, last] = run.allowed(first, last)
            if answer not in allowed:
                run.bad.append(f"call {i % len(asks)}: {answer!r} not in {sorted(allowed)}")
                return
            answers[answer] += 1  # type: ignore[index]
            if i % 256 == 255:
                # Let the chaos thread in: 8 readers would otherwise hold
                # the interpreter for nearly all of its turns.
                time.sleep(0)
    except BaseException as e:  # a PanicException is no Exception
        run.errors.append(f"reader: {type(e).__qualname__}: {e}")
    finally:
        with run.lock:
            run.answers.update(answers)
            run.no_writer += no_writer
            run.calls += i + 1 if calls else 0


def child(config_aliases: frozenset[str]) -> int:
    """In a forked child: dbha answers, from a checker of its own."""
    signal.alarm(10)  # a hung child dies rather than hangs the test
    router = dbha.ModelDatabaseRouter()
    for _ in range(200):
        for ask in (dbha.available_db, dbha.read_db, lambda: router.db_for_read(Item)):
            try:
                answer = ask()
            except dbha.NoHealthyDatabase:
                continue
            if answer not in config_aliases:
                return 2
    dbha.close()  # a child closes its own checker (a PanicException fails it)
    return 0


def fork_child(run: Run) -> None:
    # The configuration in force cannot change meanwhile: this thread alone
    # changes it.
    aliases = run.generations[-1].aliases
    pid = os.fork()
    if pid == 0:
        code = 3
        with contextlib.suppress(BaseException):
            code = child(aliases)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        run.errors.append(f"forked child exited with {code} (2: a wrong alias; <0: a signal)")
    run.forks += 1
    run.forks_under_load += not run.readers_done.is_set()


def states(rng: random.Random, timeline: list[int]) -> tuple[Any, ...]:
    """A scripted answer: a primary on a new timeline, a standby, or a failure."""
    kind = rng.choice(["primary", "standby", "standby", "refused", "timeout", "closed"])
    if kind == "primary":
        timeline[0] += 1
        return ("up", "primary", 0.0, timeline[0])
    if kind == "standby":
        return ("up", "standby", rng.choice([0.0, 0.5, 30.0]), None)
    return (kind,)


def chaos(run: Run, forks: int, seed: int) -> None:
    """Changes everything dbha depends on, until the readers are done."""
    rng = random.Random(seed)
    timeline = [1]
    override: override_settings | None = None
    forks_left = forks
    try:
        for step in range(10_000_000):
            if run.stop.is_set():
                break
            alias = rng.choice(list(SERVERS))
            _core.simulate(alias, *states(rng, timeline))
            run.actions["flip"] += 1
            roll = rng.random()
            if roll < 0.05:
                # Another configuration: the readers may see either.
                new = rng.choice(CONFIGURATIONS) if override is None else BASE
                run.generations.append(new)
                if override is None:
                    override = override_settings(DATABASES=new.databases, DBHA=new.dbha)
                    override.enable()
                else:
                    override.disable()
                    override = None
                run.actions["reconfigure"] += 1
            elif roll < 0.15:
                dbha.check_now()
                run.actions["check_now"] += 1
            elif roll < 0.25:
                watched = sorted(run.generations[-1].aliases)
                dbha.report_failure(rng.choice(watched))
                run.actions["report_failure"] += 1
            elif roll < 0.28:
                dbha.close()
                run.actions["close"] += 1
            elif roll < 0.33 and forks_left > 0:
                forks_left -= 1
                fork_child(run)
            if step % 64 == 0:
                run.actions["status"] += len(dbha.status())
    except BaseException as e:
        run.errors.append(f"chaos: {type(e).__qualname__}: {e}")
    finally:
        # Forks owed (the readers finished first) are done now, still
        # while the checker runs.
        while forks_left > 0 and not run.errors:
            forks_left -= 1
            fork_child(run)
        if override is not None:
            run.generations.append(BASE)
            override.disable()


def stress(calls: int, forks: int, seed: int) -> tuple[Run, float]:
    """One run; fails on a thread still running after TIME_LIMIT."""
    run = Run()
    readers = [
        threading.Thread(target=reader, args=(run, calls), name=f"reader-{i}", daemon=True)
        for i in range(THREADS)
    ]
    changer = threading.Thread(target=chaos, args=(run, forks, seed), name="chaos", daemon=True)
    started = time.monotonic()
    # Short interpreter slices: the chaos thread gets its turns among 8 busy
    # readers, and the calls interleave at many more points.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        for thread in [*readers, changer]:
            thread.start()
        _join(run, readers, changer, started)
    finally:
        sys.setswitchinterval(switch_interval)
    elapsed = time.monotonic() - started
    alive = [t.name for t in [*readers, changer] if t.is_alive()]
    if alive:
        faulthandler.dump_traceback(all_threads=True)
    assert alive == [], f"deadlocked after {elapsed:.0f} s: {alive} (tracebacks on stderr)"
    return run, elapsed


def _join(
    run: Run, readers: list[threading.Thread], changer: threading.Thread, started: float
) -> None:
    deadline = started + TIME_LIMIT
    for thread in readers:
        thread.join(timeout=max(deadline - time.monotonic(), 0))
    run.readers_done.set()
    run.stop.set()
    changer.join(timeout=max(deadline - time.monotonic(), 0) + 30)


@pytest.fixture
def scripted() -> Any:
    """Every alias answers from the script; the base settings in force.
    dbha's log records (thousands of state changes) are delivered but not
    kept: pytest's capture would grow the resident set the test measures."""
    logger = logging.getLogger("dbha")
    propagate, logger.propagate = logger.propagate, False
    for alias in SERVERS:
        _core.simulate(alias, "up", "primary" if alias == "default" else "standby", 0.0, 1)
    try:
        with override_settings(DATABASES=BASE.databases, DBHA=BASE.dbha):
            yield
    finally:
        dbha.close()
        _core.clear_simulation()
        logger.propagate = propagate


def test_threads_forks_and_reconfiguration_under_load(scripted: None) -> None:
    dbha.close()
    threads_before = settled_threads()
    # A warm-up run: code paths, allocator arenas and interned strings are
    # in place before the resident set is measured.
    warm, _ = stress(calls=max(CALLS // 20, 1000), forks=2, seed=1)
    assert warm.bad == [], warm.bad[:5]
    assert warm.errors == [], warm.errors[:5]
    dbha.close()
    assert settled_threads() == threads_before, thread_names()
    rss_before = proc_status("VmRSS")

    run, elapsed = stress(calls=CALLS, forks=FORKS, seed=2)

    dbha.close()
    rss_after = proc_status("VmRSS")
    threads_after = settled_threads()
    figures = (
        f"{run.calls:,} calls in {elapsed:.1f} s ({run.calls / elapsed:,.0f} calls/s, "
        f"{'debug' if 'debug' in _build() else 'release'} build), "
        f"NoHealthyDatabase {run.no_writer:,}, "
        f"answers {dict(run.answers)}, "
        f"chaos {dict(run.actions)}, forks {run.forks} ({run.forks_under_load} under load), "
        f"VmRSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB, "
        f"threads {threads_before} -> {threads_after}, wrong answers {run.bad[:3]}"
    )
    print(f"\ndbha stress: {figures}", file=sys.stderr)
    assert run.errors == [], run.errors[:5]
    assert run.bad == [], run.bad[:5]
    assert run.calls == THREADS * CALLS
    assert run.forks == FORKS
    # Everything that could race did: settings changed, rounds forced,
    # failures reported and the checker closed while the threads asked.
    for action in ("reconfigure", "check_now", "report_failure", "close"):
        assert run.actions[action] > 0, run.actions
    assert len(set(run.answers)) >= 3, run.answers
    assert (rss_after - rss_before) * 1024 < RSS_GROWTH_LIMIT, figures
    assert threads_after == threads_before, (figures, thread_names())


def _build() -> str:
    """How the extension was built, as far as its file tells: a debug build
    carries its DWARF sections (a release wheel is stripped)."""
    return "debug" if b".debug_info" in Path(_core.__file__).read_bytes() else "release"


# --- defects this workload found -----------------------------------------------------------------


def test_a_thread_never_keeps_a_runtime_that_a_reset_dropped(scripted: None) -> None:
    """`with_current()` in `src/binding/runtime.rs` reads `EPOCH` after
    `start()` has returned the runtime, and `start()` waits for the first
    probe round (detached) after letting go of the start lock. A reset by
    another thread during that wait (`override_settings`, `close()`) drops
    the runtime and bumps `EPOCH`; the starting thread then caches the
    dropped runtime under the new epoch and keeps answering from it, with
    its checker stopped, until the next reset. Here the first round waits
    for a server that accepts and never answers."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    slow = {
        "DATABASES": {"slow": {**pg_settings(silent.getsockname()[1])}},
        "DBHA": {"CONNECT_TIMEOUT": 1.0, "CHECK_INTERVAL": 5},
    }
    other = CONFIGURATIONS[3]
    answers: list[str] = []

    def ask_twice() -> None:
        answers.append(dbha.available_db())  # waits ~1 s for the silent server
        answers.append(dbha.available_db())

    try:
        with override_settings(**slow):
            dbha.close()
            asker = threading.Thread(target=ask_twice)
            asker.start()
            time.sleep(0.3)  # the asker is in its first round's wait
            with override_settings(DATABASES=other.databases, DBHA=other.dbha):
                asker.join(timeout=30)
                assert not asker.is_alive()
                assert answers[0] == "slow"  # the settings in force when it asked
                assert answers[1] in other.aliases, "an answer from dropped settings"
    finally:
        silent.close()


def test_a_child_forked_right_after_close_can_close_its_own_checker(scripted: None) -> None:
    """Found by the workload above: `Checker::stop(true)` joined the
    checker thread with `JoinHandle::join`, and std panics when
    `pthread_join` fails. In a child forked right after the parent's
    `close()`, while other threads restart dbha, `pthread_join` of the
    child's own `dbha-checker` thread sometimes failed with EINVAL, and
    `close()` in the child raised `pyo3_runtime.PanicException` (1 to 45 %
    of such children). The thread is detached now, and `stop` waits for its
    end signal; every child must close and exit 0."""
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            with contextlib.suppress(dbha.NoHealthyDatabase):
                for _ in range(256):
                    dbha.available_db()
                    dbha.read_db()
            time.sleep(0)

    askers = [threading.Thread(target=ask, daemon=True) for _ in range(THREADS)]
    for thread in askers:
        thread.start()
    codes: list[int] = []
    try:
        for i in range(40):
            if i % 2:
                dbha.close()
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)  # a hung child dies rather than hangs the test
                code = 3
                try:
                    dbha.available_db()
                    dbha.close()
                    code = 0
                except BaseException as e:
                    code = 4 if type(e).__name__ == "PanicException" else 3
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
    finally:
        stop.set()
        for thread in askers:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in askers)
    assert len(codes) == 40
    assert set(codes) == {0}, f"children hung (<0), failed (3) or panicked in close() (4): {codes}"

"""The example project (examples/httpapp) served by gunicorn or uvicorn
against a `localdb.PgCluster`, a bounded HTTP load generator on loopback
that records every request, and a poller of each worker's health view.
Shared by benches/http_failover.py, benches/soak.py and
tests/test_http_failover.py; stdlib only (the servers run in their own
processes)."""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from localdb import PgCluster, free_port

log = logging.getLogger("localhttp")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SETTINGS = "httpapp.settings"
#: The view each server's load requests: a write and its read-back.
PATHS = {"gunicorn": "/order", "uvicorn": "/order-async"}
#: gunicorn: 4 sync workers forked from a master that has loaded the app
#: and started dbha (--preload). uvicorn: 2 worker processes (spawned, not
#: forked), one per CPU: each runs the async view's ORM calls in threads of
#: its own, so 2 are enough to keep 2 CPUs busy, and the per-worker check
#: still sees two independent checkers.
WORKERS = {"gunicorn": 4, "uvicorn": 2}
HEALTH = "/dbha/"
_STOP_TIMEOUT = 10.0


class LocalHttpError(RuntimeError):
    """The app server did not start, answer or stop as asked, in time."""


def environment(
    cluster: PgCluster, reads: str = "replicas", dbha: dict[str, Any] | None = None
) -> dict[str, str]:
    """The environment the example project reads its settings from (`dbha`:
    DBHA keys besides the defaults)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), *filter(None, [env.get("PYTHONPATH", "")])])
    env["DJANGO_SETTINGS_MODULE"] = SETTINGS
    env["HTTPAPP_DB_HOST"] = cluster.primary.host
    env["HTTPAPP_DB_PORTS"] = ",".join(str(s.port) for s in cluster.servers)
    env["HTTPAPP_READS"] = reads
    env["HTTPAPP_DBHA"] = json.dumps(dbha or {})
    return env


def migrate(cluster: PgCluster) -> None:
    """Creates the project's table on the primary (`manage.py migrate`) and
    waits until the standbys have it."""
    cmd = [sys.executable, "-m", "django", "migrate", "--noinput", "-v", "0"]
    res = subprocess.run(
        cmd, env=environment(cluster), capture_output=True, text=True, timeout=120, check=False
    )
    if res.returncode != 0:
        raise LocalHttpError(f"migrate failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    cluster.wait_replayed()


def children(pid: int) -> list[int]:
    """The direct children of `pid`."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += map(int, (task / "children").read_text().split())
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class AppServer:
    """gunicorn (`--preload`, sync workers) or uvicorn (`--workers`) serving
    the example project on a free loopback port, in a process group of its
    own; `stop()` ends every process of it, also when it hangs."""

    def __init__(
        self,
        kind: str,
        cluster: PgCluster,
        log_file: Path,
        workers: int | None = None,
        reads: str = "replicas",
        dbha: dict[str, Any] | None = None,
    ) -> None:
        if kind not in PATHS:
            raise ValueError(f"unknown server {kind!r}; known: {', '.join(PATHS)}")
        self.kind = kind
        self.workers = workers or WORKERS[kind]
        self.port = free_port()
        self.path = PATHS[kind]
        self.log_file = log_file
        self._env = environment(cluster, reads, dbha)
        self._proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        bind = f"127.0.0.1:{self.port}"
        if self.kind == "gunicorn":
            return [
                *(sys.executable, "-m", "gunicorn", "httpapp.wsgi:application"),
                *("--preload", "--worker-class", "sync", "--workers", str(self.workers)),
                *("--bind", bind, "--graceful-timeout", "5", "--log-level", "warning"),
            ]
        return [
            *(sys.executable, "-m", "uvicorn", "httpapp.asgi:application"),
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)),
            *("--lifespan", "off", "--no-access-log", "--log-level", "warning"),
            *("--timeout-graceful-shutdown", "5"),
        ]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: gunicorn's or uvicorn's
        children (uvicorn's multiprocessing helpers left out)."""
        if self.pid is None:
            return []
        return sorted(p for p in children(self.pid) if "resource_tracker" not in cmdline(p))

    def start(self, timeout: float = 60.0) -> AppServer:
        """Starts the server and returns once each of its workers has
        answered the health view."""
        with self.log_file.open("ab") as out:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=EXAMPLES,
                start_new_session=True,  # stop() signals the whole group
            )
        _running.add(self)
        try:
            self.wait_workers(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_workers(self, timeout: float) -> dict[int, HealthAnswer]:
        """Polls the health view until every worker has answered with a
        writer; returns each one's answer."""
        deadline = time.monotonic() + timeout
        seen: dict[int, HealthAnswer] = {}
        while True:
            if self.pid is None:
                raise LocalHttpError(f"{self.kind} exited:\n{self.log_tail()}")
            pids = self.worker_pids()
            answer = health(self.port, timeout=2.0)
            if answer is not None and answer.writer:
                seen[answer.pid] = answer
            if len(pids) == self.workers and set(pids) <= set(seen):
                return {pid: seen[pid] for pid in pids}
            if time.monotonic() > deadline:
                raise LocalHttpError(
                    f"{self.kind}: workers {pids}, answered {sorted(seen)} after {timeout:g} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL to the whole process
        group after 10 s. Idempotent; never raises."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log.warning("%s ignored SIGTERM for %g s, killing it", self.kind, _STOP_TIMEOUT)
            # Workers that outlived their master (or a master that hangs).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        finally:
            self._proc = None
            _running.discard(self)

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_running: set[AppServer] = set()


def stop_all() -> None:
    """Stops every server still running (the atexit and signal path)."""
    for server in list(_running):
        server.stop()


# atexit runs handlers newest first: servers stop before the databases
# that localdb (imported earlier) stops.
atexit.register(stop_all)


def terminate_on_sigterm() -> None:
    """SIGTERM ends the caller like Ctrl-C does: through its `finally`
    blocks and atexit handlers, so every server it started stops."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# --- requests ----------------------------------------------------------------------------------


def get(port: int, path: str, timeout: float, cookie: str = "") -> tuple[int, dict[str, Any], str]:
    """One GET on a connection of its own: (status, JSON body, the dbha_pin
    cookie set). Status 0 and {"error": ...}: no HTTP answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Cookie": f"dbha_pin={cookie}"} if cookie else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        set_cookie = ""
        for header in response.headers.get_all("Set-Cookie") or []:
            parsed: SimpleCookie = SimpleCookie(header)
            if "dbha_pin" in parsed:
                set_cookie = parsed["dbha_pin"].value
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"error": f"not JSON: {raw[:80]!r}"}
        return response.status, body if isinstance(body, dict) else {}, set_cookie
    except (OSError, http.client.HTTPException) as e:
        return 0, {"error": type(e).__name__}, ""
    finally:
        conn.close()


@dataclass
class Request:
    """One request of the load, times in `time.monotonic()`."""

    started: float  # before the connect
    ended: float
    status: int  # 0: no HTTP answer (refused, reset, timed out)
    pid: int | None  # the worker that answered
    db: str  # where the write went ("" when it failed)
    read_db: str  # where its read-back went
    found: bool  # the read-back found the row
    error: str
    note: str

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """`clients` threads, each a client with its own pinning cookie, each
    sending a request (on a new connection) every `clients / rate` seconds,
    or at once after a slower one: a bounded open loop. Stops after
    `max_requests` in all, or when `running()` ends."""

    port: int
    path: str
    clients: int = 4
    rate: float = 40.0
    timeout: float = 20.0
    max_requests: int = 1_000_000
    requests: list[Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, n: int) -> None:
        stop = self._stop
        period = self.clients / self.rate
        # Spread the clients over one period: no lockstep.
        next_at = time.monotonic() + period * n / self.clients
        cookie = ""
        i = 0
        while not stop.is_set():
            if stop.wait(max(0.0, next_at - time.monotonic())):
                return
            next_at = max(next_at + period, time.monotonic())
            i += 1
            note = f"{n}-{i}"
            started = time.monotonic()
            path = f"{self.path}?note={note}"
            status, body, set_cookie = get(self.port, path, self.timeout, cookie)
            ended = time.monotonic()
            cookie = set_cookie or cookie
            pid = body.get("pid")
            request = Request(
                started=started,
                ended=ended,
                status=status,
                pid=pid if isinstance(pid, int) else None,
                db=str(body.get("db", "")) if status == 200 else "",
                read_db=str(body.get("read_db", "")) if status == 200 else "",
                found=body.get("found") is True,
                error="" if status == 200 else str(body.get("error", f"HTTP {status}")),
                note=note,
            )
            with self._lock:
                if len(self.requests) >= self.max_requests:
                    return
                self.requests.append(request)

    def halt(self) -> None:
        """No new request from now on (those in flight go on)."""
        self._stop.set()

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        self._stop.clear()
        threads = [
            threading.Thread(target=self._client, args=(n,), name=f"load-{n}", daemon=True)
            for n in range(self.clients)
        ]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in threads:
                # A request in flight ends within its timeout.
                thread.join(self.timeout + 5)

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)


# --- each worker's view of dbha ----------------------------------------------------------------


@dataclass
class HealthAnswer:
    """One worker's health view, as answered at `at` (`time.monotonic()`)."""

    at: float
    pid: int
    writer: str | None
    route: str
    #: Seconds from this worker's newest probe to its answer: its checker
    #: runs (in a healthy group, one probe round per CHECK_INTERVAL).
    probe_age: float


def parse_health(body: dict[str, Any], at: float) -> HealthAnswer | None:
    """The group `default` in a health view's details (None without them)."""
    try:
        process = body["process"]
        group = body["groups"]["default"]
        answered = datetime.fromisoformat(process["time"])
        checked = [
            datetime.fromisoformat(node["checked_at"])
            for node in group["nodes"]
            if node["checked_at"]
        ]
        return HealthAnswer(
            at=at,
            pid=int(process["pid"]),
            writer=group["writer"],
            route=group["route"],
            probe_age=(answered - max(checked)).total_seconds() if checked else float("inf"),
        )
    except (KeyError, TypeError, ValueError):
        return None


def health(port: int, timeout: float) -> HealthAnswer | None:
    """One worker's answer (whichever the kernel hands the connection to),
    or None if none came."""
    status, body, _ = get(port, HEALTH, timeout)
    return parse_health(body, time.monotonic()) if status in (200, 503) else None


@dataclass
class HealthPoller:
    """Polls the health view every `interval` seconds, each on a new
    connection so that every free worker gets its turn; keeps each answer."""

    port: int
    interval: float = 0.05
    answers: list[HealthAnswer] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _poll(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            answer = health(self.port, timeout=5.0)
            if answer is not None:
                with self._lock:
                    self.answers.append(answer)

    @contextlib.contextmanager
    def running(self) -> Iterator[HealthPoller]:
        stop = threading.Event()
        thread = threading.Thread(target=self._poll, args=(stop,), name="health", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(10)

    def snapshot(self) -> list[HealthAnswer]:
        with self._lock:
            return list(self.answers)

    def wait(self, pids: list[int], writer: str, since: float, timeout: float) -> bool:
        """Waits until each of `pids` has answered `writer` after `since`."""
        deadline = time.monotonic() + timeout
        while True:
            seen = {a.pid for a in self.snapshot() if a.at >= since and a.writer == writer}
            if set(pids) <= seen:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

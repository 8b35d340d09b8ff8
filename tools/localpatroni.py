"""Start and control a real Patroni cluster on loopback: one etcd member, N
Patroni nodes each managing its own PostgreSQL, and HAProxy in front.

Used by the Patroni tests and benchmarks; stdlib only, drives Debian's
patroni (3.0.2), etcd (3.4, v3 API) and haproxy. Built on localdb: every
process and temp dir is cleaned up at exit and on SIGTERM/SIGHUP.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from localdb import (
    LOOPBACK,
    LocalDbError,
    _binary,
    _descendants,
    _mkdir,
    _register,
    _Server,
    _server_user,
    _unregister,
    cleanup_on_signals,
    free_port,
    pg_bindir,
)

log = logging.getLogger("localpatroni")

PATRONI = Path("/usr/bin/patroni")  # Debian's; its shebang pins the system python3

SUPERUSER = "postgres"
#: The password tests/conftest.py gives Django for PostgreSQL.
SUPERUSER_PASSWORD = "s3cret-password"
REPLICATION_USER = "replicator"
REPLICATION_PASSWORD = "replicator-password"
REWIND_USER = "rewinder"
REWIND_PASSWORD = "rewinder-password"

# The fastest timing Patroni 3.0.2 runs with. Its validator sets no minimum
# (later releases demand ttl >= 20, retry_timeout >= 3), but one etcd request
# gets at least 1 s (2 tries within retry_timeout with a single etcd), and
# Patroni's rule is loop_wait + 2 * retry_timeout <= ttl.
TTL = 5
LOOP_WAIT = 1
RETRY_TIMEOUT = 2

_POLL_INTERVAL = 0.1
_REST_TIMEOUT = 2.0
_REAP_TIMEOUT = 5.0

_PG_HBA = [
    "local all all trust",
    f"host all all {LOOPBACK}/32 md5",
    f"host replication {REPLICATION_USER} {LOOPBACK}/32 md5",
]

# Shared by every node through the DCS. Throwaway clusters: durability buys nothing.
_PG_PARAMETERS: dict[str, Any] = {
    "wal_level": "replica",
    "hot_standby": "on",
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "wal_keep_size": "64MB",
    # pg_rewind needs it: an old leader can rejoin as a replica.
    "wal_log_hints": "on",
    "wal_retrieve_retry_interval": "500ms",
    "fsync": "off",
    "shared_buffers": "16MB",
    "max_connections": 100,
    "huge_pages": "off",
    "logging_collector": "off",
    "log_line_prefix": "%m [%p] %q%a ",
}


class PatroniError(LocalDbError):
    """The Patroni cluster, etcd or HAProxy did not do what was asked, in time."""


class TlsFiles(Protocol):
    """A server certificate, its key and the CA that signed it (tests/certs.py's
    Certificates fits)."""

    @property
    def ca(self) -> Path: ...

    @property
    def cert(self) -> Path: ...

    @property
    def key(self) -> Path: ...


@dataclass(frozen=True)
class Response:
    """One REST answer: the HTTP status and the body (parsed JSON, else the text)."""

    status: int
    body: Any


# --- helpers -----------------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The process's state letter (R, S, Z...), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it; wait (bounded) until they are gone."""
    # Listed first: the dead hand their children to init at once.
    pids = [pid, *_descendants(pid)]
    for target in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    for target in _descendants(pid):  # forked meanwhile
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    # Not our children: init reaps them, or they stay zombies, which count as gone.
    deadline = time.monotonic() + _REAP_TIMEOUT
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            log.error("pid %d survived SIGKILL for %gs", pid, _REAP_TIMEOUT)
            return
        time.sleep(0.02)


def processes_in(directory: Path) -> list[int]:
    """Live processes whose command line names `directory` (or a path below)
    or whose working directory lies there: what a cluster there runs."""
    needle = str(directory).rstrip("/") + "/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd") + "/"
        except OSError:
            cwd = ""
        if (cwd.startswith(needle) or needle in _cmdline(int(entry.name))) and _alive(
            int(entry.name)
        ):
            found.append(int(entry.name))
    return found


def _sweep(directory: Path) -> None:
    """Kill whatever still runs from `directory`: a postmaster a dying Patroni
    was starting, PostgreSQL children orphaned by their postmaster's death."""
    for _ in range(10):
        pids = processes_in(directory)
        if not pids:
            return
        log.warning("killing leftovers of %s: %s", directory, pids)
        for pid in pids:
            _kill_tree(pid)
    log.error("processes still running from %s: %s", directory, processes_in(directory))


_T = TypeVar("_T")


def _wait(check: Callable[[], _T | None], timeout: float, what: str, why: Callable[[], str]) -> _T:
    """Poll `check` until it returns something; raise naming `what`, with `why()`, on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise PatroniError(f"no {what} after {timeout:g}s\n{why()}")
        time.sleep(_POLL_INTERVAL)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


# --- etcd --------------------------------------------------------------------------------------


class EtcdServer(_Server):
    """One etcd member on 127.0.0.1 (free client and peer ports), data in a temp dir."""

    def __init__(self, base_dir: Path | None = None, port: int | None = None) -> None:
        self._owns_dir = base_dir is None
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="localpatroni-etcd-"))
        self.base_dir = base_dir
        self.data_dir = base_dir / "etcd-data"
        self.peer_port = 0
        super().__init__("etcd", port, base_dir / "etcd.log", owner=None)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        cleanup_on_signals()
        _register(self, self.cleanup)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30) -> None:
        """Start etcd (again, on the same ports and data) and wait until it is healthy."""
        if self.running:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._launch(timeout)

    def restart(self, timeout: float = 30) -> None:
        self.stop()
        self.start(timeout)

    def _command(self) -> list[str]:
        if self._auto_port or not self.peer_port:
            self.peer_port = free_port()  # a fresh one along with the client port after a clash
        peer = f"http://{LOOPBACK}:{self.peer_port}"
        return [
            _binary("etcd", "/usr/bin"),
            "--name=etcd",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=etcd={peer}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-outputs=stderr",
        ]

    def _ready(self, timeout: float) -> bool:
        try:
            with self._opener.open(f"{self.url}/health", timeout=timeout) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def cleanup(self) -> None:
        """Kill etcd and remove its temp dir (if we made it)."""
        self.kill()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        _unregister(self, self.cleanup)


# --- Patroni -----------------------------------------------------------------------------------


class PatroniNode(_Server):
    """One Patroni process (as the `postgres` user) and the PostgreSQL it runs.

    Patroni starts the postmaster in a process of its own session that is no
    child of Patroni's, so it is found through its postmaster.pid.
    """

    def __init__(self, cluster: PatroniCluster, name: str) -> None:
        self.cluster = cluster
        self.dir = cluster.base_dir / name
        self.data_dir = self.dir / "data"
        self.config_file = self.dir / "patroni.yml"
        self.pg_port = free_port()
        super().__init__(name, None, cluster.base_dir / f"{name}.log", cluster._owner)

    @property
    def rest_port(self) -> int:
        return self.port

    @property
    def rest_url(self) -> str:
        return f"{self.cluster.rest_scheme}://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30) -> None:
        """Start Patroni (which starts, bootstraps or clones PostgreSQL on its
        own) and wait until its REST API answers."""
        if self.running:
            return
        _mkdir(self.dir, self._owner, 0o700)
        self._launch(timeout)

    def _command(self) -> list[str]:
        # JSON is YAML: no YAML library needed.
        self.config_file.write_text(json.dumps(self.cluster._patroni_config(self), indent=2))
        if self._owner is not None:
            os.chown(self.config_file, self._owner.pw_uid, self._owner.pw_gid)
        self.config_file.chmod(0o600)  # it holds passwords
        return [str(PATRONI), str(self.config_file)]

    def _ready(self, timeout: float) -> bool:
        try:
            self.request("GET", "/liveness", timeout=timeout)
        except PatroniError:
            return False
        return True

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = _REST_TIMEOUT
    ) -> Response:
        """One call to this node's REST API; PatroniError if it does not answer."""
        return self.cluster._request(f"{self.rest_url}{path}", method, body, timeout)

    def get(self, path: str, timeout: float = _REST_TIMEOUT) -> Response:
        return self.request("GET", path, timeout=timeout)

    def status(self) -> dict[str, Any] | None:
        """GET /patroni's body, or None while the REST API does not answer."""
        try:
            body = self.get("/patroni").body
        except PatroniError:
            return None
        return body if isinstance(body, dict) else None

    def postgres_pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        # A stale file names a dead (or reused) pid.
        return pid if _alive(pid) and f"{self.data_dir} " in _cmdline(pid) + " " else None

    def postgres_pids(self) -> list[int]:
        """The postmaster and every process below it."""
        pid = self.postgres_pid()
        return [] if pid is None else [pid, *_descendants(pid)]

    def kill_postgres(self) -> None:
        """SIGKILL the postmaster and its children (they setsid(): their group is no help)."""
        if (pid := self.postgres_pid()) is not None:
            _kill_tree(pid)

    def kill_patroni(self) -> None:
        """SIGKILL Patroni alone: PostgreSQL keeps running unmanaged."""
        super().kill()

    def kill(self) -> None:
        """SIGKILL Patroni, then PostgreSQL (first, Patroni would restart it): a host crash."""
        self.kill_patroni()
        self.kill_postgres()

    def stop(self) -> None:
        """Stop Patroni cleanly (it stops PostgreSQL, a leader hands over), kill
        what remains after 10 s. A paused Patroni leaves PostgreSQL running:
        it is killed. Idempotent."""
        super().stop()
        self.kill_postgres()


class PatroniCluster:
    """N Patroni nodes (`node1`..) on one etcd, all on loopback, in one temp dir.

    `start()` returns once `node1` leads and every other node streams from
    it. `dcs` goes over the bootstrap DCS settings (e.g. `{"failsafe_mode":
    True}`), `rest_auth` (user, password) protects the REST API's unsafe
    methods, `rest_tls` serves it over HTTPS.
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        ttl: int = TTL,
        loop_wait: int = LOOP_WAIT,
        retry_timeout: int = RETRY_TIMEOUT,
        dcs: Mapping[str, Any] | None = None,
        rest_auth: tuple[str, str] | None = None,
        rest_tls: TlsFiles | None = None,
        scope: str = "dbha",
        base_dir: Path | None = None,
    ) -> None:
        self._owns_dir = base_dir is None
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="localpatroni-"))
            base_dir.chmod(0o755)  # the postgres user must traverse it when we are root
        self.base_dir = base_dir
        self.scope = scope
        self.dcs: dict[str, Any] = _merged(
            {
                "ttl": ttl,
                "loop_wait": loop_wait,
                "retry_timeout": retry_timeout,
                "maximum_lag_on_failover": 1024 * 1024,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": _PG_PARAMETERS,
                },
            },
            dcs or {},
        )
        self.rest_auth = rest_auth
        self.rest_scheme = "https" if rest_tls else "http"
        self._owner = _server_user("postgres")
        cleanup_on_signals()
        _register(self, self.stop)
        self.etcd = EtcdServer(base_dir)
        self.nodes = [PatroniNode(self, f"node{i}") for i in range(1, nodes + 1)]
        self._by_name = {node.name: node for node in self.nodes}
        self._tls = self._install_tls(rest_tls) if rest_tls else None
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self._tls:
            context = ssl.create_default_context(cafile=str(self._tls["cafile"]))
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._proxies: list[HAProxy] = []
        self._started = False
        self.startup_seconds: float | None = None

    def __enter__(self) -> PatroniCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PatroniCluster {self.scope} {self.base_dir} nodes={len(self.nodes)}>"

    def _install_tls(self, files: TlsFiles) -> dict[str, Path]:
        """Copies of the files the postgres user can read."""
        directory = self.base_dir / "tls"
        _mkdir(directory, self._owner, 0o700)
        out = {}
        for key, source in (("certfile", files.cert), ("keyfile", files.key), ("cafile", files.ca)):
            target = directory / Path(source).name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            if self._owner is not None:
                os.chown(target, self._owner.pw_uid, self._owner.pw_gid)
            out[key] = target
        return out

    def _patroni_config(self, node: PatroniNode) -> dict[str, Any]:
        restapi: dict[str, Any] = {
            "listen": f"{LOOPBACK}:{node.rest_port}",
            "connect_address": f"{LOOPBACK}:{node.rest_port}",
        }
        if self._tls:
            # Patroni also presents certfile as its client certificate when it
            # calls the other nodes, and checks their certificates with cafile.
            restapi.update({k: str(v) for k, v in self._tls.items()})
        if self.rest_auth:
            user, password = self.rest_auth
            restapi["authentication"] = {"username": user, "password": password}
        pg_address = f"{LOOPBACK}:{node.pg_port}"
        return {
            "scope": self.scope,
            "name": node.name,
            "restapi": restapi,
            "etcd3": {"hosts": [f"{LOOPBACK}:{self.etcd.port}"]},
            "bootstrap": {
                "dcs": self.dcs,
                # no-sync: throwaway data, as with fsync off (Patroni forbids
                # only the spelling "nosync").
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
            },
            "postgresql": {
                "listen": pg_address,
                "connect_address": pg_address,
                "data_dir": str(node.data_dir),
                "bin_dir": str(pg_bindir()),
                "pgpass": str(node.dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": SUPERUSER_PASSWORD},
                    "replication": {
                        "username": REPLICATION_USER,
                        "password": REPLICATION_PASSWORD,
                    },
                    "rewind": {"username": REWIND_USER, "password": REWIND_PASSWORD},
                },
                "parameters": {"unix_socket_directories": str(node.dir)},
                "pg_hba": _PG_HBA,
                "basebackup": [{"checkpoint": "fast"}, "no-sync"],
            },
        }

    def _request(self, url: str, method: str, body: Any, timeout: float) -> Response:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.rest_auth:
            token = base64.b64encode(":".join(self.rest_auth).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            with exc:
                status, raw = exc.code, exc.read()
        except (OSError, http.client.HTTPException) as exc:
            raise PatroniError(f"{method} {url}: {exc}") from exc
        text = raw.decode(errors="replace")
        try:
            return Response(status, json.loads(text))
        except ValueError:
            return Response(status, text)

    # --- lifecycle ---

    def start(self, timeout: float = 120) -> PatroniCluster:
        """Start etcd, then node1 (which bootstraps and leads), then the others;
        return once they all stream from node1."""
        if self._started:
            return self
        self._started = True
        began = time.monotonic()
        try:
            self.etcd.start()
            first, *others = self.nodes
            first.start()
            self.wait_for_leader(timeout=timeout)
            if others:
                with ThreadPoolExecutor(len(others)) as pool:
                    list(pool.map(lambda node: node.start(), others))
            self.wait_healthy(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        self._cleanup_first()
        self.startup_seconds = time.monotonic() - began
        log.debug("%r up in %.2fs", self, self.startup_seconds)
        return self

    def _cleanup_first(self) -> None:
        # At exit the newest cleanup runs first: ours kills everything at once,
        # rather than each node stopping cleanly one after the other.
        _unregister(self, self.stop)
        _register(self, self.stop)

    def stop(self) -> None:
        """Kill everything (Patroni, PostgreSQL and its children, etcd,
        HAProxy) and remove the temp dir if we made it. Never raises."""
        steps: list[Callable[[], None]] = [p.kill for p in self._proxies]
        steps += [n.kill_patroni for n in self.nodes]
        steps += [n.kill_postgres for n in self.nodes]
        steps += [self.etcd.kill, lambda: _sweep(self.base_dir)]
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("stopping %r: %s failed", self, step)
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        _unregister(self, self.stop)

    # --- inspection ---

    def node(self, name: str) -> PatroniNode:
        try:
            return self._by_name[name]
        except KeyError:
            raise PatroniError(f"no node {name!r} in {sorted(self._by_name)}") from None

    def leaders(self) -> list[str]:
        """The nodes whose GET /leader answers 200 (normally one)."""
        found = []
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(PatroniError):
                if node.get("/leader").status == 200:
                    found.append(node.name)
        return found

    def leader(self) -> str | None:
        """The node whose GET /leader answers 200, None unless exactly one does."""
        found = self.leaders()
        return found[0] if len(found) == 1 else None

    def members(self) -> list[dict[str, Any]]:
        """The DCS's view (GET /cluster's members) from the first node that answers."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(PatroniError):
                resp = node.get("/cluster")
                if resp.status == 200 and isinstance(resp.body, dict):
                    return list(resp.body.get("members", []))
        raise PatroniError(f"no node answers GET /cluster\n{self.describe()}")

    def describe(self) -> str:
        """Every node's state and log tail: for error messages."""
        parts = []
        for node in self.nodes:
            status = node.status() if node.running else None
            brief = {k: status.get(k) for k in ("role", "state", "timeline")} if status else None
            parts.append(
                f"--- {node.name} (patroni {'running' if node.running else 'down'}, "
                f"postgres pid {node.postgres_pid()}): {brief}\n{node.log_tail(15)}"
            )
        return "\n".join(parts)

    # --- waits ---

    def wait_for_leader(self, not_name: str | None = None, timeout: float = 30) -> str:
        """Wait until exactly one node, other than `not_name`, answers 200 to GET /leader."""

        def check() -> str | None:
            name = self.leader()
            return name if name is not None and name != not_name else None

        what = "leader" + (f" but {not_name}" if not_name else "")
        return _wait(check, timeout, what, self.describe)

    def wait_healthy(self, timeout: float = 60) -> str:
        """Wait until one node leads and every other node whose Patroni runs is
        a replica streaming from it (GET /replica 200); return the leader."""

        def check() -> str | None:
            name = self.leader()
            if name is None:
                return None
            status = self.node(name).status() or {}
            streaming = {
                row.get("application_name")
                for row in status.get("replication", [])
                if row.get("state") == "streaming"
            }
            for node in self.nodes:
                if node.name == name or not node.running:
                    continue
                if node.name not in streaming:
                    return None
                with contextlib.suppress(PatroniError):
                    if node.get("/replica").status == 200:
                        continue
                return None
            return name

        return _wait(check, timeout, "leader with every node streaming", self.describe)

    def wait_member_state(
        self,
        name: str,
        *,
        state: str | None = "running",
        role: str | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        """Wait until `name`'s GET /patroni reports `state` and `role` (e.g.
        "master"/"replica"; None: any); return that body."""
        node = self.node(name)

        def check() -> dict[str, Any] | None:
            status = node.status()
            if status is None:
                return None
            if state is not None and status.get("state") != state:
                return None
            if role is not None and status.get("role") != role:
                return None
            return status

        return _wait(check, timeout, f"{name} with state={state} role={role}", self.describe)

    # --- faults and operations ---

    def kill_postgres(self, name: str) -> None:
        """SIGKILL `name`'s postmaster and its children; its Patroni restarts it."""
        self.node(name).kill_postgres()

    def kill_patroni(self, name: str) -> None:
        """SIGKILL `name`'s Patroni; PostgreSQL runs on, unmanaged."""
        self.node(name).kill_patroni()

    def kill_node(self, name: str) -> None:
        """SIGKILL Patroni and PostgreSQL of `name`: what makes a leader fail over."""
        self.node(name).kill()

    def stop_node(self, name: str) -> None:
        """Stop `name` cleanly (a leader hands its lock over)."""
        self.node(name).stop()

    def start_node(self, name: str, timeout: float = 30) -> None:
        """Start `name` again; it rejoins (pg_rewind if need be) on its own.
        Returns once its REST API answers: see `wait_healthy`."""
        self.node(name).start(timeout)
        self._cleanup_first()

    def switchover(self, to: str | None = None, timeout: float = 60) -> str:
        """POST /switchover from the current leader (to `to`, else a healthy
        replica Patroni picks); return the new leader once it answers /leader."""
        leader = self.leader()
        if leader is None:
            raise PatroniError(f"switchover: no single leader\n{self.describe()}")
        body = {"leader": leader, **({"candidate": to} if to else {})}
        resp = self.node(leader).request("POST", "/switchover", body, timeout=timeout)
        if resp.status != 200:
            raise PatroniError(f"switchover {body}: {resp.status} {resp.body}")
        new = self.wait_for_leader(not_name=leader, timeout=timeout)
        if to is not None and new != to:
            raise PatroniError(f"switchover to {to}: {new} leads instead")
        return new

    def patch_config(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """PATCH /config (the DCS settings; None deletes a key); return the new config."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                resp = node.request("PATCH", "/config", dict(changes))
            except PatroniError:
                continue
            if resp.status != 200:
                raise PatroniError(f"PATCH /config {changes}: {resp.status} {resp.body}")
            return dict(resp.body)
        raise PatroniError(f"no node answers PATCH /config\n{self.describe()}")

    def pause(self, timeout: float = 30) -> None:
        """Maintenance mode (Patroni 3.0.2 has no /pause endpoint: PATCH /config
        {"pause": true}); returns once every running node reports it."""
        self.patch_config({"pause": True})
        self._wait_paused(True, timeout)

    def resume(self, timeout: float = 30) -> None:
        self.patch_config({"pause": False})
        self._wait_paused(False, timeout)

    def _wait_paused(self, paused: bool, timeout: float) -> None:
        def check() -> bool | None:
            for node in self.nodes:
                status = node.status() if node.running else {"pause": paused}
                if status is None or bool(status.get("pause")) != paused:
                    return None
            return True

        _wait(check, timeout, f"pause={paused} on every node", self.describe)

    def stop_etcd(self) -> None:
        """Stop the DCS (SIGTERM; its data stays)."""
        self.etcd.stop()

    def start_etcd(self, timeout: float = 30) -> None:
        self.etcd.start(timeout)

    # --- clients ---

    def dsn(self, name: str, dbname: str = "postgres") -> str:
        """A libpq connection string to `name`'s PostgreSQL as the superuser."""
        port = self.node(name).pg_port
        return (
            f"host={LOOPBACK} port={port} dbname={dbname} user={SUPERUSER} "
            f"password={SUPERUSER_PASSWORD} connect_timeout=5"
        )


# --- HAProxy -----------------------------------------------------------------------------------

#: Health checks: every 250 ms (100 ms while a state change is being confirmed),
#: DOWN after 2 failures, UP after 1 success, each check given 1 s.
HAPROXY_CHECK = "inter 250ms fastinter 100ms downinter 250ms fall 2 rise 1"
_HAPROXY_CHECK_TIMEOUT = "1s"


class HAProxy(_Server):
    """HAProxy on loopback in front of a Patroni cluster: `port` reaches the
    node whose GET /leader answers 200, `replica_port` those whose GET
    /replica does (round robin). Logs (health changes too) go to its log file."""

    def __init__(
        self, cluster: PatroniCluster, port: int | None = None, replica_port: int | None = None
    ) -> None:
        self.cluster = cluster
        self.dir = cluster.base_dir / "haproxy"
        self.config_file = self.dir / "haproxy.cfg"
        self.stats_socket = self.dir / "stats.sock"
        self.replica_port = replica_port or free_port()
        super().__init__("haproxy", port, self.dir / "haproxy.log", owner=None)
        cluster._proxies.append(self)  # the cluster's stop() stops us too

    def __enter__(self) -> HAProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def start(self, timeout: float = 15) -> None:
        """Start HAProxy and wait until it serves its stats socket."""
        if self.running:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._launch(timeout)

    def _config(self) -> str:
        check = f"check port {{rest}} {HAPROXY_CHECK}"
        if self.cluster._tls:
            check += f" check-ssl verify required ca-file {self.cluster._tls['cafile']}"
        lines = [
            "global",
            "    log stdout format raw local0 info",
            "    maxconn 500",
            f"    stats socket {self.stats_socket} mode 600 level admin",
            "defaults",
            "    log global",
            "    mode tcp",
            "    option tcplog",
            "    option log-health-checks",
            "    timeout connect 1s",
            "    timeout client 1h",
            "    timeout server 1h",
            f"    timeout check {_HAPROXY_CHECK_TIMEOUT}",
            "    http-check expect status 200",
            # Sessions to a node that lost its role are cut, not left to hang.
            "    default-server on-marked-down shutdown-sessions",
        ]
        for listen, port, path in (
            ("primary", self.port, "/leader"),
            ("replicas", self.replica_port, "/replica"),
        ):
            lines += [f"listen {listen}", f"    bind {LOOPBACK}:{port}"]
            lines += [f"    option httpchk GET {path}", "    balance roundrobin"]
            lines += [
                f"    server {n.name} {LOOPBACK}:{n.pg_port} " + check.format(rest=n.rest_port)
                for n in self.cluster.nodes
            ]
        return "\n".join(lines) + "\n"

    def _command(self) -> list[str]:
        if self._auto_port:
            self.replica_port = free_port()  # the first one may be what clashed
        self.config_file.write_text(self._config())
        return [_binary("haproxy", "/usr/sbin"), "-db", "-f", str(self.config_file)]

    def _ready(self, timeout: float) -> bool:
        try:
            return "Name: HAProxy" in self._stats_command("show info", timeout)
        except OSError:
            return False

    def _stats_command(self, command: str, timeout: float = 2.0) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.stats_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def servers(self, listen: str = "primary") -> dict[str, str]:
        """Each node's check status in `listen` ("primary" or "replicas"): UP, DOWN..."""
        rows = self._stats_command("show stat").splitlines()
        header = rows[0].lstrip("# ").split(",")
        out = {}
        for row in rows[1:]:
            fields = dict(zip(header, row.split(","), strict=False))
            if fields.get("pxname") == listen and fields.get("svname") in self.cluster._by_name:
                out[fields["svname"]] = fields.get("status", "")
        return out

    def wait_routes_to(self, name: str, timeout: float = 15) -> None:
        """Wait until `name` is the one server UP behind the primary port."""

        def check() -> bool | None:
            up = [n for n, status in self.servers().items() if status.startswith("UP")]
            return True if up == [name] else None

        _wait(check, timeout, f"HAProxy routing to {name} alone", lambda: str(self.servers()))

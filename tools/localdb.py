"""Start and control real throwaway PostgreSQL and MariaDB servers on loopback
(or, for PostgreSQL, on an address in a network namespace: see localnet.py).

Used by the tests, the demo and the benchmarks; stdlib only, drives the server and client binaries.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

log = logging.getLogger("localdb")

LOOPBACK = "127.0.0.1"
_POLL_INTERVAL = 0.05
_STOP_TIMEOUT = 10.0
_REAP_TIMEOUT = 5.0


class LocalDbError(RuntimeError):
    """A local server or one of its tools did not do what was asked, in time."""


# --- process-wide bookkeeping ------------------------------------------------------------------

# Everything that still owns a process or a directory, so an aborted run leaves nothing behind.
_cleanups: dict[tuple[int, str], Callable[[], None]] = {}
# Reentrant: a signal handler (cleanup_on_signals) may run while its own thread holds it.
_cleanups_lock = threading.RLock()


def _register(owner: object, fn: Callable[[], None]) -> None:
    with _cleanups_lock:
        _cleanups[(id(owner), fn.__name__)] = fn


def _unregister(owner: object, fn: Callable[[], None]) -> None:
    with _cleanups_lock:
        _cleanups.pop((id(owner), fn.__name__), None)


@atexit.register
def _cleanup_all() -> None:
    with _cleanups_lock:
        pending = list(_cleanups.values())
        _cleanups.clear()
    # Newest first: servers are registered after the cluster whose directory holds them.
    for fn in reversed(pending):
        try:
            fn()
        except Exception:
            log.exception("cleanup at exit failed")


def _cleanup_on_signal(signum: int, frame: object) -> None:
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def cleanup_on_signals() -> None:
    """Make SIGTERM and SIGHUP, which skip atexit, run the cleanups too, then
    end the process as they would have. A handler someone else set stays."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _cleanup_on_signal)


_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on `host` right now, never the same one twice per process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        with _ports_lock:
            # The kernel happily hands a just-released port out again; servers not yet started
            # in this process would then collide.
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise LocalDbError(f"no free TCP port found on {host}")


# --- helpers -----------------------------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    """Every live process below `root`, from each process's
    /proc/<pid>/task/<tid>/children: a read per process of the tree, not per
    process of the machine (a scan of all of /proc takes seconds when other
    threads hold the interpreter)."""
    found: list[int] = []
    pending = [root]
    while pending:
        pid = pending.pop()
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue  # exited meanwhile
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                pending.append(child)
    return found


def _server_user(name: str) -> pwd.struct_passwd | None:
    """The account server binaries must run as: `name` under root (they refuse root), else us."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise LocalDbError(f"running as root needs a {name!r} system user") from None


def _mkdir(path: Path, owner: pwd.struct_passwd | None, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _clean_env(**extra: str) -> dict[str, str]:
    # The caller's PG*/MYSQL*/PATRONI_*/ETCD_* variables (PGHOST, PGPASSWORD, MYSQL_PWD,
    # ETCD_NAME...) must not redirect or alter our clients and servers.
    prefixes = ("PG", "MYSQL", "MARIADB", "PATRONI", "ETCD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def _run(
    cmd: Sequence[str],
    *,
    timeout: float,
    owner: pwd.struct_passwd | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    log.debug("run %s", shlex.join(cmd))
    try:
        return subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env if env is not None else _clean_env(),
            cwd="/",  # the caller's cwd may be unreadable for the server user
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
            extra_groups=[] if owner else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise LocalDbError(f"{cmd[0]} timed out after {timeout:g}s") from exc


def _check(res: subprocess.CompletedProcess[str], what: str) -> str:
    if res.returncode != 0:
        raise LocalDbError(f"{what} failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
    return res.stdout


def _tail(path: Path, offset: int = 0, lines: int = 30) -> str:
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(offset, size - 16384))
            text = fh.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _binary(name: str, *fallback_dirs: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(fallback_dirs))
    if not found:
        raise LocalDbError(f"{name} not found in PATH or {', '.join(fallback_dirs)}")
    return found


@functools.cache
def pg_bindir() -> Path:
    """PostgreSQL server binaries: $LOCALDB_PG_BINDIR, else the newest Debian ones, else PATH."""
    if env := os.environ.get("LOCALDB_PG_BINDIR"):
        return Path(env)
    debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")]
    if debian:
        return max(debian, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    if found := shutil.which("postgres"):
        return Path(found).parent
    raise LocalDbError("PostgreSQL server binaries not found; set LOCALDB_PG_BINDIR")


# --- process control shared by both engines ----------------------------------------------------


class _Server:
    """One server process that leads its own process group, so its helpers share its fate."""

    _stop_signal = signal.SIGTERM

    def __init__(
        self,
        name: str,
        port: int | None,
        log_file: Path,
        owner: pwd.struct_passwd | None,
        host: str = LOOPBACK,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.host = host
        self.port = port if port is not None else free_port()
        self.log_file = log_file
        self._auto_port = port is None  # only a port we chose may be swapped on a bind clash
        self._owner = owner
        # Run as root before the server (`ip netns exec <ns>`), which then
        # drops to `owner` itself: setns() needs root.
        self._prefix = list(prefix)
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} port={self.port} pid={self.pid}>"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_file, lines=lines)

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self, timeout: float) -> bool:
        raise NotImplementedError

    def _launch(self, timeout: float) -> None:
        """Spawn the server and wait until it answers; retry elsewhere if our port got taken."""
        for attempt in range(3):
            self.log_file.touch()
            offset = self.log_file.stat().st_size
            cmd = self._command()
            owner = self._owner
            if self._prefix:
                # Each step execs the next: the pid stays the server's, so
                # signals and its process group work as without a prefix.
                drop = []
                if owner is not None:
                    drop = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}"]
                    drop += ["--clear-groups", "--"]
                cmd, owner = [*self._prefix, *drop, *cmd], None
            log.debug("start %s: %s", self.name, shlex.join(cmd))
            with self.log_file.open("ab") as out:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: pause/kill hit all its children
                    cwd="/",
                    env=_clean_env(),
                    user=owner.pw_uid if owner else None,
                    group=owner.pw_gid if owner else None,
                    extra_groups=[] if owner else None,
                )
            _register(self, self.stop)
            if self._wait_ready(timeout, offset):
                self._auto_port = False  # from now on others (standbys, clients) rely on it
                return
            # Bind clash with someone who grabbed the port after free_port(): pick another.
            if not self._auto_port or attempt == 2:
                raise LocalDbError(f"{self.name}: port {self.port} in use\n{self.log_tail()}")
            self.port = free_port()

    def _wait_ready(self, timeout: float, log_offset: int) -> bool:
        """True once ready; False if it exited because its port was taken; raise otherwise."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                _unregister(self, self.stop)
                tail = _tail(self.log_file, log_offset)
                if "address already in use" in tail.lower():  # Go (etcd) writes it lowercase
                    return False
                raise LocalDbError(f"{self.name} exited with code {code} while starting:\n{tail}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise LocalDbError(
                    f"{self.name} not ready after {timeout:g}s:\n{_tail(self.log_file, log_offset)}"
                )
            try:
                ready = self._ready(min(remaining, 3.0))
            except LocalDbError:  # probe timed out, e.g. a stranger listens on our port
                ready = False
            if ready:
                log.debug("%s ready on port %d", self.name, self.port)
                return True
            time.sleep(_POLL_INTERVAL)

    def _output(self, res: subprocess.CompletedProcess[str], sql: str) -> str:
        """A client's output, or an error with the server's log tail if it died."""
        if res.returncode != 0:
            msg = f"{self.name}: {sql!r} failed: {res.stderr.strip()}"
            if not self.running:
                msg += f"\n{self.name} is not running; log tail:\n{self.log_tail()}"
            raise LocalDbError(msg)
        return res.stdout.strip()

    def _signal_group(self, sig: signal.Signals) -> None:
        """Signal the server and every process it started. PostgreSQL backends
        call setsid(), so its process group alone misses them."""
        # Only while the leader is unreaped: until then its pid (= the group id) cannot be reused.
        if self._proc is not None and self._proc.poll() is None:
            # Listed before the leader is signalled: a leader that dies (SIGKILL) hands its
            # children to init at once, and a stopped child left there never exits.
            children = _descendants(self._proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)
            # And after: the leader may have forked meanwhile (a stopped one no longer can).
            for pid in dict.fromkeys([*children, *_descendants(self._proc.pid)]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def stop(self) -> None:
        """Shut down cleanly, SIGKILL the group if that takes over 10 s. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(signal.SIGCONT)  # a paused server cannot act on the shutdown
            try:
                proc.send_signal(self._stop_signal)
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored shutdown for %gs, killing it", self.name, _STOP_TIMEOUT)
                self.kill()
                return
        self._proc = None
        _unregister(self, self.stop)

    def kill(self) -> None:
        """SIGKILL the whole process group, like a host crash; the data directory stays."""
        proc = self._proc
        if proc is None:
            return
        self._signal_group(signal.SIGKILL)
        try:
            proc.wait(_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) survived SIGKILL for %gs", self.name, proc.pid, _REAP_TIMEOUT)
        self._proc = None
        _unregister(self, self.stop)

    def pause(self) -> None:
        """SIGSTOP the whole process group, like a hung host: TCP connects work, nothing answers."""
        if not self.running:
            raise LocalDbError(f"{self.name} is not running")
        self._signal_group(signal.SIGSTOP)

    def pause_listener(self) -> None:
        """SIGSTOP the server's main process only (PostgreSQL's postmaster):
        sessions that exist still answer, new connections hang in the
        backlog."""
        if self._proc is None or self._proc.poll() is not None:
            raise LocalDbError(f"{self.name} is not running")
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the whole process group (after `pause` or `pause_listener`)."""
        self._signal_group(signal.SIGCONT)


# --- PostgreSQL --------------------------------------------------------------------------------

# Throwaway clusters: durability buys nothing and costs seconds per cluster.
_PG_CONF = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "wal_keep_size": "'64MB'",
    "fsync": "off",
    "shared_buffers": "'16MB'",
    "max_connections": "100",
    "huge_pages": "off",
    # pg_rewind needs it: an old primary can rejoin as a standby.
    "wal_log_hints": "on",
    # Standbys reattach quickly after their upstream restarts or fails over.
    "wal_retrieve_retry_interval": "'500ms'",
    "logging_collector": "off",
    "log_line_prefix": "'%m [%p] %q%a '",
}

_PG_HBA = """\
local all all trust
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
local replication all trust
host replication all 127.0.0.1/32 trust
host replication all ::1/128 trust
"""


class PgServer(_Server):
    """One PostgreSQL server (postmaster run directly) on 127.0.0.1 and a private unix socket.

    With `host` and `prefix` (`ip netns exec <ns>`), it listens on that
    address in that namespace instead; our own queries then go through the
    unix socket, which no network fault reaches.
    """

    _stop_signal = signal.SIGINT  # "fast" shutdown: abort sessions, checkpoint, exit

    def __init__(
        self,
        name: str,
        datadir: Path,
        port: int | None = None,
        socket_dir: Path | None = None,
        log_file: Path | None = None,
        host: str = LOOPBACK,
        prefix: Sequence[str] = (),
    ) -> None:
        log_file = log_file or datadir.parent / f"{name}.log"
        super().__init__(name, port, log_file, _server_user("postgres"), host, prefix)
        self.datadir = datadir
        self.socket_dir = socket_dir or datadir.parent / f"{name}-sock"
        self.bindir = pg_bindir()
        self.admin_host = str(self.socket_dir) if prefix else host

    def start(self, timeout: float = 30) -> None:
        """Start the postmaster and wait until it accepts queries (primary or hot standby)."""
        if self.running:
            return
        if not (self.datadir / "PG_VERSION").is_file():
            raise LocalDbError(f"{self.name}: {self.datadir} is not an initialized data directory")
        _mkdir(self.socket_dir, self._owner, 0o755)
        self._launch(timeout)

    def _command(self) -> list[str]:
        return [
            str(self.bindir / "postgres"),
            "-D",
            str(self.datadir),
            "-c",
            f"port={self.port}",
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"unix_socket_directories={self.socket_dir}",
        ]

    def _ready(self, timeout: float) -> bool:
        return self._psql("select 1", "postgres", timeout).returncode == 0

    def _psql(self, sql: str, dbname: str, timeout: float) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", self.admin_host]
        cmd += ["-p", str(self.port), "-U", "postgres", "-d", dbname, "-Atc", sql]
        # A hung server accepts the TCP connect but never answers; bound that wait as well.
        connect_timeout = str(max(1, min(int(timeout) - 1, 5)))
        return _run(cmd, timeout=timeout, env=_clean_env(PGCONNECT_TIMEOUT=connect_timeout))

    def query(self, sql: str, dbname: str = "postgres", timeout: float = 10) -> str:
        """Run `sql` with psql as postgres (over TCP, or in a namespace the
        unix socket); return unaligned tuples-only output."""
        return self._output(self._psql(sql, dbname, timeout), sql)

    @contextlib.contextmanager
    def hba_first(self, *lines: str) -> Iterator[None]:
        """`pg_hba.conf` with `lines` ahead of its own while the block runs
        (and the server, if still running, told of both changes)."""
        hba = self.datadir / "pg_hba.conf"
        original = hba.read_text()
        hba.write_text("\n".join(lines) + "\n" + original)
        self.query("select pg_reload_conf()")
        try:
            yield
        finally:
            hba.write_text(original)
            if self.running:
                self.query("select pg_reload_conf()")

    def in_recovery(self) -> bool:
        return self.query("select pg_is_in_recovery()") == "t"

    def rejoin(self, upstream: PgServer, timeout: float = 60) -> None:
        """Rewind this (old primary's) data directory onto `upstream`'s timeline
        and restart it as a standby streaming from `upstream`."""
        self.stop()
        # pg_rewind reads the source's timeline from its control file, which a
        # fresh promotion updates only at its next checkpoint.
        upstream.query("checkpoint", timeout=timeout)
        # Its address, not the admin socket: -R makes this the standby's primary_conninfo.
        source = f"host={upstream.host} port={upstream.port} user=postgres dbname=postgres"
        cmd = [str(self.bindir / "pg_rewind"), "-D", str(self.datadir)]
        cmd += ["--source-server", source, "-R", "--no-sync"]
        _check(_run(cmd, timeout=timeout, owner=self._owner), f"pg_rewind for {self.name}")
        self.start(timeout=timeout)

    def promote(self) -> None:
        """Turn this standby into a primary, waiting until it accepts writes."""
        out = self.query("select pg_promote(wait => true, wait_seconds => 30)", timeout=40)
        if out != "t":
            raise LocalDbError(f"{self.name}: promotion did not finish:\n{self.log_tail()}")


class PgCluster:
    """A primary and N hot standbys streaming from it (pg_basebackup -R), all on loopback.

    Or each on its own address (`hosts`) in its own namespace (`prefixes`,
    e.g. `ip netns exec <ns>`), the standbys streaming from the primary's
    address, so that cutting the network between them cuts replication.
    """

    def __init__(
        self,
        standbys: int = 2,
        ports: list[int] | None = None,
        base_dir: Path | None = None,
        hosts: list[str] | None = None,
        prefixes: list[list[str]] | None = None,
    ) -> None:
        for what, given in (("ports", ports), ("hosts", hosts), ("prefixes", prefixes)):
            if given is not None and len(given) != standbys + 1:
                raise ValueError(f"need {standbys + 1} {what} (primary first), got {len(given)}")
        self._owns_dir = base_dir is None
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="localdb-pg-"))
            base_dir.chmod(0o755)  # the postgres user must traverse it when we are root
        self.base_dir = base_dir
        names = ["primary", *(f"standby{i}" for i in range(1, standbys + 1))]
        self.servers = [
            PgServer(
                name,
                base_dir / name,
                port=ports[i] if ports else None,
                socket_dir=base_dir / f"{name}-sock",
                log_file=base_dir / f"{name}.log",
                host=hosts[i] if hosts else LOOPBACK,
                prefix=prefixes[i] if prefixes else (),
            )
            for i, name in enumerate(names)
        ]
        self.primary = self.servers[0]
        self.standbys = self.servers[1:]
        self._owner = _server_user("postgres")
        self._started = False
        _register(self, self.stop)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> PgCluster:
        """Create and start the cluster; return once every standby is streaming."""
        if self._started:
            return self
        self._started = True
        began = time.monotonic()
        try:
            self._initdb()
            self.primary.start()
            if self.standbys:
                # Base backups and standby startups are mostly waiting: overlap them.
                with ThreadPoolExecutor(len(self.standbys)) as pool:
                    list(pool.map(self._start_standby, self.standbys))
                self._wait_streaming(timeout=30)
        except BaseException:
            self.stop()
            raise
        log.debug("cluster in %s up in %.2fs", self.base_dir, time.monotonic() - began)
        return self

    def _initdb(self) -> None:
        datadir = self.primary.datadir
        _mkdir(datadir, self._owner, 0o700)
        cmd = [str(pg_bindir() / "initdb"), "-D", str(datadir), "-U", "postgres", "-A", "trust"]
        cmd += ["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        _check(_run(cmd, timeout=120, owner=self._owner), "initdb")
        # Writing as root into the existing files keeps them owned by postgres.
        with (datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# localdb\n")
            conf.writelines(f"{key} = {value}\n" for key, value in _PG_CONF.items())
        hba = _PG_HBA
        if self.primary.host != LOOPBACK:
            # The namespaces' subnet: the caller (its bridge) and the other nodes.
            hba += "host all all samenet trust\nhost replication all samenet trust\n"
        (datadir / "pg_hba.conf").write_text(hba)

    def _start_standby(self, standby: PgServer) -> None:
        _mkdir(standby.datadir, self._owner, 0o700)
        # application_name ends up in primary_conninfo, so pg_stat_replication names the standby.
        conninfo = (
            f"host={self.primary.host} port={self.primary.port} user=postgres "
            f"application_name={standby.name}"
        )
        cmd = [str(pg_bindir() / "pg_basebackup"), "-D", str(standby.datadir), "-d", conninfo]
        cmd += ["-R", "-X", "stream", "-c", "fast", "--no-sync", "--no-manifest", "-w"]
        _check(_run(cmd, timeout=120, owner=self._owner), f"pg_basebackup for {standby.name}")
        standby.start()

    def _wait_streaming(self, timeout: float) -> None:
        expected = {s.name for s in self.standbys}
        sql = "select application_name from pg_stat_replication where state = 'streaming'"
        deadline = time.monotonic() + timeout
        while True:
            streaming = set(self.primary.query(sql).splitlines())
            if expected <= streaming:
                return
            if time.monotonic() > deadline:
                lagging = [s for s in self.standbys if s.name not in streaming]
                logs = "\n".join(f"--- {s.name}:\n{s.log_tail(10)}" for s in lagging)
                raise LocalDbError(f"standbys not streaming after {timeout:g}s:\n{logs}")
            time.sleep(_POLL_INTERVAL)

    def wait_replayed(self, timeout: float = 10) -> None:
        """Wait until every running standby replayed the primary's current WAL position."""
        lsn = self.primary.query("select pg_current_wal_lsn()")
        # A promoted standby follows no one any more: count it as done.
        sql = f"select not pg_is_in_recovery() or pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
        deadline = time.monotonic() + timeout
        pending = [s for s in self.standbys if s.running]
        while True:
            remaining = max(deadline - time.monotonic(), 1.0)
            pending = [s for s in pending if s.query(sql, timeout=remaining) != "t"]
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise LocalDbError(f"{names} did not replay up to {lsn} within {timeout:g}s")
            time.sleep(_POLL_INTERVAL)

    def createdb(self, name: str) -> None:
        """CREATE DATABASE on the primary; it replicates to the standbys."""
        quoted = '"' + name.replace('"', '""') + '"'
        self.primary.query(f"create database {quoted}", timeout=30)

    def stop(self) -> None:
        """Stop every server, then remove the temp dir if we made it. Never raises."""
        # Sequential on purpose: this also runs from atexit, where no new threads may start.
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception:
                log.exception("stopping %s failed, killing it", server.name)
                server.kill()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        _unregister(self, self.stop)


# --- MariaDB -----------------------------------------------------------------------------------

# Shared by the bootstrap and the server so both agree on the InnoDB layout; no durability.
_MARIADB_OPTS = [
    "--skip-name-resolve",
    "--innodb-buffer-pool-size=64M",
    "--innodb-log-file-size=16M",
    "--innodb-flush-log-at-trx-commit=2",
    "--innodb-doublewrite=0",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_unicode_ci",
]


class MariaDbServer(_Server):
    """One MariaDB server on 127.0.0.1 in its own temp dir; root logs in over TCP, no password."""

    def __init__(
        self,
        port: int | None = None,
        base_dir: Path | None = None,
        name: str = "mariadb",
        extra_args: Sequence[str] = (),
    ) -> None:
        """`extra_args` go to mariadbd after ours (e.g. `--log-bin`, `--ssl-cert=...`)."""
        self._owns_dir = base_dir is None
        self.extra_args = list(extra_args)
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="localdb-mariadb-"))
            base_dir.chmod(0o755)  # the mysql user must traverse it when we are root
        self.base_dir = base_dir
        self.datadir = base_dir / "data"
        # mariadbd writes its socket, pid file and log itself, so they live in a dir it owns.
        self.run_dir = base_dir / "run"
        self.socket_path = self.run_dir / "mysqld.sock"
        self.pid_file = self.run_dir / "mysqld.pid"
        super().__init__(name, port, self.run_dir / "mariadbd.log", _server_user("mysql"))
        _register(self, self.cleanup)

    def __enter__(self) -> MariaDbServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def start(self, timeout: float = 30) -> None:
        """Create the data directory on first use, start mariadbd and wait until root can log in."""
        if self.running:
            return
        _mkdir(self.run_dir, self._owner, 0o755)
        if not (self.datadir / "mysql").is_dir():
            self._install(timeout)
        self._launch(timeout)

    def _install(self, timeout: float) -> None:
        _mkdir(self.datadir, self._owner, 0o700)
        cmd = [_binary("mariadb-install-db", "/usr/bin"), "--no-defaults"]
        # "normal" gives root@localhost/127.0.0.1/::1 with an empty password instead of unix
        # socket auth, so TCP clients (Django, the health checker) can log in as root.
        cmd += [f"--datadir={self.datadir}", "--auth-root-authentication-method=normal"]
        cmd += ["--skip-test-db", *_MARIADB_OPTS]
        _check(_run(cmd, timeout=max(timeout, 60), owner=self._owner), "mariadb-install-db")

    def _command(self) -> list[str]:
        return [
            _binary("mariadbd", "/usr/sbin", "/usr/libexec"),
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            f"--bind-address={LOOPBACK}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.pid_file}",
            f"--log-error={self.log_file}",
            "--max-connections=200",
            *_MARIADB_OPTS,
            *self.extra_args,
        ]

    def _client(self, sql: str, timeout: float) -> subprocess.CompletedProcess[str]:
        connect_timeout = max(1, min(int(timeout) - 1, 5))
        cmd = [_binary("mariadb", "/usr/bin"), "--no-defaults", "--protocol=TCP", "-h", self.host]
        cmd += ["-P", str(self.port), "-uroot", f"--connect-timeout={connect_timeout}"]
        cmd += ["-N", "-B", "-e", sql]
        return _run(cmd, timeout=timeout)

    def _ready(self, timeout: float) -> bool:
        return self._client("select 1", timeout).returncode == 0

    def query(self, sql: str, timeout: float = 10) -> str:
        """Run `sql` as root over TCP; return batch output (tab-separated, no column names)."""
        return self._output(self._client(sql, timeout), sql)

    def cleanup(self) -> None:
        """Stop the server and remove its temp dir (if we made it)."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        _unregister(self, self.cleanup)

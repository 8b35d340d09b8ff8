"""A private network of test hosts on this machine, for real network faults.

One network namespace per host, with an address from a 10.199.N.0/24 that
nothing on the machine uses, linked to a bridge in the caller's (root)
namespace through a second namespace of its own, the host's "cable":

    host ns: eth0 ==veth== cable ns: hostlink -[joint]- uplink ==veth== root: r<i> -[bridge]- caller

Faults are real: nft drop rules inside a host's namespace (a partition:
packets vanish, nothing is refused), and loss and latency on its cable,
where a process of ours (`wire`, below) forwards the frames in place of the
cable's bridge, delaying and dropping them as `tc netem` would (this
kernel, like CI's, has no netem). Needs root, `ip` (iproute2) and `nft`
(nftables). Every name carries the creating process's pid, so parallel runs
never collide, and a run cleans what a dead run left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import random
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from types import TracebackType

log = logging.getLogger("localnet")

#: Every name we create starts with this, then the owner's pid in base 36.
PREFIX = "dbn-"
#: Candidate subnets: 10.199.N.0/24, N chosen by pid, skipping used ones.
SUPERNET = ipaddress.ip_network("10.199.0.0/16")
#: Kept on every route we add, so a dead run's routes are known as ours.
ROUTE_PROTO = "199"
_NAME = re.compile(rf"^{re.escape(PREFIX)}([0-9a-z]+)-")
_TIMEOUT = 10.0
# Interface names are at most 15 bytes.
_IFNAMSIZ = 15

_instances = iter(range(36))
_instances_lock = threading.Lock()
_live: set[LocalNet] = set()


class LocalNetError(RuntimeError):
    """A network command failed, or this machine cannot host the network."""


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, rest = divmod(n, 36)
        out = digits[rest] + out
        if n == 0:
            return out


def _run(*cmd: str, check: bool = True, input: str | None = None) -> str:
    log.debug("run %s", shlex.join(cmd))
    try:
        res = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise LocalNetError(
            f"{cmd[0]} not found (tools/install-system-deps.sh installs it)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise LocalNetError(f"{shlex.join(cmd)} timed out") from exc
    if check and res.returncode != 0:
        raise LocalNetError(f"{shlex.join(cmd)} failed: {res.stderr.strip()}")
    return res.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(netns: str) -> None:
    """SIGKILL what still runs in `netns`, a namespace of ours: only our
    servers can be there, and a namespace with processes outlives its name."""
    for pid in _run("ip", "netns", "pids", netns, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def clean_leftovers() -> None:
    """Remove namespaces, links and routes of ours whose owner process is dead."""

    def dead(name: str) -> bool:
        match = _NAME.match(name)
        return bool(match) and not _pid_alive(int(match.group(1), 36))

    for line in _run("ip", "netns", "list", check=False).splitlines():
        name = line.split(" ", 1)[0]
        if dead(name):
            log.warning("removing namespace %s left by a dead run", name)
            _kill_inside(name)
            _run("ip", "netns", "delete", name, check=False)
    for line in _run("ip", "-o", "link", "show", check=False).splitlines():
        # "12: dbn-xyz-0-b: <...>" or "13: dbn-xyz-0-r1@if2: <...>"
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if dead(name):
            _run("ip", "link", "delete", name, check=False)
    # A guard route (see `LocalNet.start`) whose bridge is gone.
    connected = _run("ip", "-4", "route", "show", "proto", "kernel", check=False)
    for line in _run("ip", "-4", "route", "show", "proto", ROUTE_PROTO, check=False).splitlines():
        fields = line.split()
        if fields[:1] == ["unreachable"] and f"{fields[1]} dev" not in connected:
            _run("ip", "route", "delete", *fields, check=False)


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this namespace has an address or a route in."""
    used = []
    for line in _run("ip", "-4", "-o", "addr", "show").splitlines():
        fields = line.split()
        used.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for line in _run("ip", "-4", "route", "show", "table", "all").splitlines():
        fields = line.split()
        dest = (
            fields[1]
            if fields[0] in ("unreachable", "blackhole", "prohibit", "local", "broadcast", "throw")
            else fields[0]
        )
        if dest != "default":
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(dest, strict=False))
    return used


class LocalNet:
    """Namespaces `hosts` on one bridge; `address(host)` is how the caller
    (in the root namespace) and the other hosts reach each."""

    def __init__(self, hosts: Sequence[str]) -> None:
        if os.geteuid() != 0:
            raise LocalNetError("network namespaces need root")
        if not 1 <= len(hosts) <= 9:
            raise ValueError("1 to 9 hosts")
        with _instances_lock:
            instance = next(_instances, None)
        if instance is None:
            raise LocalNetError("at most 36 networks per process")
        tag = f"{PREFIX}{_base36(os.getpid())}-{_base36(instance)}-"
        self.hosts = list(hosts)
        self.bridge = f"{tag}b"
        self._veths = {h: f"{tag}r{i}" for i, h in enumerate(self.hosts)}
        self._netns = {h: f"{tag}{h}" for h in self.hosts}
        self._cables = {h: f"{tag}{h}-cable" for h in self.hosts}
        self._wires: dict[str, subprocess.Popen[bytes]] = {}
        assert all(len(name) <= _IFNAMSIZ for name in [self.bridge, *self._veths.values()])
        self.network: ipaddress.IPv4Network | None = None
        self._guard: list[str] = []  # our unreachable route for the subnet
        self._addresses: dict[str, str] = {}
        self._started = False

    def __enter__(self) -> LocalNet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- set-up and teardown ----------------------------------------------------------------

    def start(self) -> LocalNet:
        if self._started:
            return self
        self._started = True
        _live.add(self)
        try:
            clean_leftovers()
            self._create()
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._quiet_ipv6(self.bridge)
        self.network = self._claim_network()
        gateway, *hosts = list(self.network.hosts())[: len(self.hosts) + 1]
        self.gateway = str(gateway)
        _run("ip", "link", "set", self.bridge, "up")
        # Should the bridge go away while something still talks to these
        # addresses, packets must not follow the default route off the machine.
        # (Added once the bridge is up and its own route is there: a route of
        # ours without one is a dead run's, to a cleaner.)
        self._guard = ["unreachable", str(self.network), "metric", "4000"]
        _run("ip", "route", "add", *self._guard, "proto", ROUTE_PROTO)
        for host, address in zip(self.hosts, hosts, strict=True):
            netns, cable, veth = self._netns[host], self._cables[host], self._veths[host]
            inside, in_cable = ["ip", "netns", "exec", netns], ["ip", "netns", "exec", cable]
            for ns in (netns, cable):
                _run("ip", "netns", "add", ns)
                # No IPv6 chatter (router solicitations, MLD) on our links;
                # through sh, not sysctl: procps may be missing.
                knob = "/proc/sys/net/ipv6/conf/all/disable_ipv6"
                _run("ip", "netns", "exec", ns, "sh", "-c", f"echo 1 > {knob}", check=False)
            # Temporary names (unique in the root namespace) until moved.
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}u")
            self._quiet_ipv6(veth)
            _run("ip", "link", "set", f"{veth}u", "netns", cable)
            _run("ip", "link", "add", f"{veth}e", "type", "veth", "peer", "name", f"{veth}d")
            _run("ip", "link", "set", f"{veth}e", "netns", netns)
            _run("ip", "link", "set", f"{veth}d", "netns", cable)
            _run(*in_cable, "ip", "link", "set", f"{veth}u", "name", "uplink")
            _run(*in_cable, "ip", "link", "set", f"{veth}d", "name", "hostlink")
            _run(*in_cable, "ip", "link", "add", "joint", "type", "bridge")
            for link in ("uplink", "hostlink"):
                _run(*in_cable, "ip", "link", "set", "dev", link, "master", "joint", "up")
            _run(*in_cable, "ip", "link", "set", "joint", "up")
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            _run(*inside, "ip", "link", "set", f"{veth}e", "name", "eth0")
            _run(*inside, "ip", "addr", "add", f"{address}/{self.network.prefixlen}", "dev", "eth0")
            _run(*inside, "ip", "link", "set", "eth0", "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
            # No default route: a host reaches its subnet and nothing else.
            self._addresses[host] = str(address)

    def _quiet_ipv6(self, ifname: str) -> None:
        # No router solicitations or MLD reports from our links (no knob: no IPv6).
        with (
            contextlib.suppress(FileNotFoundError),
            open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as knob,
        ):
            knob.write("1")

    def _claim_network(self) -> ipaddress.IPv4Network:
        """Give the bridge a free /24 of SUPERNET, starting at one the pid
        picks; another run that claimed the same one meanwhile makes us move."""
        subnets = list(SUPERNET.subnets(new_prefix=24))[1:-1]
        start = os.getpid() % len(subnets)
        for subnet in subnets[start:] + subnets[:start]:
            if any(subnet.overlaps(used) for used in _used_networks()):
                continue
            address = f"{next(subnet.hosts())}/24"
            _run("ip", "addr", "add", address, "dev", self.bridge)
            holders = [
                line.split()[1]
                for line in _run("ip", "-4", "-o", "addr", "show").splitlines()
                if ipaddress.ip_interface(line.split()[3]).network.overlaps(subnet)
            ]
            if holders == [self.bridge]:
                return subnet
            _run("ip", "addr", "delete", address, "dev", self.bridge, check=False)
        raise LocalNetError(f"no free /24 in {SUPERNET}")

    def stop(self) -> None:
        """Remove everything this network made. Idempotent; never raises."""
        if not self._started:
            return
        self._started = False
        _live.discard(self)
        for host in self.hosts:
            try:
                self._unwire(host)
                for netns in (self._netns[host], self._cables[host]):
                    _kill_inside(netns)
                    _run("ip", "netns", "delete", netns, check=False)
                _run("ip", "link", "delete", self._veths[host], check=False)
            except Exception:
                log.exception("removing %s's namespaces failed", host)
        with contextlib.suppress(Exception):
            _run("ip", "link", "delete", self.bridge, check=False)
        if self._guard:
            # Last: until now it kept this subnet's packets on the machine.
            with contextlib.suppress(Exception):
                _run("ip", "route", "delete", *self._guard, check=False)

    # --- addressing -----------------------------------------------------------------------------

    def address(self, host: str) -> str:
        return self._addresses[host]

    def netns(self, host: str) -> str:
        return self._netns[host]

    def exec_prefix(self, host: str) -> list[str]:
        """A command prefix that runs the rest inside `host`'s namespace."""
        return ["ip", "netns", "exec", self._netns[host]]

    # --- faults ---------------------------------------------------------------------------------

    def _nft(self, host: str, script: str) -> None:
        _run(*self.exec_prefix(host), "nft", "-f", "-", input=script)

    def _drop(self, host: str, match_in: str, match_out: str) -> None:
        table = "table inet localnet"
        self._nft(
            host,
            f"{table} {{\n"
            "  chain input { type filter hook input priority 0; }\n"
            "  chain output { type filter hook output priority 0; }\n"
            "}\n"
            f'add rule inet localnet input iifname "eth0" {match_in} drop\n'
            f'add rule inet localnet output oifname "eth0" {match_out} drop\n',
        )

    def partition(self, host: str) -> None:
        """Cut `host` off from everyone: its packets vanish both ways (a
        pulled cable; a SYN to it gets no answer, not a refusal)."""
        self._drop(host, "", "")

    def cut(self, host: str, others: Iterable[str]) -> None:
        """Drop traffic between `host` and each of `others`, both ways;
        everyone else (the caller too) still reaches `host`."""
        addresses = ", ".join(self.address(o) for o in others)
        self._drop(host, f"ip saddr {{ {addresses} }}", f"ip daddr {{ {addresses} }}")

    def degrade(self, host: str, delay_ms: int, jitter_ms: int = 0, loss_pct: float = 0) -> None:
        """Loss and latency on `host`'s cable: each frame, either way, is
        dropped with `loss_pct` % chance, else delayed `delay_ms` ±
        `jitter_ms` (normal distribution, order kept)."""
        self._unwire(host)
        in_cable = ["ip", "netns", "exec", self._cables[host]]
        for link in ("uplink", "hostlink"):
            _run(*in_cable, "ip", "link", "set", "dev", link, "nomaster")
        cmd = [*in_cable, sys.executable, os.path.abspath(__file__), "wire", "uplink", "hostlink"]
        cmd += [str(delay_ms / 1000), str(jitter_ms / 1000), str(loss_pct / 100), str(os.getpid())]
        log.debug("start %s", shlex.join(cmd))
        wire = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        self._wires[host] = wire
        # It says "ready" once both sockets are bound: no frame crosses before.
        ready = wire.stdout.readline() if wire.stdout else b""
        if ready.strip() != b"ready":
            self._unwire(host)
            raise LocalNetError(f"the wire on {host}'s cable did not start")

    def _unwire(self, host: str) -> None:
        wire = self._wires.pop(host, None)
        if wire is None:
            return
        wire.terminate()
        try:
            wire.wait(_TIMEOUT)
        except subprocess.TimeoutExpired:
            wire.kill()
            wire.wait(_TIMEOUT)
        in_cable = ["ip", "netns", "exec", self._cables[host]]
        for link in ("uplink", "hostlink"):
            _run(*in_cable, "ip", "link", "set", "dev", link, "master", "joint", check=False)

    def heal(self, host: str) -> None:
        """Remove every fault from `host`'s link."""
        _run(*self.exec_prefix(host), "nft", "delete", "table", "inet", "localnet", check=False)
        self._unwire(host)


@atexit.register
def _stop_all() -> None:
    for net in list(_live):
        net.stop()


# --- the wire: loss and latency in user space -------------------------------------------------

_ETH_P_ALL = 3
_SOL_PACKET = 263
_PACKET_VNET_HDR = 15
_PACKET_OUTGOING = 4
#: A frame and its virtio-net header (offloads: GSO up to 64 KiB).
_FRAME_MAX = 65536 + 64
#: However long a run, a wire whose caller forgot it stops by itself.
_WIRE_LIFETIME = 1800.0


def wire(a: str, b: str, delay: float, jitter: float, loss: float, parent: int) -> None:
    """Forward every frame between interfaces `a` and `b`, dropping each
    with probability `loss`, else sending it `delay` ± `jitter` seconds
    later, never before the frame ahead of it. Stops on SIGTERM, when
    `parent` is gone, or after _WIRE_LIFETIME."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sockets = {}
    for name in (a, b):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        # With the virtio-net header, frames keep their offload state
        # (partial checksums, GSO) from one side to the other.
        sock.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
        sock.bind((name, _ETH_P_ALL))
        sock.setblocking(False)
        sockets[name] = sock
    other = {sockets[a]: sockets[b], sockets[b]: sockets[a]}
    queues: dict[socket.socket, deque[tuple[float, bytes]]] = {s: deque() for s in other}
    rng = random.Random()
    print("ready", flush=True)
    end = time.monotonic() + _WIRE_LIFETIME
    while time.monotonic() < end and os.getppid() != 1 and _pid_alive(parent):
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - now) if due else 0.5
        readable, _, _ = select.select(list(other), [], [], min(timeout, 0.5))
        now = time.monotonic()
        for sock in readable:
            for _ in range(256):
                try:
                    frame, address = sock.recvfrom(_FRAME_MAX)
                except BlockingIOError:
                    break
                if address[2] == _PACKET_OUTGOING or rng.random() < loss:
                    continue  # our own sends; or lost
                queue = queues[other[sock]]
                at = now + max(0.0, rng.gauss(delay, jitter))
                queue.append((max(at, queue[-1][0]) if queue else at, frame))
        now = time.monotonic()
        for sock, queue in queues.items():
            while queue and queue[0][0] <= now:
                with contextlib.suppress(OSError):  # a frame the link refuses is lost
                    sock.send(queue.popleft()[1])


if __name__ == "__main__" and sys.argv[1:2] == ["wire"]:
    _a, _b, _delay, _jitter, _loss, _parent = sys.argv[2:8]
    wire(_a, _b, float(_delay), float(_jitter), float(_loss), int(_parent))

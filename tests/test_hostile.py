"""Hostile servers on loopback: each speaks enough PostgreSQL or MySQL to
bring the `role` (or `handshake`) probe to a chosen point, then misbehaves:
random bytes, truncated messages, huge length fields, a trickle, silence,
endless streams, huge multi-line errors, endless or absurd authentication,
garbage TLS. Whatever they do, the probe fails within its deadline with one
short line of reason, memory and threads stay flat, and the process lives,
also with SIGPIPE at its default."""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

import dbha
from localdb import free_port
from tests.conftest import pg_settings

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")

ROOT = Path(__file__).resolve().parent.parent
CONNECT_TIMEOUT = 0.5
#: What a loaded 2-core machine may add to a deadline before we call it missed.
MARGIN = 1.0
#: Rounds run only when asked (`check_now`), so that every round is counted,
#: and each failing probe marks its node down at once.
HOSTILE_DBHA: dict[str, Any] = {
    "CONNECT_TIMEOUT": CONNECT_TIMEOUT,
    "CHECK_INTERVAL": 60,
    "FAST_INTERVAL": 60,
    "LISTENER_CHECK_INTERVAL": 0,
    "RISE": 1,
    "FALL": 1,
    "JITTER": 0,
}
PASSWORD = "hunter2-hostile"
#: How often a server thread looks at the client and at its stop flag.
TICK = 0.05
#: A trickling server sends a byte this often: five times within a deadline,
#: so that only a deadline for the whole probe ends it, not one per read.
TRICKLE = CONNECT_TIMEOUT / 5
#: No hostile connection outlives this, whatever the client does; nor does
#: it wait or send more than this many times in a row.
LIFETIME = 30.0
STEPS = 1_000_000
MAX_REASON = 300

RANDOM = random.Random(20240601).randbytes(1 << 20)
#: ~900 kB of lines that try to forge log lines and terminal escapes, with
#: C0 and C1 controls and Unicode line separators; no NUL (PostgreSQL fields
#: end at one).
HUGE_TEXT = (
    "first line\n"
    + "\r\n[ERROR] dbha: forged log line\x1b[31m\x07\t\x7f\u0085\u2028\u2029\x0b\x0c\n" * 13_000
    + "END-OF-TEXT"
).encode()


class Gone(Exception):
    """The client hung up, or the server is stopping."""


class Conn:
    """One accepted connection, from the hostile server's side: timed, and
    never blocking longer than a tick."""

    def __init__(self, server: HostileServer, sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        self.number = number
        sock.settimeout(TICK)
        self.accepted = time.monotonic()
        self.end = self.accepted + LIFETIME
        #: When the misbehaviour began, if the client's deadline runs from then.
        self.marked: float | None = None
        #: When the client hung up.
        self.gone: float | None = None
        self.closed_by_server = False
        self.finished = threading.Event()
        self.offered = 0
        self.inbox = bytearray()

    def mark(self) -> None:
        self.marked = time.monotonic()

    def hold(self) -> float | None:
        """How long the client kept the connection after the misbehaviour."""
        if self.marked is None or self.gone is None:
            return None
        return self.gone - self.marked

    def _check(self) -> None:
        if self.server.stopping.is_set() or time.monotonic() > self.end:
            raise Gone

    def _hung_up(self) -> Gone:
        if self.gone is None:
            self.gone = time.monotonic()
        return Gone()

    def receive(self) -> bytes:
        """What arrives within a tick (b"" for nothing)."""
        self._check()
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return b""
        except OSError:
            raise self._hung_up() from None
        if not data:
            raise self._hung_up()
        return data

    def read(self, n: int) -> bytes:
        while len(self.inbox) < n:
            self.inbox += self.receive()
        data = bytes(self.inbox[:n])
        del self.inbox[:n]
        return data

    def send(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            self._check()
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                continue
            except OSError:
                raise self._hung_up() from None
            self.offered += sent
            view = view[sent:]

    def pause(self, seconds: float) -> None:
        """Waits, reading (and dropping) what the client sends."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self.receive()

    def silence(self) -> None:
        """Says nothing until the client hangs up."""
        for _ in range(STEPS):
            self.receive()

    def stream(self, block: bytes) -> None:
        """Sends `block` again and again, as fast as the client reads."""
        for _ in range(STEPS):
            self.send(block)

    def trickle(self, data: bytes) -> None:
        """One byte every `TRICKLE` seconds, then silence."""
        for i in range(len(data)):
            self.send(data[i : i + 1])
            self.pause(TRICKLE)
        self.silence()

    def close(self, reset: bool = False) -> None:
        """Hangs up; with `reset`, with a RST (nothing lingers)."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.closed_by_server = True
        self.sock.close()
        raise Gone

    # --- PostgreSQL ---------------------------------------------------------

    def pg_startup(self) -> bytes:
        """The client's first packet: an SSLRequest or a startup packet."""
        (length,) = struct.unpack("!I", self.read(4))
        assert 8 <= length <= 10_000, f"startup packet of {length} bytes"
        return self.read(length - 4)

    def pg_message(self) -> tuple[bytes, bytes]:
        tag = self.read(1)
        (length,) = struct.unpack("!I", self.read(4))
        assert 4 <= length <= 100_000, f"message {tag!r} of {length} bytes"
        return tag, self.read(length - 4)

    def pg_login(self) -> None:
        self.pg_startup()
        self.send(PG_LOGIN)

    def pg_query(self) -> None:
        """Waits for the role query."""
        tag, _ = self.pg_message()
        if tag == b"X":  # Terminate: the client is leaving
            raise Gone
        assert tag == b"Q", f"expected a query, got {tag!r}"

    # --- MySQL --------------------------------------------------------------

    def my_packet(self) -> bytes:
        header = self.read(4)
        return self.read(int.from_bytes(header[:3], "little"))

    def my_login(self, greeting: bytes | None = None) -> None:
        self.send(my(0, greeting or my_greeting()))
        self.my_packet()
        self.send(my(2, MY_OK))

    def my_query(self) -> None:
        """Waits for the role query."""
        command = self.my_packet()[:1]
        if command == b"\x01":  # COM_QUIT
            raise Gone
        assert command == b"\x03", f"expected COM_QUERY, got {command!r}"


Handler = Callable[[Conn], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    engine: str
    handler: Handler
    #: The failure kinds (`NodeStatus.probe_errors`) the probe may report;
    #: None: any but "internal" (a panic).
    kinds: frozenset[str] | None
    probe: str = "role"
    #: PostgreSQL's sslmode or MySQL's ssl_mode; none by default.
    tls: str | None = None
    #: Whether the client's deadline runs from `Conn.mark()`: false for
    #: misbehaviour between rounds, which lasts until the next probe.
    timed: bool = True

    def settings(self, port: int) -> dict[str, Any]:
        if self.engine == "postgresql":
            return pg_settings(
                port, USER="probe", PASSWORD=PASSWORD, OPTIONS={"sslmode": self.tls or "disable"}
            )
        return {
            "ENGINE": "django.db.backends.mysql",
            "HOST": "127.0.0.1",
            "PORT": port,
            "NAME": "mysql",
            "USER": "probe",
            "PASSWORD": PASSWORD,
            "OPTIONS": {"ssl_mode": self.tls or "DISABLED"},
        }


class HostileServer:
    """Serves every connection on a free loopback port with a scenario's
    handler, each in a thread; `stop()` ends them all within a second."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.stopping = threading.Event()
        self.conns: list[Conn] = []
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.listener = listen()
        self.port: int = self.listener.getsockname()[1]
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            with self.lock:
                conn = Conn(self, sock, len(self.conns) + 1)
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self.conns.append(conn)
                self.threads.append(thread)
            thread.start()

    def _serve(self, conn: Conn) -> None:
        try:
            self.scenario.handler(conn)
            conn.silence()
        except Gone:
            pass
        except Exception as e:  # a bug in the scenario: the test reports it
            self.errors.append(f"connection {conn.number}: {e!r}")
        finally:
            conn.sock.close()
            conn.finished.set()

    def connections(self) -> list[Conn]:
        with self.lock:
            return list(self.conns)

    def offered(self) -> int:
        return sum(conn.offered for conn in self.connections())

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        until = time.monotonic() + 5
        self.acceptor.join(5)
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(max(0.0, until - time.monotonic()))


def listen() -> socket.socket:
    """A listening socket on a free loopback port (another process may take
    the port between `free_port()` and `bind()`: then another one)."""
    for _ in range(10):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", free_port()))
        except OSError:
            sock.close()
            continue
        sock.listen(64)
        return sock
    raise RuntimeError("no free loopback port")


@contextmanager
def serving(scenarios: Sequence[Scenario]) -> Iterator[dict[str, HostileServer]]:
    """Starts a server per scenario; stops them all, also on failure."""
    with ExitStack() as stack:
        servers = {}
        for scenario in scenarios:
            server = HostileServer(scenario)
            stack.callback(server.stop)
            servers[scenario.name] = server
        yield servers


# --- PostgreSQL's side of the wire -------------------------------------------------------------


def pg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


def pg_auth(code: int, extra: bytes = b"") -> bytes:
    return pg(b"R", struct.pack("!I", code) + extra)


def pg_row(*values: bytes) -> bytes:
    body = struct.pack("!H", len(values))
    for value in values:
        body += struct.pack("!I", len(value)) + value
    return pg(b"D", body)


def pg_error(severity: bytes, code: bytes, text: bytes) -> bytes:
    fields = b"S" + severity + b"\0V" + severity + b"\0C" + code + b"\0M" + text + b"\0"
    return pg(b"E", fields + b"Dsecond field\nwith lines\0\0")


PG_READY = pg(b"Z", b"I")
PG_LOGIN = pg_auth(0) + pg(b"S", b"server_version\0" + b"16.0\0") + pg(b"K", bytes(8)) + PG_READY
PG_ANSWER = (
    pg(b"T", b"\0\0") + pg_row(b"f", b"0", b"1", b"100", b"1") + pg(b"C", b"SELECT 1\0") + PG_READY
)
PG_ROWS = pg_row(b"t", b"0.5", b"1", b"100", b"1") * 40_000
PG_PARAMETERS = pg(b"S", b"TimeZone\0UTC\0") * 50_000
PG_NOTICES = pg(b"N", b"SWARNING\0C01000\0Mhello\0\0") * 30_000
#: More than dbha reads of any message (1 MiB).
PG_OVERSIZED = 64 << 20
#: Lengths that promise the impossible or would overflow an addition.
PG_HUGE_LENGTHS = (0x7FFF_FFFF, 0xFFFF_FFFF, 0x8000_0000, (1 << 20) + 1, 3, 0)


def pg_framed_random(seed: int) -> bytes:
    """Messages of real backend types with random bodies, correctly framed:
    they pass the framing and reach every message parser."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < 64 << 10:
        tag = rng.choice(b"RSKZTDCENAItnsv123")
        body = rng.randbytes(rng.randrange(48))
        if tag == ord("R"):
            body = struct.pack("!I", rng.choice((0, 2, 3, 5, 7, 8, 10, 11, 12))) + body
        out += pg(bytes([tag]), body)
    return bytes(out)


def pg_random_login(c: Conn) -> None:
    c.pg_startup()
    c.mark()
    c.stream(RANDOM)


def pg_random_answer(c: Conn) -> None:
    c.pg_login()
    c.pg_query()
    c.mark()
    c.stream(RANDOM)


def pg_framed_random_login(c: Conn) -> None:
    c.pg_startup()
    c.mark()
    c.send(pg_framed_random(c.number))


def pg_framed_random_answer(c: Conn) -> None:
    c.pg_login()
    c.pg_query()
    c.mark()
    c.send(pg(b"T", b"\0\0") + pg_framed_random(1000 + c.number))


def pg_truncated_silent(c: Conn) -> None:
    c.pg_startup()
    c.mark()
    c.send(b"R\0\0\0\x08\0\0")  # promises 4 bytes of body, sends 2


def pg_truncated_closed(c: Conn) -> None:
    c.pg_login()
    c.pg_query()
    c.mark()
    c.send(pg(b"T", b"\0\0") + b"D" + struct.pack("!I", 1000) + b"\0\x04\0\0\0\x01")
    c.close()


def pg_huge_length_login(c: Conn) -> None:
    c.pg_startup()
    c.mark()
    length = PG_HUGE_LENGTHS[c.number % len(PG_HUGE_LENGTHS)]
    c.send(b"R" + struct.pack("!I", length) + RANDOM[:4096])


def pg_huge_length_answer(c: Conn) -> None:
    c.pg_login()
    c.pg_query()
    c.mark()
    length = PG_HUGE_LENGTHS[c.number % len(PG_HUGE_LENGTHS)]
    c.send(b"D" + struct.pack("!I", length) + RANDOM[:4096])


def pg_trickle_login(c: Conn) -> None:
    c.pg_startup()
    c.mark()
    c.trickle(pg(b"N", b"SWARNING\0Mslow\0\0") + PG_LOGIN)


def pg_trickle_answer(c: Conn) -> None:
    c.pg_login()
    c.pg_query()
    c.mark()
    c.trickle(PG_ANSWER)


def pg_silent_accept(c: Conn) -> None:
    c.mark()
    c.silence()


def pg_silent_answer(c: Conn) -> None:
    c.pg_login()
    c.pg_query()
    c.mark()


def pg_endless_rows(c: Conn) -> None:
    c.pg_login()
    c.pg_query()
    c.mark()
    c.send(pg(b"T", b"\0\0"))
    c.stream(PG_ROWS)


def pg_endless_parameters(c: Conn) -> None:
    c.pg_startup()
    c.mark()
    c.send(pg_auth(0))
    c.stream(PG_PARAMETERS)


def pg_huge_error_login(c: Conn) -> None:
    c.pg_startup()
    c.mark()
    c.send(pg_error(b"FATAL", b"53300", HUGE_TEXT))


def pg_huge_error_answer(c: Conn) -> None:
    c.pg_login()
    c.pg_query()
    c.mark()
    c.send(pg_error(b"ERROR", b"XX000", HUGE_TEXT))


def pg_huge_sqlstate(c: Conn) -> None:
    """The SQLSTATE is five characters in every real server."""
    c.pg_login()
    c.pg_query()
    c.mark()
    c.send(pg_error(b"ERROR", HUGE_TEXT[:100_000], HUGE_TEXT[:100_000]))


def pg_oversized_error(c: Conn) -> None:
    c.pg_login()
    c.pg_query()
    c.mark()
    c.send(b"E" + struct.pack("!I", PG_OVERSIZED) + b"SERROR\0M")
    c.stream(HUGE_TEXT)


def pg_endless_cleartext(c: Conn) -> None:
    """Asks for the password again after every answer."""
    c.pg_startup()
    c.mark()
    for _ in range(100_000):
        c.send(pg_auth(3))
        c.pg_message()


def pg_endless_md5(c: Conn) -> None:
    c.pg_startup()
    c.mark()
    for i in range(100_000):
        c.send(pg_auth(5, struct.pack("!I", i)))
        c.pg_message()


def pg_scram(c: Conn, iterations: bytes) -> None:
    c.pg_startup()
    c.mark()
    c.send(pg_auth(10, b"SCRAM-SHA-256\0\0"))
    _, body = c.pg_message()
    nonce = re.search(rb"r=([^,]+)", body)
    assert nonce, body
    # A new salt every time: nothing cached helps.
    salt = base64.b64encode(random.randbytes(16))
    c.send(pg_auth(11, b"r=" + nonce[1] + b"hostile,s=" + salt + b",i=" + iterations))
    c.pg_message()
    c.send(pg_auth(12, b"v=" + base64.b64encode(bytes(32))))


def pg_scram_slow(c: Conn) -> None:
    # The most dbha does (PostgreSQL 16 allows this many): over a deadline.
    pg_scram(c, b"10000000")


def pg_scram_absurd(c: Conn) -> None:
    pg_scram(c, b"4294967295")


def pg_scram_overflow(c: Conn) -> None:
    pg_scram(c, b"18446744073709551617")


def pg_tls(c: Conn, then: Handler) -> None:
    request = c.pg_startup()
    assert request == b"\x04\xd2\x16\x2f", request
    c.send(b"S")
    c.mark()
    then(c)


def pg_tls_garbage(c: Conn) -> None:
    pg_tls(c, lambda c: c.stream(RANDOM))


def pg_tls_silent(c: Conn) -> None:
    pg_tls(c, lambda c: c.silence())


def pg_tls_huge_record(c: Conn) -> None:
    pg_tls(c, lambda c: c.stream(b"\x16\x03\x03\xff\xff" + RANDOM))


def pg_tls_then_silent_plain(c: Conn) -> None:
    """sslmode=prefer: garbage TLS, then a plain retry that hangs; both
    attempts share one deadline."""
    ssl_request = c.pg_startup() == b"\x04\xd2\x16\x2f"
    c.mark()
    if ssl_request:
        c.send(b"S")
        c.stream(RANDOM)


def pg_ssl_answer_garbage(c: Conn) -> None:
    c.pg_startup()
    c.mark()
    c.send(b"\x00" + RANDOM)


def pg_notice_flood_idle(c: Conn) -> None:
    """Answers once, then floods the idle session with notices."""
    c.pg_login()
    c.pg_query()
    c.send(PG_ANSWER)
    c.mark()
    c.stream(PG_NOTICES)


def pg_fatal_idle(c: Conn) -> None:
    """Answers once, then ends the idle session with a huge FATAL error;
    refuses the fresh session with another."""
    if c.number > 1:
        c.pg_startup()
        c.mark()
        c.send(pg_error(b"FATAL", b"53300", HUGE_TEXT))
        return
    c.pg_login()
    c.pg_query()
    c.send(PG_ANSWER)
    c.pause(0.05)
    c.mark()
    c.send(pg_error(b"FATAL", b"57P01", HUGE_TEXT))
    c.close()


def pg_handshake_garbage(c: Conn) -> None:
    c.pg_startup()
    c.mark()
    c.send(b"\x00" + RANDOM[:1000])


# --- MySQL's side of the wire ------------------------------------------------------------------

CLIENT_LONG_PASSWORD = 1
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_SSL = 1 << 11
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_PLUGIN_AUTH = 1 << 19
MY_CAPS = (
    CLIENT_LONG_PASSWORD
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_PROTOCOL_41
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_PLUGIN_AUTH
)
MY_OK = b"\x00\x00\x00\x02\x00\x00\x00"
MY_EOF = b"\xfe\x00\x00\x02\x00"


def my(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq & 0xFF]) + payload


def my_all(payloads: Sequence[bytes], seq: int = 1) -> bytes:
    return b"".join(my(seq + i, p) for i, p in enumerate(payloads))


def my_greeting(caps: int = MY_CAPS, plugin: bytes = b"mysql_native_password") -> bytes:
    scramble = b"0123456789ABCDEFGHIJ"
    return (
        b"\x0a8.0.36-hostile\0"
        + struct.pack("<I", 7)
        + scramble[:8]
        + b"\0"
        + struct.pack("<H", caps & 0xFFFF)
        + bytes([45, 2, 0])
        + struct.pack("<H", caps >> 16)
        + bytes([21])
        + bytes(10)
        + scramble[8:]
        + b"\0"
        + plugin
        + b"\0"
    )


def lenenc(n: int) -> bytes:
    if n < 0xFB:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfc" + n.to_bytes(2, "little")
    if n < 1 << 24:
        return b"\xfd" + n.to_bytes(3, "little")
    return b"\xfe" + n.to_bytes(8, "little")


def lenenc_str(s: bytes) -> bytes:
    return lenenc(len(s)) + s


def my_column(name: bytes) -> bytes:
    parts = b"".join(lenenc_str(p) for p in (b"def", b"", b"", b"", name, name))
    return parts + bytes([0x0C, 45, 0, 0, 1, 0, 0, 253, 0, 0, 0, 0, 0])


def my_error(code: int, text: bytes) -> bytes:
    return b"\xff" + struct.pack("<H", code) + b"#HY000" + text


MY_HEADER = [lenenc(2), my_column(b"Variable_name"), my_column(b"Value"), MY_EOF]
MY_ROW = lenenc_str(b"read_only") + lenenc_str(b"OFF")
MY_ANSWER = my_all([*MY_HEADER, MY_ROW, MY_EOF])
MY_ROWS = my(9, MY_ROW) * 70_000
#: A column definition of almost 1 MiB (its name twice), the most dbha reads
#: of one packet.
MY_BIG_COLUMN = my(2, my_column(b"c" * 500_000))
MY_HUGE_LENENC = (
    [b"\xfe" + b"\xff" * 8],  # a column count past any integer type
    [lenenc(1), b"\xfe" + b"\xff" * 8 + b"x"],  # a column name of 2^64 - 1 bytes
    [lenenc(1), my_column(b"c"), MY_EOF, b"\xfe" + b"\xff" * 7 + b"\x7f" + b"x"],  # a value
)


def my_framed_random(seed: int) -> bytes:
    """Packets with random payloads, correctly framed, their first bytes
    those that steer the client (OK, EOF, error, length prefixes)."""
    rng = random.Random(seed)
    out = bytearray()
    for seq in range(1, 2000):
        first = rng.choice((0x00, 0x01, 0x02, 0x03, 0x04, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF, 0x0A))
        out += my(seq, bytes([first]) + rng.randbytes(rng.randrange(40)))
    return bytes(out)


def my_random_greeting(c: Conn) -> None:
    c.mark()
    c.stream(RANDOM)


def my_random_answer(c: Conn) -> None:
    c.my_login()
    c.my_query()
    c.mark()
    c.stream(RANDOM)


def my_framed_random_greeting(c: Conn) -> None:
    c.mark()
    rng = random.Random(c.number)
    c.send(my(0, b"\x0a" + rng.randbytes(rng.randrange(80))) + my_framed_random(c.number))


def my_framed_random_answer(c: Conn) -> None:
    c.my_login()
    c.my_query()
    c.mark()
    c.send(my_framed_random(1000 + c.number))


def my_truncated_silent(c: Conn) -> None:
    c.mark()
    c.send(my(0, my_greeting())[:40])


def my_truncated_closed(c: Conn) -> None:
    c.my_login()
    c.my_query()
    c.mark()
    c.send(my(1, lenenc(2)) + b"\xe8\x03\x00\x02" + b"\x03def")
    c.close()


def my_huge_length_greeting(c: Conn) -> None:
    c.mark()
    c.send(b"\xff\xff\xff\x00")
    c.stream(RANDOM)


def my_huge_length_answer(c: Conn) -> None:
    """The longest packet there is, and a continuation of it."""
    c.my_login()
    c.my_query()
    c.mark()
    c.send(b"\xff\xff\xff\x01")
    c.stream(RANDOM)


def my_huge_lenenc(c: Conn) -> None:
    c.my_login()
    c.my_query()
    c.mark()
    c.send(my_all(MY_HUGE_LENENC[c.number % len(MY_HUGE_LENENC)]))


def my_trickle_greeting(c: Conn) -> None:
    c.mark()
    c.trickle(my(0, my_greeting()))


def my_trickle_answer(c: Conn) -> None:
    c.my_login()
    c.my_query()
    c.mark()
    c.trickle(MY_ANSWER)


def my_silent_accept(c: Conn) -> None:
    c.mark()


def my_silent_answer(c: Conn) -> None:
    c.my_login()
    c.my_query()
    c.mark()


def my_endless_rows(c: Conn) -> None:
    c.my_login()
    c.my_query()
    c.mark()
    c.send(my_all(MY_HEADER))
    c.stream(MY_ROWS)


def my_endless_columns(c: Conn) -> None:
    """4096 columns (the most dbha accepts), each named with almost 1 MiB."""
    c.my_login()
    c.my_query()
    c.mark()
    c.send(my(1, lenenc(4096)))
    c.stream(MY_BIG_COLUMN)


def my_huge_error_greeting(c: Conn) -> None:
    c.mark()
    c.send(my(0, my_error(1040, HUGE_TEXT[:16_000])))


def my_huge_error_login(c: Conn) -> None:
    c.send(my(0, my_greeting()))
    c.my_packet()
    c.mark()
    c.send(my(2, my_error(1040, HUGE_TEXT + b"\0\x00\x1b")))


def my_huge_error_answer(c: Conn) -> None:
    c.my_login()
    c.my_query()
    c.mark()
    c.send(my(1, my_error(1105, HUGE_TEXT)))


def my_endless_auth_switch(c: Conn) -> None:
    c.send(my(0, my_greeting()))
    c.my_packet()
    c.mark()
    for seq in range(2, 200, 2):
        c.send(my(seq, b"\xfemysql_native_password\0" + b"x" * 20 + b"\0"))
        c.my_packet()


def my_endless_fast_auth(c: Conn) -> None:
    """caching_sha2_password's "fast authentication succeeded", but no OK."""
    c.send(my(0, my_greeting(plugin=b"caching_sha2_password")))
    c.my_packet()
    c.mark()
    for seq in range(2, 200):
        c.send(my(seq, b"\x01\x03"))


def my_bad_public_key(c: Conn) -> None:
    """A full authentication without TLS, answered with a key that is no
    key, or an RSA key too big to use."""
    c.send(my(0, my_greeting(plugin=b"caching_sha2_password")))
    c.my_packet()
    c.mark()
    c.send(my(2, b"\x01\x04"))
    c.my_packet()
    key = BIG_RSA_KEY if c.number % 2 else b"-----BEGIN PUBLIC KEY-----\n" + HUGE_TEXT[:50_000]
    c.send(my(4, b"\x01" + key))


def der(tag: int, body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        return bytes([tag, length]) + body
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + body


def big_rsa_key(bits: int) -> bytes:
    """A well-formed SubjectPublicKeyInfo with a `bits`-bit modulus."""
    modulus = random.Random(7).getrandbits(bits) | (1 << (bits - 1)) | 1
    integer = der(0x02, b"\0" + modulus.to_bytes(bits // 8, "big"))
    rsa_key = der(0x30, integer + der(0x02, b"\x01\x00\x01"))
    algorithm = der(0x30, der(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")
    spki = der(0x30, algorithm + der(0x03, b"\0" + rsa_key))
    pem = base64.encodebytes(spki).replace(b"\n", b"")
    lines = b"\n".join(pem[i : i + 64] for i in range(0, len(pem), 64))
    return b"-----BEGIN PUBLIC KEY-----\n" + lines + b"\n-----END PUBLIC KEY-----\n"


BIG_RSA_KEY = big_rsa_key(65536)


def my_tls_garbage(c: Conn) -> None:
    c.send(my(0, my_greeting(MY_CAPS | CLIENT_SSL)))
    c.my_packet()  # the SSL request
    c.mark()
    c.stream(RANDOM)


def my_error_idle(c: Conn) -> None:
    """Answers once, then ends the idle session with a huge error packet;
    refuses the fresh session with another."""
    if c.number > 1:
        c.mark()
        c.send(my(0, my_error(1040, HUGE_TEXT[:16_000])))
        return
    c.my_login()
    c.my_query()
    c.send(MY_ANSWER)
    c.pause(0.05)
    c.mark()
    c.send(my(0, my_error(1053, HUGE_TEXT)))
    c.close()


def my_trickle_idle(c: Conn) -> None:
    """Answers once, then trickles a packet into the idle session: dbha
    reads it by a deadline of its own."""
    if c.number > 1:
        c.mark()
        return
    c.my_login()
    c.my_query()
    c.send(MY_ANSWER)
    c.pause(0.05)
    c.mark()
    c.trickle(my(0, my_error(1053, b"bye")))


# --- The scenarios -----------------------------------------------------------------------------


def kinds(*names: str) -> frozenset[str]:
    return frozenset(names)


ANY = None
PG = "postgresql"
MY = "mysql"

SCENARIOS = [
    Scenario("pg_random_login", PG, pg_random_login, kinds("bad_handshake")),
    Scenario("pg_random_answer", PG, pg_random_answer, kinds("bad_handshake")),
    Scenario("pg_framed_random_login", PG, pg_framed_random_login, ANY),
    Scenario("pg_framed_random_answer", PG, pg_framed_random_answer, ANY),
    Scenario("pg_truncated_silent", PG, pg_truncated_silent, kinds("timeout")),
    Scenario("pg_truncated_closed", PG, pg_truncated_closed, kinds("closed")),
    Scenario("pg_huge_length_login", PG, pg_huge_length_login, kinds("bad_handshake")),
    Scenario("pg_huge_length_answer", PG, pg_huge_length_answer, kinds("bad_handshake")),
    Scenario("pg_trickle_login", PG, pg_trickle_login, kinds("timeout")),
    Scenario("pg_trickle_answer", PG, pg_trickle_answer, kinds("timeout")),
    Scenario("pg_silent_accept", PG, pg_silent_accept, kinds("timeout")),
    Scenario("pg_silent_answer", PG, pg_silent_answer, kinds("timeout")),
    Scenario("pg_endless_rows", PG, pg_endless_rows, kinds("timeout")),
    Scenario("pg_endless_parameters", PG, pg_endless_parameters, kinds("timeout")),
    Scenario("pg_huge_error_login", PG, pg_huge_error_login, kinds("server_error")),
    Scenario("pg_huge_error_answer", PG, pg_huge_error_answer, kinds("server_error")),
    Scenario("pg_huge_sqlstate", PG, pg_huge_sqlstate, kinds("server_error")),
    Scenario("pg_oversized_error", PG, pg_oversized_error, kinds("bad_handshake")),
    Scenario("pg_endless_cleartext", PG, pg_endless_cleartext, kinds("timeout")),
    Scenario("pg_endless_md5", PG, pg_endless_md5, kinds("timeout")),
    Scenario("pg_scram_slow", PG, pg_scram_slow, kinds("timeout")),
    Scenario("pg_scram_absurd", PG, pg_scram_absurd, kinds("auth")),
    Scenario("pg_scram_overflow", PG, pg_scram_overflow, kinds("bad_handshake")),
    Scenario("pg_tls_garbage", PG, pg_tls_garbage, kinds("tls"), tls="require"),
    Scenario("pg_tls_silent", PG, pg_tls_silent, kinds("timeout"), tls="require"),
    Scenario("pg_tls_huge_record", PG, pg_tls_huge_record, kinds("tls"), tls="require"),
    Scenario("pg_tls_prefer", PG, pg_tls_then_silent_plain, kinds("timeout"), tls="prefer"),
    Scenario("pg_ssl_answer", PG, pg_ssl_answer_garbage, kinds("bad_handshake"), tls="require"),
    Scenario("pg_notice_flood_idle", PG, pg_notice_flood_idle, kinds("timeout"), timed=False),
    Scenario("pg_fatal_idle", PG, pg_fatal_idle, kinds("server_error")),
    Scenario("pg_hs_silent", PG, pg_silent_accept, kinds("timeout"), probe="handshake"),
    Scenario("pg_hs_garbage", PG, pg_handshake_garbage, kinds("bad_handshake"), probe="handshake"),
    Scenario("my_random_greeting", MY, my_random_greeting, kinds("bad_handshake")),
    Scenario("my_random_answer", MY, my_random_answer, kinds("bad_handshake")),
    Scenario("my_framed_random_greeting", MY, my_framed_random_greeting, ANY),
    Scenario("my_framed_random_answer", MY, my_framed_random_answer, ANY),
    Scenario("my_truncated_silent", MY, my_truncated_silent, kinds("timeout")),
    Scenario("my_truncated_closed", MY, my_truncated_closed, kinds("closed")),
    Scenario("my_huge_length_greeting", MY, my_huge_length_greeting, kinds("bad_handshake")),
    Scenario("my_huge_length_answer", MY, my_huge_length_answer, kinds("bad_handshake")),
    Scenario("my_huge_lenenc", MY, my_huge_lenenc, kinds("bad_handshake")),
    Scenario("my_trickle_greeting", MY, my_trickle_greeting, kinds("timeout")),
    Scenario("my_trickle_answer", MY, my_trickle_answer, kinds("timeout")),
    Scenario("my_silent_accept", MY, my_silent_accept, kinds("timeout")),
    Scenario("my_silent_answer", MY, my_silent_answer, kinds("timeout")),
    Scenario("my_endless_rows", MY, my_endless_rows, kinds("bad_handshake")),
    Scenario("my_endless_columns", MY, my_endless_columns, kinds("bad_handshake")),
    Scenario("my_huge_error_greeting", MY, my_huge_error_greeting, kinds("server_error")),
    Scenario("my_huge_error_login", MY, my_huge_error_login, kinds("server_error")),
    Scenario("my_huge_error_answer", MY, my_huge_error_answer, kinds("server_error")),
    Scenario("my_endless_auth_switch", MY, my_endless_auth_switch, kinds("bad_handshake")),
    Scenario("my_endless_fast_auth", MY, my_endless_fast_auth, kinds("bad_handshake")),
    Scenario("my_bad_public_key", MY, my_bad_public_key, kinds("bad_handshake")),
    Scenario("my_tls_garbage", MY, my_tls_garbage, kinds("tls"), tls="REQUIRED"),
    Scenario("my_error_idle", MY, my_error_idle, kinds("server_error")),
    Scenario("my_trickle_idle", MY, my_trickle_idle, kinds("timeout")),
    Scenario("my_hs_silent", MY, my_silent_accept, kinds("timeout"), probe="handshake"),
    Scenario("my_hs_trickle", MY, my_trickle_greeting, kinds("timeout"), probe="handshake"),
    Scenario("my_hs_random", MY, my_random_greeting, kinds("bad_handshake"), probe="handshake"),
    Scenario(
        "my_hs_huge_length", MY, my_huge_length_greeting, kinds("bad_handshake"), probe="handshake"
    ),
    Scenario(
        "my_hs_huge_error", MY, my_huge_error_greeting, kinds("server_error"), probe="handshake"
    ),
]
BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}


@contextmanager
def watching(servers: dict[str, HostileServer]) -> Iterator[None]:
    """dbha watching every server, one alias each, in one group: their
    probes run in parallel, a round costs one deadline."""
    scenarios = [server.scenario for server in servers.values()]
    databases = {s.name: s.settings(servers[s.name].port) for s in scenarios}
    probes = {s.name: s.probe for s in scenarios}
    with override_settings(DATABASES=databases, DBHA={**HOSTILE_DBHA, "PROBE": probes}):
        try:
            yield
        finally:
            dbha.close()


def timed_round() -> float:
    started = time.monotonic()
    dbha.check_now()
    return time.monotonic() - started


def has_line_breaks_or_controls(text: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def is_one_short_line(text: str) -> bool:
    return len(text) <= MAX_REASON and not has_line_breaks_or_controls(text)


def all_connections_end(servers: dict[str, HostileServer]) -> None:
    """Waits, bounded, for every hostile connection to end: a probe thread
    stuck past its deadline would hold one open."""
    conns = [c for server in servers.values() for c in server.connections()]
    until = time.monotonic() + CONNECT_TIMEOUT + MARGIN
    for conn in conns:
        conn.finished.wait(max(0.0, until - time.monotonic()))


def problems_of(server: HostileServer, record: dbha.NodeStatus) -> list[str]:
    """What broke a promise in one scenario (empty: nothing)."""
    scenario = server.scenario
    conns = server.connections()
    found = [f"server: {e}" for e in server.errors]
    if not conns:
        found.append("no connection was made")
    if record.state != "down":
        found.append(f"state {record.state}")
    reason = record.last_error or ""
    if not is_one_short_line(reason):
        found.append(f"last_error of {len(reason)} characters: {reason[:400]!r}")
    if PASSWORD in reason:
        found.append("the password in last_error")
    seen = set(record.probe_errors)
    if "internal" in seen or (scenario.kinds is not None and not seen <= scenario.kinds):
        found.append(
            f"failures {record.probe_errors}, expected only {sorted(scenario.kinds or [])}"
        )
    if record.latency is None or record.latency > CONNECT_TIMEOUT + MARGIN:
        found.append(f"the last probe took {record.latency} s")
    open_conns = [c.number for c in conns if not c.finished.is_set()]
    if open_conns:
        found.append(f"connections {open_conns} still open after the rounds")
    if scenario.timed:
        holds = [(c.number, c.hold()) for c in conns]
        late = [
            (n, round(h, 3)) for n, h in holds if h is not None and h > CONNECT_TIMEOUT + MARGIN
        ]
        if late:
            found.append(f"connections held past the deadline (number, seconds): {late}")
    return found


def report(servers: dict[str, HostileServer], records: dict[str, dbha.NodeStatus]) -> None:
    """The figures, for `pytest -s`."""
    for name, server in servers.items():
        holds = [h for c in server.connections() if (h := c.hold()) is not None]
        record = records[name]
        print(
            f"{name:28} conns {len(server.connections()):3} "
            f"max hold {max(holds, default=0):5.3f} s  latency {record.latency or 0:5.3f} s  "
            f"offered {server.offered() / 1e6:8.1f} MB  {record.last_error!r:.90}"
        )


@pytest.mark.parametrize("engine", [PG, MY])
def test_hostile_servers_fail_the_probe_within_its_deadline(
    engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dbha")
    scenarios = [s for s in SCENARIOS if s.engine == engine]
    with serving(scenarios) as servers, watching(servers):
        started = time.monotonic()
        # The real entry point, which waits for the first round; the servers
        # that misbehave only between rounds answer it, as a primary.
        assert dbha.available_db() in servers
        rounds = [time.monotonic() - started] + [timed_round() for _ in range(3)]
        all_connections_end(servers)
        records = {record.alias: record for record in dbha.status()}
        report(servers, records)
        print(f"{engine}: rounds took {[round(r, 3) for r in rounds]} s")
        assert max(rounds) <= CONNECT_TIMEOUT + MARGIN, rounds
        problems = {
            name: found
            for name, server in servers.items()
            if (found := problems_of(server, records[name]))
        }
        assert problems == {}
        assert dbha.available_db() in servers
    # No server text forges a log line (a record names every node of a group
    # and its reason: it is long, but one line).
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("dbha")]
    assert logged, "dbha logged nothing"
    assert [m for m in logged if has_line_breaks_or_controls(m)] == []


# --- Memory, threads ---------------------------------------------------------------------------

FLOODS = [
    "pg_endless_rows",
    "pg_endless_parameters",
    "pg_oversized_error",
    "pg_huge_error_answer",
    "pg_random_answer",
    "pg_scram_slow",
    "my_endless_rows",
    "my_endless_columns",
    "my_huge_length_answer",
    "my_huge_error_answer",
    "my_random_answer",
]


def proc_status(key: str) -> int:
    """A figure of /proc/self/status (kB for memory)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE)
    assert match, key
    return int(match[1])


def dbha_threads() -> int:
    """dbha's OS threads (the checker and one probe thread per node), by
    name: the hostile servers' threads come and go."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            continue  # a thread that just ended
    return sum(name in ("dbha-checker", "dbha-probe") for name in names)


def test_floods_leave_memory_and_threads_flat() -> None:
    with serving([BY_NAME[name] for name in FLOODS]) as servers, watching(servers):
        # Before dbha starts: what its threads and buffers take counts too.
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM)
        rss_start = proc_status("VmRSS")
        dbha.available_db()
        dbha.check_now()  # every probe thread exists now
        rss_before = proc_status("VmRSS")
        threads_before = dbha_threads()
        started = time.monotonic()
        for rounds in range(1, 41):
            dbha.check_now()
            offered = sum(s.offered() for s in servers.values())
            if rounds >= 10 and (offered > 1e9 or time.monotonic() - started > 20):
                break
        all_connections_end(servers)
        rss_after = proc_status("VmRSS")
        peak = proc_status("VmHWM")
        threads_after = dbha_threads()
        offered = sum(s.offered() for s in servers.values())
        records = {record.alias: record for record in dbha.status()}
        report(servers, records)
        print(
            f"{rounds + 2} rounds in {time.monotonic() - started:.1f} s, "
            f"{offered / 1e6:.0f} MB offered; RSS {rss_start / 1e3:.1f} MB before dbha, "
            f"{rss_before / 1e3:.1f} after 2 rounds, {rss_after / 1e3:.1f} at the end, "
            f"peak {peak / 1e3:.1f} MB; dbha threads {threads_before} -> {threads_after}"
        )
        assert offered > 300e6, "the floods must offer hundreds of MB"
        assert rss_after - rss_start < 50_000
        assert peak - rss_start < 50_000
        assert threads_after == threads_before == len(FLOODS) + 1
        assert all(record.state == "down" for record in records.values())
        assert dbha.available_db() in servers


# --- SIGPIPE at its default --------------------------------------------------------------------


def pg_reset_idle(c: Conn) -> None:
    """Answers, then resets the idle session: dbha's goodbye (Terminate)
    goes into a socket the server has reset."""
    c.pg_login()
    c.pg_query()
    c.send(PG_ANSWER)
    c.pause(0.05)
    c.close(reset=True)


def pg_reset_answer(c: Conn) -> None:
    """Takes the query and resets the connection instead of answering."""
    c.pg_login()
    if c.number % 2:
        c.pg_query()
        c.send(PG_ANSWER)
    c.pg_query()
    c.close(reset=True)


def pg_reset_login(c: Conn) -> None:
    """Asks for the password, then hangs up before it arrives."""
    c.pg_startup()
    c.send(pg_auth(3))
    c.close(reset=c.number % 2 == 0)


def my_reset_idle(c: Conn) -> None:
    """Answers, then resets the idle session: dbha's COM_QUIT goes into a
    socket the server has reset."""
    c.my_login()
    c.my_query()
    c.send(MY_ANSWER)
    c.pause(0.05)
    c.close(reset=True)


def my_reset_answer(c: Conn) -> None:
    c.my_login()
    if c.number % 2:
        c.my_query()
        c.send(MY_ANSWER)
    c.my_query()
    c.close(reset=True)


RESETS = [
    Scenario("pg_reset_idle", PG, pg_reset_idle, kinds("closed")),
    Scenario("pg_reset_answer", PG, pg_reset_answer, kinds("closed")),
    Scenario("pg_reset_login", PG, pg_reset_login, kinds("closed")),
    Scenario("my_reset_idle", MY, my_reset_idle, kinds("closed")),
    Scenario("my_reset_answer", MY, my_reset_answer, kinds("closed")),
]

#: Runs in a child process: SIGPIPE at its default before dbha is loaded, as
#: servers that restore it (some uWSGI and gunicorn set-ups) leave it. The
#: MySQL client library, which Django's MySQL backend loads (dbha imports
#: the backends to learn their vendor), ignores SIGPIPE as it starts: it is
#: set to the default again after that, and must still be at the end.
CHILD = """
import signal
signal.signal(signal.SIGPIPE, signal.SIG_DFL)

import json, os, time
import django
from django.conf import settings

settings.configure(
    DATABASES=json.loads(os.environ["HOSTILE_DATABASES"]),
    DBHA=json.loads(os.environ["HOSTILE_DBHA"]),
)
django.setup()
import dbha

dbha.available_db()
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
started = time.monotonic()
for _ in range(200):
    if time.monotonic() - started > 4:
        break
    dbha.check_now()
    time.sleep(0.02)
assert signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL
print(json.dumps({s.alias: [s.state, s.probe_errors] for s in dbha.status()}))
dbha.close()
"""


def test_servers_hanging_up_while_dbha_writes_do_not_kill_it_with_sigpipe() -> None:
    with serving(RESETS) as servers:
        databases = {s.name: s.settings(servers[s.name].port) for s in RESETS}
        inherited = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(":")]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([p for p in inherited if p] + [str(ROOT)]),
            "HOSTILE_DATABASES": json.dumps(databases),
            "HOSTILE_DBHA": json.dumps(HOSTILE_DBHA),
        }
        child = subprocess.run(
            [sys.executable, "-c", CHILD],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        resets = {
            name: sum(c.closed_by_server for c in s.connections()) for name, s in servers.items()
        }
        errors = {name: s.errors for name, s in servers.items() if s.errors}
    print(f"child exit {child.returncode}; server hang-ups {resets}; {child.stdout.strip()}")
    # -13 would be SIGPIPE.
    assert child.returncode == 0, child.stderr[-2000:]
    assert errors == {}
    assert all(count >= 3 for count in resets.values()), resets
    # It lived to the end of its rounds and reports every node.
    assert set(json.loads(child.stdout)) == set(resets)

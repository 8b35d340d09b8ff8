"""Writes the fuzz targets' seed corpus (corpus/<target>/) and the test CA
(data/ca.pem): a handful of valid server answers per target, built like the
scripted servers of the Rust tests. Python 3.11 stdlib and the `openssl`
command (for a throwaway certificate and key, never kept).

Run from anywhere: python3 fuzz/make_seeds.py
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import shutil
import ssl
import struct
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
NEXT = b"\n--next connection--\n"  # fuzz/src/lib.rs NEXT_CONNECTION
TURN = b"\n--next turn--\n"  # fuzz/src/lib.rs NEXT_TURN
SCRAM_NONCE = "ZnV6emluZ25vbmNlZnV6emlu"  # src/engines/postgres/scram.rs FUZZING_NONCE
PG_PASSWORD = b"pencil"
MY_PASSWORD = b"hunter2"


# --- PostgreSQL -------------------------------------------------------------


def pg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack(">I", len(body) + 4) + body


def pg_auth(code: int, extra: bytes = b"") -> bytes:
    return pg(b"R", struct.pack(">I", code) + extra)


def pg_error(code: str, text: str) -> bytes:
    return pg(b"E", f"SFATAL\0C{code}\0M{text}\0\0".encode())


def pg_greeting() -> bytes:
    return (
        pg(b"S", b"server_version\x0016.2\0")
        + pg(b"K", struct.pack(">II", 4242, 99))
        + pg(b"Z", b"I")
    )


def pg_row(values: list[str | None]) -> bytes:
    names = [b"standby", b"case", b"case", b"case", b"case"][: len(values)]
    description = struct.pack(">H", len(names)) + b"".join(
        n + b"\0" + struct.pack(">IHIhiH", 0, 0, 25, -1, -1, 0) for n in names
    )
    row = struct.pack(">H", len(values))
    for value in values:
        if value is None:
            row += struct.pack(">i", -1)
        else:
            row += struct.pack(">I", len(value)) + value.encode()
    return pg(b"T", description) + pg(b"D", row) + pg(b"C", b"SELECT 1\0") + pg(b"Z", b"I")


PRIMARY = pg_row(["f", "0", "3", "50331808", None])
STANDBY = pg_row(["t", "2.500000", None, "7", "2"])
NOTICE = pg(b"N", b"SNOTICE\0C00000\0Mhello\0\0") + pg(b"S", b"TimeZone\0UTC\0")


def scram_exchange(iterations: int = 16) -> bytes:
    salt = b"fuzz-salt"
    server_first = f"r={SCRAM_NONCE}server,s={base64.b64encode(salt).decode()},i={iterations}"
    salted = hashlib.pbkdf2_hmac("sha256", PG_PASSWORD, salt, iterations)
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    without_proof = f"c=biws,r={SCRAM_NONCE}server"
    auth_message = f"n=,r={SCRAM_NONCE},{server_first},{without_proof}"
    signature = hmac.digest(server_key, auth_message.encode(), "sha256")
    return (
        pg_auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
        + pg_auth(11, server_first.encode())
        + pg_auth(12, b"v=" + base64.b64encode(signature))
    )


def pg_options(
    ssl: int = 0,
    password: bool = False,
    fallback: bool = False,
    action: int = 0,
    unix: bool = False,
) -> bytes:
    return bytes([ssl | password << 2 | fallback << 3 | action << 4 | unix << 6])


def postgres_seeds(flights: dict[str, bytes]) -> dict[str, bytes]:
    ok = pg_auth(0)
    session = ok + pg_greeting() + TURN + PRIMARY + TURN + NOTICE + TURN + STANDBY
    return {
        "trust": pg_options() + session,
        "unix": pg_options(unix=True) + ok + pg_greeting() + STANDBY,
        "cleartext": pg_options(password=True) + pg_auth(3) + session,
        "md5": pg_options(password=True) + pg_auth(5, b"salt") + session,
        "scram": pg_options(password=True) + scram_exchange() + session,
        "refused": pg_options(password=True) + pg_error("28P01", "password authentication failed"),
        "fallback": pg_options(fallback=True)
        + pg_error("3D000", 'database "postgres" does not exist')
        + NEXT
        + session,
        "prefer_plain": pg_options(ssl=2) + b"N" + session,
        "allow_retry": pg_options(ssl=1) + pg_error("28000", "no pg_hba.conf entry") + NEXT + b"N",
        "prefer_tls13": pg_options(ssl=2) + b"S" + TURN + flights["tls13"] + NEXT + session,
        "require_tls12": pg_options(ssl=3) + b"S" + TURN + flights["tls12"],
        "probe_yes": pg_options(action=1) + b"S",
        "probe_no": pg_options(action=1) + b"N",
        "probe_forking": pg_options(action=1) + b"E",
        "new_session_sasl": pg_options(action=2) + pg_auth(10, b"SCRAM-SHA-256\0\0"),
        "new_session_full": pg_options(action=2)
        + pg_error("53300", "sorry, too many clients already"),
        "new_session_trust": pg_options(action=2) + ok,
    }


# --- MySQL ------------------------------------------------------------------

CLIENT_LONG_PASSWORD = 1
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_SSL = 1 << 11
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_PLUGIN_AUTH = 1 << 19
CAPS = (
    CLIENT_LONG_PASSWORD
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_PROTOCOL_41
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_PLUGIN_AUTH
)
SCRAMBLE = b"0123456789ABCDEFGHIJ"


def packet(payload: bytes, seq: int = 0) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def greeting(version: str, caps: int, plugin: str) -> bytes:
    p = b"\x0a" + version.encode() + b"\0" + struct.pack("<I", 7) + SCRAMBLE[:8] + b"\0"
    p += struct.pack("<I", caps)[:2] + bytes([45, 2, 0]) + struct.pack("<I", caps)[2:]
    p += bytes([21]) + bytes(10) + SCRAMBLE[8:] + b"\0" + plugin.encode() + b"\0"
    return packet(p)


def lenenc(value: bytes | None) -> bytes:
    if value is None:
        return b"\xfb"
    assert len(value) < 251
    return bytes([len(value)]) + value


def column(name: str) -> bytes:
    fields = [b"def", b"", b"", b"", name.encode(), name.encode()]
    return b"".join(lenenc(f) for f in fields) + b"\x0c\x21\0\0\1\0\xfd\0\0\0\0\0"


OK = packet(b"\0\0\0\2\0\0\0", 2)
EOF_PACKET = b"\xfe\0\0\2\0"


def my_error(code: int, message: str) -> bytes:
    return packet(b"\xff" + struct.pack("<H", code) + b"#HY000" + message.encode(), 1)


def result(columns: list[str], rows: list[list[str | None]]) -> bytes:
    out = packet(bytes([len(columns)]), 1)
    out += b"".join(packet(column(c), 2 + i) for i, c in enumerate(columns))
    out += packet(EOF_PACKET)
    out += b"".join(
        packet(b"".join(lenenc(None if v is None else v.encode()) for v in r)) for r in rows
    )
    return out + packet(EOF_PACKET)


def variables(pairs: list[tuple[str, str]]) -> bytes:
    return result(["Variable_name", "Value"], [[n, v] for n, v in pairs])


MY_PRIMARY = variables(
    [("read_only", "OFF"), ("gtid_binlog_pos", "0-2-130"), ("gtid_slave_pos", "0-1-100")]
)
MY_STANDBY = variables(
    [("read_only", "ON"), ("super_read_only", "OFF"), ("gtid_slave_pos", "0-1-7")]
)
REPLICA_STATUS = result(
    ["Replica_IO_State", "Seconds_Behind_Master"], [["Waiting", "12"], ["Waiting", None]]
)
KILLED = my_error(1927, "Connection was killed")


def my_options(
    ssl: int = 0,
    password: bool = False,
    database: bool = False,
    action: int = 0,
    unix: bool = False,
) -> bytes:
    return bytes([ssl | password << 2 | database << 3 | action << 4 | unix << 6])


def mysql_seeds(flights: dict[str, bytes], public_key: bytes) -> dict[str, bytes]:
    native = greeting("5.5.5-10.11.6-MariaDB", CAPS, "mysql_native_password")
    sha2 = greeting("8.0.36", CAPS | CLIENT_SSL, "caching_sha2_password")
    return {
        "native_primary": my_options(password=True, database=True)
        + native
        + TURN
        + OK
        + TURN
        + MY_PRIMARY
        + TURN
        + KILLED,
        "native_standby": my_options(password=True)
        + native
        + OK
        + MY_STANDBY
        + my_error(1064, "You have an error in your SQL syntax")
        + REPLICA_STATUS,
        "no_lag_privilege": my_options()
        + native
        + OK
        + MY_STANDBY
        + my_error(1227, "Access denied"),
        "sha2_fast": my_options(password=True) + sha2 + packet(b"\x01\x03", 2) + OK + MY_PRIMARY,
        "sha2_full_rsa": my_options(password=True)
        + sha2
        + packet(b"\x01\x04", 2)
        + packet(b"\x01" + public_key, 4)
        + OK
        + MY_PRIMARY,
        "sha2_full_unix": my_options(password=True, unix=True)
        + sha2
        + packet(b"\x01\x04", 2)
        + OK
        + MY_PRIMARY,
        "auth_switch": my_options(password=True)
        + sha2
        + packet(b"\xfemysql_native_password\0" + SCRAMBLE + b"\0", 2)
        + OK
        + MY_PRIMARY,
        "refused": my_options(password=True) + native + my_error(1045, "Access denied for user"),
        "too_many": my_options() + my_error(1040, "Too many connections"),
        "tls13": my_options(ssl=2) + sha2 + TURN + flights["tls13"],
        "tls12_preferred": my_options(ssl=1) + sha2 + TURN + flights["tls12"],
        "probe": my_options(action=1) + native,
        "new_session": my_options(action=2) + native + OK,
    }


# --- TLS --------------------------------------------------------------------


def make_key_and_cert(work: Path) -> tuple[Path, Path]:
    key, cert = work / "key.pem", work / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "36500",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def server_flight(key: Path, cert: Path, tls12: bool) -> bytes:
    """The server's first flight, answering a ClientHello of Python's."""
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    if tls12:
        server_context.maximum_version = ssl.TLSVersion.TLSv1_2
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    s_in.write(c_out.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        server.do_handshake()
    return s_out.read()


def tls_seeds(flights: dict[str, bytes]) -> dict[str, bytes]:
    return {
        "tls13_no_ca": b"\x00" + flights["tls13"],
        "tls12_no_ca": b"\x00" + flights["tls12"],
        "tls12_require_ca": b"\x01" + flights["tls12"],
        "tls12_verify_ca": b"\x02" + flights["tls12"],
        "tls12_verify_full_ip": b"\x07" + flights["tls12"],
        "tls13_verify_full": b"\x03" + flights["tls13"],
    }


def failure_text_seeds() -> dict[str, bytes]:
    return {
        "plain": b"53300 sorry, too many clients already",
        "forged_line": b"\n\nx\r\n[fake] log line\x1b[0m\0",
        "long": ("\u00e9\u2028 " * 200).encode(),
        "invalid_utf8": b"caf\xc3 \xff\xfe\t\x85end",
    }


def write(target: str, seeds: dict[str, bytes]) -> None:
    folder = CORPUS / target
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, data in seeds.items():
        (folder / name).write_bytes(data)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = make_key_and_cert(Path(tmp))
        public_key = subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout"], check=True, capture_output=True
        ).stdout
        flights = {
            "tls13": server_flight(key, cert, tls12=False),
            "tls12": server_flight(key, cert, tls12=True),
        }
        (HERE / "data").mkdir(exist_ok=True)
        shutil.copy(cert, HERE / "data" / "ca.pem")
    write("postgres", postgres_seeds(flights))
    write("mysql", mysql_seeds(flights, public_key))
    write("tls", tls_seeds(flights))
    write("failure_text", failure_text_seeds())


if __name__ == "__main__":
    main()

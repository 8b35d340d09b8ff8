"""Which driver exceptions mean that a database server failed the
application, and so are reported to dbha, and which are the application's
own: pure functions shared by the dbha database backends.

What counts is what a DBA would page about, and what dbha's own probes can
confirm: the server cannot be reached or takes no new sessions, a session
was cut off under the application, or the server refuses writes because it
is (or has become) read-only. Everything of the application's own making
never counts: SQL and constraint errors, lock and statement timeouts, a
query cancelled, credentials, grants or a missing database.

PostgreSQL (psycopg 3 and psycopg2), by SQLSTATE:

- class 08 (connection_exception) except 08P01 protocol_violation, which is
  a driver or application bug (a bind message with the wrong number of
  parameters), not the server;
- 57P01 admin_shutdown (shutdown, or the session terminated by an
  administrator), 57P02 crash_shutdown, 57P03 cannot_connect_now (starting
  up, shutting down, in recovery);
- 53300 too_many_connections;
- 25006 read_only_sql_transaction (a write on a standby, or on a server
  made read-only by `default_transaction_read_only`).

Not counted, with a SQLSTATE: 57014 query_canceled (statement_timeout,
pg_cancel_backend), 57P04 database_dropped, 57P05 idle_session_timeout,
25P03 idle_in_transaction_session_timeout, 40001/40P01 serialization
failure and deadlock, 55P03 lock_not_available (lock_timeout), classes 22,
23, 28, 3D, 42 (data, constraints, credentials, names, syntax), other class
53 (disk full, out of memory: the server still answers, and dbha cannot
act on them), classes 58 and XX (I/O errors, corruption: the same).

The driver gives no SQLSTATE when libpq raises the error itself: it could
not connect, timed out, or lost the connection; or the server refused a new
session (libpq keeps only its text). Such an OperationalError counts,
except:

- the server refused the session (libpq quotes it as `SEVERITY:  text`)
  for another reason than being unavailable: only "the database system is
  starting up / shutting down / in recovery mode / (not yet) accepting
  connections", "sorry, too many clients already", "remaining connection
  slots are reserved" and "terminating connection due to administrator
  command / because of crash of another server process" count. So a wrong
  password, an unknown role or database, a pg_hba.conf refusal and "too
  many connections for role" (the application's own quota) do not. Server
  texts are matched in English: a server with another `lc_messages` has
  its refusals not counted.
- libpq's own set-up errors: no password given, TLS required or refused,
  certificate checks, channel binding, too many query parameters, a
  command already in progress.
- psycopg_pool's PoolTimeout: as likely the application's own concurrency
  as a server down, which the pool's connects (not seen here) would show.

psycopg2 loses the server's last words when it closes a session: an idle
session timeout, a dropped database or pg_terminate_backend arrive as
"server closed the connection unexpectedly" and count. A report only makes
dbha re-probe at once, and a server that answers is not marked down, so
such a report costs one probe round. The same holds for a read-only
transaction the application opened itself (25006, MySQL 1792): the error
cannot be told from a standby's.

InterfaceError (psycopg2's "connection already closed") never counts: it is
the use of a connection that already failed, whose failure counted.

MySQL/MariaDB (mysqlclient), by error number:

- client errors: 2002 and 2003 cannot connect (refused, no socket, connect
  timeout), 2005 unknown host, 2006 server gone away, 2012 handshake
  failed, 2013 and 2055 connection lost (also the client's read timeout on
  a hung server, or a handshake timeout);
- server errors: 1040 too many connections, 1053 shutdown in progress, 1080
  forcing close of threads (shutdown), 1129 host blocked after connection
  errors, 1152 and 1184 aborted connection, 1158-1161 network read/write
  errors and timeouts, 1927 connection killed (MariaDB), 3032 offline mode,
  1047 only with "WSREP" (a Galera node not ready for queries);
- read-only: 1290 only when the option it names is `--read-only` or
  `--super-read-only` (1290 also names `--secure-file-priv` and others,
  whose name is quoted in any server language), 1792 statement in a READ
  ONLY transaction, 1836 read-only mode, 1874 InnoDB read-only.

Not counted: 1044/1045/1049/1130/1251/4151 (grants, credentials, unknown
database, locked account), 1203 max_user_connections (the application's
own quota), 1317 query interrupted (KILL QUERY), 1969 and 3024 statement
time limits, 1205 lock wait timeout, 1213 deadlock, 1062 and other
constraint errors, 1064 syntax, 2014 commands out of sync, 2026 TLS set-up,
1036 a read-only table, and error number 0 (a closed connection object used
again).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType
from typing import Final, Literal

#: "connection": the server cannot be reached, takes no new session, or cut
#: one off. "read-only": it refuses writes.
Kind = Literal["connection", "read-only"]


@dataclass(frozen=True)
class Verdict:
    """What an exception says about the server: `kind` is None when it does
    not count; `reason` says why, never quoting the driver's message."""

    kind: Kind | None
    reason: str

    @property
    def counts(self) -> bool:
        return self.kind is not None


NOT_A_DRIVER_ERROR: Final = Verdict(None, "not an error of the database driver")


# --- PostgreSQL --------------------------------------------------------------------------------

#: SQLSTATEs outside class 08 that count.
PG_SQLSTATES: Final[dict[str, tuple[Kind, str]]] = {
    "57P01": ("connection", "SQLSTATE 57P01 admin_shutdown"),
    "57P02": ("connection", "SQLSTATE 57P02 crash_shutdown"),
    "57P03": ("connection", "SQLSTATE 57P03 cannot_connect_now"),
    "53300": ("connection", "SQLSTATE 53300 too_many_connections"),
    "25006": ("read-only", "SQLSTATE 25006 read_only_sql_transaction"),
}

#: Server refusals (English texts) that mean the server takes no session now.
PG_UNAVAILABLE_TEXTS: Final = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "sorry, too many clients already",
    "remaining connection slots are reserved",
    "terminating connection due to administrator command",
    "terminating connection because of crash of another server process",
)

#: libpq's and psycopg's own errors that are set-up or usage mistakes.
PG_CLIENT_MISTAKES: Final = (
    "fe_sendauth",
    "password",
    "authentication",
    "ssl was required",
    "does not support ssl",
    "sslmode",
    "certificate",
    "channel binding",
    "number of parameters",
    "another command is already in progress",
)

# libpq quotes an error the server sent as "SEVERITY:  text", with two
# spaces, whatever the language; its own messages have no such part.
_PG_SERVER_TEXT: Final = re.compile(r"(?:^|\s)[^\s:]+:  (?P<text>[^\n]*)")


def postgresql_failure(exc: BaseException, driver: ModuleType) -> Verdict:
    """The verdict on `exc`, raised by `driver` (psycopg or psycopg2)."""
    if not isinstance(exc, driver.Error):
        return NOT_A_DRIVER_ERROR
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate:
        return _pg_sqlstate(sqlstate)
    if not isinstance(exc, driver.OperationalError):
        return Verdict(None, f"{type(exc).__name__} without SQLSTATE: a misuse, not the server")
    if type(exc).__name__ == "PoolTimeout":
        return Verdict(None, "connection pool timeout: the pool's own connects tell of a server")
    message = str(exc)
    server = _PG_SERVER_TEXT.search(message)
    if server is not None:
        text = server.group("text").strip().lower()
        if text.startswith(PG_UNAVAILABLE_TEXTS):
            return Verdict("connection", "the server takes no sessions now")
        return Verdict(None, "the server refused the session for the application's settings")
    if any(mistake in message.lower() for mistake in PG_CLIENT_MISTAKES):
        return Verdict(None, "a client set-up or usage error")
    return Verdict("connection", "no SQLSTATE: could not connect, timed out or connection lost")


def _pg_sqlstate(sqlstate: str) -> Verdict:
    if sqlstate.startswith("08"):
        if sqlstate == "08P01":
            return Verdict(None, "SQLSTATE 08P01 protocol_violation: a driver or application bug")
        return Verdict("connection", f"SQLSTATE {sqlstate} (class 08 connection_exception)")
    known = PG_SQLSTATES.get(sqlstate)
    if known is not None:
        return Verdict(*known)
    return Verdict(None, f"SQLSTATE {sqlstate}: the application's own error")


# --- MySQL / MariaDB ---------------------------------------------------------------------------

#: Error numbers that count as connection failures.
MYSQL_CONNECTION_ERRORS: Final[dict[int, str]] = {
    2002: "CR_CONNECTION_ERROR",
    2003: "CR_CONN_HOST_ERROR",
    2005: "CR_UNKNOWN_HOST",
    2006: "CR_SERVER_GONE_ERROR",
    2012: "CR_SERVER_HANDSHAKE_ERR",
    2013: "CR_SERVER_LOST",
    2055: "CR_SERVER_LOST_EXTENDED",
    1040: "ER_CON_COUNT_ERROR",
    1053: "ER_SERVER_SHUTDOWN",
    1080: "ER_FORCING_CLOSE",
    1129: "ER_HOST_IS_BLOCKED",
    1152: "ER_ABORTING_CONNECTION",
    1158: "ER_NET_READ_ERROR",
    1159: "ER_NET_READ_INTERRUPTED",
    1160: "ER_NET_ERROR_ON_WRITE",
    1161: "ER_NET_WRITE_INTERRUPTED",
    1184: "ER_NEW_ABORTING_CONNECTION",
    1927: "ER_CONNECTION_KILLED",
    3032: "ER_SERVER_OFFLINE_MODE",
}

#: Error numbers that always mean a read-only server.
MYSQL_READ_ONLY_ERRORS: Final[dict[int, str]] = {
    1792: "ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION",
    1836: "ER_READ_ONLY_MODE",
    1874: "ER_INNODB_READ_ONLY",
}

ER_OPTION_PREVENTS_STATEMENT: Final = 1290
ER_UNKNOWN_COM_ERROR: Final = 1047


def mysql_failure(exc: BaseException, driver: ModuleType) -> Verdict:
    """The verdict on `exc`, raised by `driver` (MySQLdb)."""
    if not isinstance(exc, driver.Error):
        return NOT_A_DRIVER_ERROR
    args = exc.args
    code = args[0] if args and isinstance(args[0], int) else None
    if code is None or code == 0:
        return Verdict(None, "no error number: a closed connection used again, or a misuse")
    message = str(args[1]) if len(args) > 1 else ""
    if code in MYSQL_CONNECTION_ERRORS:
        return Verdict("connection", f"{code} {MYSQL_CONNECTION_ERRORS[code]}")
    if code in MYSQL_READ_ONLY_ERRORS:
        return Verdict("read-only", f"{code} {MYSQL_READ_ONLY_ERRORS[code]}")
    lower = message.lower()
    # The option's name is a parameter of the message, so it is there in
    # every server language.
    if code == ER_OPTION_PREVENTS_STATEMENT and ("read-only" in lower or "read_only" in lower):
        return Verdict("read-only", "1290 ER_OPTION_PREVENTS_STATEMENT (--read-only)")
    if code == ER_UNKNOWN_COM_ERROR and "wsrep" in lower:
        return Verdict("connection", "1047 WSREP: a Galera node not ready for queries")
    return Verdict(None, f"{code}: the application's own error")

"""The classification of driver exceptions (`dbha.backends.failures`) over
the drivers' own exception classes, with the messages real servers and
libpq send: the cases a test server cannot easily be made to produce.
`test_backends.py` has the same against real servers."""

from __future__ import annotations

from types import ModuleType

import MySQLdb
import psycopg
import psycopg2
import pytest
from django.db import OperationalError as DjangoOperationalError

from dbha.backends.failures import mysql_failure, postgresql_failure


def pg(sqlstate: str, message: str = "message") -> Exception:
    error_class = psycopg.errors.lookup(sqlstate)
    return error_class(message)


CONNECT = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
CONNECT2 = 'connection to server at "127.0.0.1", port 5432 failed: '
CLOSED = (
    "server closed the connection unexpectedly\n\tThis probably means the server terminated"
    " abnormally\n\tbefore or while processing the request.\n"
)

PG_COUNTED = {
    "08000 connection_exception": pg("08000"),
    "08003 connection_does_not_exist": pg("08003"),
    "08006 connection_failure": pg("08006"),
    "08001 unable to establish": pg("08001"),
    "57P01 admin_shutdown": pg("57P01", "terminating connection due to administrator command"),
    "57P02 crash_shutdown": pg("57P02"),
    "57P03 cannot_connect_now": pg("57P03", "the database system is starting up"),
    "53300 too_many_connections": pg("53300"),
    "25006 read_only_sql_transaction": pg("25006", "cannot execute INSERT in a read-only"),
    "psycopg: refused": psycopg.OperationalError(CONNECT + "Connection refused\n\tIs the server"),
    "psycopg: timeout": psycopg.errors.ConnectionTimeout("connection timeout expired"),
    "psycopg: lost": psycopg.OperationalError("consuming input failed: " + CLOSED),
    "psycopg: closed": psycopg.OperationalError("the connection is closed"),
    "psycopg: DNS": psycopg.OperationalError("failed to resolve host 'db': [Errno -2] Name"),
    "psycopg: starting up": psycopg.OperationalError(
        CONNECT + "FATAL:  the database system is starting up"
    ),
    "psycopg: full": psycopg.OperationalError(CONNECT + "FATAL:  sorry, too many clients already"),
    "psycopg: reserved slots": psycopg.OperationalError(
        CONNECT + "FATAL:  remaining connection slots are reserved for roles with the SUPERUSER"
    ),
    "psycopg: not accepting": psycopg.OperationalError(
        CONNECT + "FATAL:  the database system is not accepting connections\n"
        "DETAIL:  Hot standby mode is disabled."
    ),
    "psycopg2: refused": psycopg2.OperationalError(CONNECT2 + "Connection refused\n"),
    "psycopg2: timeout": psycopg2.OperationalError(CONNECT2 + "timeout expired\n"),
    "psycopg2: lost": psycopg2.OperationalError(CLOSED),
    "psycopg2: shut down": psycopg2.OperationalError(
        "FATAL:  terminating connection due to administrator command\n" + CLOSED
    ),
    "psycopg2: SSL EOF": psycopg2.OperationalError("SSL SYSCALL error: EOF detected\n"),
    "psycopg2: socket": psycopg2.OperationalError(
        'connection to server on socket "/run/x/.s.PGSQL.5432" failed: No such file or directory'
    ),
}

PG_NOT_COUNTED = {
    "42601 syntax_error": pg("42601"),
    "23505 unique_violation": pg("23505"),
    "57014 query_canceled": pg("57014", "canceling statement due to statement timeout"),
    "55P03 lock_not_available": pg("55P03"),
    "40P01 deadlock_detected": pg("40P01"),
    "40001 serialization_failure": pg("40001"),
    "57P04 database_dropped": pg("57P04"),
    "57P05 idle_session_timeout": pg("57P05"),
    "25P03 idle_in_transaction_session_timeout": pg("25P03"),
    "08P01 protocol_violation": pg("08P01"),
    "53100 disk_full": pg("53100"),
    "XX001 data_corrupted": pg("XX001"),
    "28P01 invalid_password": pg("28P01"),
    "psycopg: wrong password": psycopg.OperationalError(
        CONNECT + 'FATAL:  password authentication failed for user "app"'
    ),
    "psycopg: no database": psycopg.OperationalError(
        CONNECT + 'FATAL:  database "x" does not exist'
    ),
    "psycopg: role quota": psycopg.OperationalError(
        CONNECT + 'FATAL:  too many connections for role "app"'
    ),
    "psycopg: pg_hba": psycopg.OperationalError(
        CONNECT + 'FATAL:  no pg_hba.conf entry for host "127.0.0.1", user "app"'
    ),
    "psycopg: no password": psycopg.OperationalError(CONNECT + "fe_sendauth: no password supplied"),
    "psycopg: TLS required": psycopg.OperationalError(
        CONNECT + "server does not support SSL, but SSL was required"
    ),
    "psycopg: too many parameters": psycopg.OperationalError(
        "sending query and params failed: number of parameters must be between 0 and 65535"
    ),
    "psycopg: interface error": psycopg.InterfaceError("connection already closed"),
    "psycopg2: interface error": psycopg2.InterfaceError("connection already closed"),
    "psycopg2: idle timeout": psycopg2.OperationalError(
        "FATAL:  terminating connection due to idle-session timeout\n" + CLOSED
    ),
    "psycopg2: certificate": psycopg2.OperationalError(
        CONNECT2 + "SSL error: certificate verify failed\n"
    ),
    "not a driver error": RuntimeError("boom"),
    "Django's own exception": DjangoOperationalError("already converted"),
}


def pg_driver(exc: BaseException) -> ModuleType:
    return psycopg2 if type(exc).__module__.startswith("psycopg2") else psycopg


@pytest.mark.parametrize("exc", PG_COUNTED.values(), ids=PG_COUNTED.keys())
def test_postgresql_failures_that_count(exc: Exception) -> None:
    verdict = postgresql_failure(exc, pg_driver(exc))
    assert verdict.counts, verdict


@pytest.mark.parametrize("exc", PG_NOT_COUNTED.values(), ids=PG_NOT_COUNTED.keys())
def test_postgresql_errors_that_do_not_count(exc: Exception) -> None:
    verdict = postgresql_failure(exc, pg_driver(exc))
    assert not verdict.counts, verdict


def test_postgresql_read_only_and_connection_kinds() -> None:
    assert postgresql_failure(pg("25006"), psycopg).kind == "read-only"
    assert postgresql_failure(pg("57P01"), psycopg).kind == "connection"


def test_a_pool_timeout_does_not_count() -> None:
    class PoolTimeout(psycopg.OperationalError):
        """As psycopg_pool names it."""

    assert not postgresql_failure(PoolTimeout("couldn't get a connection"), psycopg).counts


def my(code: int, message: str = "message") -> Exception:
    return MySQLdb.OperationalError(code, message)


MY_COUNTED = {
    "2002 refused": my(2002, "Can't connect to server on '127.0.0.1' (115)"),
    "2003 host": my(2003),
    "2005 unknown host": my(2005, "Unknown server host 'db' (-2)"),
    "2006 gone away": my(2006, "Server has gone away"),
    "2013 lost": my(2013, "Lost connection to server during query"),
    "2013 handshake timeout": my(
        2013, "Lost connection to server at 'handshake: reading initial communication packet'"
    ),
    "2055 lost": my(2055),
    "1040 too many connections": my(1040, "Too many connections"),
    "1053 shutdown": my(1053, "Server shutdown in progress"),
    "1129 host blocked": my(1129),
    "1158 net read error": my(1158),
    "1927 killed": my(1927, "Connection was killed"),
    "3032 offline mode": my(3032),
    "1290 read-only": my(1290, "The MariaDB server is running with the --read-only option so"),
    "1290 super-read-only": my(1290, "The MySQL server is running with the --super-read-only"),
    "1792 read-only transaction": my(1792, "Cannot execute statement in a READ ONLY transaction"),
    "1836 read-only mode": my(1836),
    "1874 InnoDB read-only": my(1874),
    "1047 Galera": my(1047, "WSREP has not yet prepared node for application use"),
}

MY_NOT_COUNTED = {
    "1064 syntax": MySQLdb.ProgrammingError(1064, "You have an error in your SQL syntax"),
    "1062 duplicate": MySQLdb.IntegrityError(1062, "Duplicate entry '1' for key 'PRIMARY'"),
    "1205 lock wait": my(1205),
    "1213 deadlock": my(1213),
    "1317 interrupted": my(1317, "Query execution was interrupted"),
    "1969 max_statement_time": my(1969),
    "1045 access denied": my(1045, "Access denied for user 'app'@'127.0.0.1'"),
    "1044 no database access": my(1044),
    "1203 user quota": my(1203),
    "1290 secure-file-priv": my(1290, "The MariaDB server is running with the --secure-file-priv"),
    "1047 unknown command": my(1047, "Unknown command"),
    "2014 out of sync": my(2014),
    "2026 TLS": my(2026),
    "0 closed": MySQLdb.InterfaceError(0, ""),
    "no args": MySQLdb.OperationalError(),
    "not a driver error": ValueError(2006),
}


@pytest.mark.parametrize("exc", MY_COUNTED.values(), ids=MY_COUNTED.keys())
def test_mysql_failures_that_count(exc: Exception) -> None:
    verdict = mysql_failure(exc, MySQLdb)
    assert verdict.counts, verdict


@pytest.mark.parametrize("exc", MY_NOT_COUNTED.values(), ids=MY_NOT_COUNTED.keys())
def test_mysql_errors_that_do_not_count(exc: Exception) -> None:
    verdict = mysql_failure(exc, MySQLdb)
    assert not verdict.counts, verdict


def test_a_reason_never_quotes_the_driver_message() -> None:
    secret = "s3cret-in-a-message"
    for verdict in (
        postgresql_failure(psycopg.OperationalError(f"failed: {secret}"), psycopg),
        postgresql_failure(pg("42601", secret), psycopg),
        mysql_failure(my(2013, secret), MySQLdb),
        mysql_failure(my(1064, secret), MySQLdb),
    ):
        assert secret not in verdict.reason

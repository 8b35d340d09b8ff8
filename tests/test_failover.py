"""Failover decisions against real PostgreSQL 15: the newest timeline wins,
a kept session is no proof of new sessions, closed sessions are noticed at
once, the lag bound holds between probes, and a thread reads its own
writes. Each test really stops, kills, promotes or starves a server."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import connections
from django.test import override_settings

import dbha
from tests.conftest import PG_PORTS, TEST_DBHA, Cluster, pg_settings, wait_for
from tests.testapp.models import Item
from tests.workload import Writer, names_on, status, writer_is

REPLICAS = {**TEST_DBHA, "READS": "replicas"}

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


@pytest.mark.parametrize("promoted", ["failover1", "failover2"])
def test_a_stuck_postmaster_and_a_promotion(cluster: Cluster, promoted: str) -> None:
    """Only the postmaster hangs: the kept probe session still says
    "primary", new connections hang. The promoted node is on a newer
    timeline, and that alone moves the writes."""
    assert dbha.available_db() == "default"
    cluster.servers["default"].pause_listener()
    time.sleep(0.5)
    assert status("default").state == "up", "its session still answers"
    cluster.servers[promoted].promote()
    started = time.monotonic()
    wait_for(lambda: writer_is(promoted), timeout=10, what="writes on the promoted node")
    assert time.monotonic() - started < 3
    assert status("default").split_brain, "fenced: a promotion abandoned it"
    assert (status(promoted).timeline or 0) > (status("default").timeline or 0)


def test_a_stuck_postmaster_is_down_for_writes_once_reported(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dbha")
    with override_settings(DBHA={**TEST_DBHA, "ON_ALL_DOWN": "raise"}):
        assert dbha.available_db() == "default"
        cluster.servers["default"].pause_listener()
        dbha.report_failure("default")
        wait_for(lambda: status("default").state == "down", what="the stuck postmaster")
        reason = status("default").last_error or ""
        assert reason.startswith("new connections fail (timeout)"), reason
        with pytest.raises(dbha.NoHealthyDatabase, match="new connections fail"):
            dbha.available_db()
        cluster.servers["default"].resume()
        wait_for(lambda: status("default").is_writer, what="recovery once it accepts again")


def test_the_periodic_new_session_check_finds_a_stuck_postmaster(cluster: Cluster) -> None:
    settings = {**TEST_DBHA, "LISTENER_CHECK_INTERVAL": 1}
    with override_settings(DBHA=settings):
        assert dbha.available_db() == "default"
        cluster.servers["default"].pause_listener()
        # No report: the check every second finds it (then every fast round).
        wait_for(lambda: status("default").state == "down", timeout=10, what="the check")


def test_promotion_while_the_old_primary_runs_and_answers(cluster: Cluster) -> None:
    """A partition between the database nodes (or an operator's mistake):
    failover2 is promoted while the old primary keeps taking connections.
    Writes move at once; the few the old primary acknowledged meanwhile are
    the only ones lost, and none comes later than a probe round."""
    with Writer().running() as writer:
        wait_for(lambda: writer.by("default"), what="writes on the primary")
        cluster.servers["failover2"].promote()
        promoted = time.monotonic()
        wait_for(lambda: writer.by("failover2"), what="writes on failover2")
        time.sleep(1.0)
    assert status("default").state == "up", "it never failed"
    assert status("default").split_brain
    on_failover2 = names_on(cluster, "failover2")
    assert writer.by("failover2") <= on_failover2
    late = [
        writer.acked_at[name] - promoted
        for name in writer.by("default")
        if writer.acked_at[name] > promoted
    ]
    # CHECK_INTERVAL is 0.2 s here (± jitter); a write in flight adds a little.
    assert all(delay < 0.6 for delay in late), late
    lost = writer.by("default") - on_failover2
    assert all(writer.acked_at[name] > promoted - 0.5 for name in lost)


def test_a_kill_is_noticed_at_once_and_a_promotion_followed_without_reports(
    cluster: Cluster,
) -> None:
    """No periodic round for a minute, and the application reports nothing:
    the closed probe session tells of the kill, and the group without a
    writer is probed every FAST_INTERVAL until failover1 is promoted."""
    settings = {**TEST_DBHA, "CHECK_INTERVAL": 60, "FALL": 5}
    with override_settings(DBHA=settings):
        assert dbha.available_db() == "default"
        killed = time.monotonic()
        cluster.servers["default"].kill()
        wait_for(lambda: status("default").state == "down", timeout=5, what="the kill")
        assert time.monotonic() - killed < 1.0
        assert status("default").failures < 5, "down without waiting for FALL"
        with Writer(report_failures=False).running() as writer:
            cluster.servers["failover1"].promote()
            promoted = time.monotonic()
            wait_for(lambda: writer_is("failover1"), timeout=5, what="the promotion")
            switched = time.monotonic() - promoted
            wait_for(lambda: writer.by("failover1"), what="writes on failover1")
        assert switched < 1.0, switched
        assert set(writer.acked.values()) == {"failover1"}


def test_a_hung_writer_the_application_reports_fails_fast(cluster: Cluster) -> None:
    """ON_ALL_DOWN is "last", but once the application reports the writer
    failing and dbha's own probes time out too, a request fails at once
    instead of waiting out libpq's connect_timeout (2 s here)."""

    def fails_fast() -> bool:
        try:
            dbha.available_db()
        except dbha.NoHealthyDatabase:
            return True
        return False

    assert dbha.available_db() == "default"
    cluster.servers["default"].pause()
    wait_for(lambda: status("default").failures > 0, what="a timed-out probe")
    dbha.report_failure("default")
    wait_for(fails_fast, what="the confirmed failure")
    started = time.monotonic()
    with pytest.raises(dbha.NoHealthyDatabase, match="failing for the application too"):
        Item.objects.create(name="nowhere")
    assert time.monotonic() - started < 0.5
    cluster.servers["default"].resume()
    wait_for(lambda: status("default").is_writer, what="recovery")
    assert dbha.available_db() == "default"


def test_terminating_the_probe_session_is_no_false_down(cluster: Cluster) -> None:
    settings = {**TEST_DBHA, "CHECK_INTERVAL": 60, "FALL": 1}
    with override_settings(DBHA=settings):
        assert dbha.available_db() == "default"
        primary = cluster.servers["default"]
        sql = "select pid from pg_stat_activity where application_name = 'dbha'"
        before = primary.query(sql)
        primary.query(f"select pg_terminate_backend({before})")
        wait_for(lambda: primary.query(sql) not in ("", before), what="a new probe session")
        assert status("default").state == "up"
        assert status("default").failures == 0
        assert dbha.available_db() == "default"


@contextlib.contextmanager
def all_connection_slots_taken() -> Iterator[list[psycopg.Connection[Any]]]:
    """Every connection slot of the primary held (superuser slots too)."""
    held: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(200):
            try:
                held.append(
                    psycopg.connect(
                        host="127.0.0.1",
                        port=PG_PORTS["default"],
                        user="postgres",
                        dbname="postgres",
                        connect_timeout=5,
                    )
                )
            except psycopg.OperationalError as e:
                if "too many clients" not in str(e):
                    raise
                break
        else:
            pytest.fail("the server never ran out of connection slots")
        yield held
    finally:
        for connection in held:
            connection.close()


def test_a_writer_without_free_connection_slots_is_down_for_writes(cluster: Cluster) -> None:
    assert dbha.available_db() == "default"  # its kept session holds a slot
    with all_connection_slots_taken():
        dbha.report_failure("default")
        wait_for(lambda: status("default").state == "down", what="the full server")
        reason = status("default").last_error or ""
        assert reason.startswith("new connections fail (server error: 53300"), reason
    wait_for(lambda: writer_is("default"), what="recovery with free slots")


def test_no_read_from_a_standby_once_its_lag_could_exceed_the_limit(cluster: Cluster) -> None:
    """No probe for a minute: a standby measured 0 s behind may be up to
    MAX_REPLICA_LAG behind that much later, and is dropped then."""
    settings = {**REPLICAS, "MAX_REPLICA_LAG": 1, "CHECK_INTERVAL": 60}
    with override_settings(DBHA=settings):
        dbha.available_db()
        both = {"failover1", "failover2"}
        wait_for(lambda: dbha.check_now() and {dbha.read_db() for _ in range(6)} == both,
                 what="both standbys serving reads")  # fmt: skip
        measured = min(
            s.checked_at.timestamp() for s in dbha.status() if s.role == "standby" and s.checked_at
        )
        cluster.servers["failover1"].query("select pg_wal_replay_pause()")
        seen: list[tuple[float, str]] = []
        deadline = time.time() + 2.0
        while time.time() < deadline:
            seen.append((time.time(), dbha.read_db()))
            time.sleep(0.001)
        late = {alias for at, alias in seen if at > measured + 1.0}
        assert late == {"default"}, "no standby read past its lag bound"
        # A probe: failover2 is caught up again; failover1, paused, is not.
        cluster.servers["default"].query("create table if not exists tick(x int)")
        cluster.servers["default"].query("insert into tick values (1)")
        deadline = time.monotonic() + 10
        while status("failover1").lag in (None, 0.0) or (status("failover1").lag or 0) <= 1:
            assert time.monotonic() < deadline, "replay lag never grew"
            dbha.check_now()
            time.sleep(0.2)
        assert {dbha.read_db() for _ in range(20)} == {"failover2"}
        cluster.servers["failover1"].query("select pg_wal_replay_resume()")


@pytest.mark.parametrize("read_your_writes", [True, False])
def test_a_thread_reads_its_own_writes(cluster: Cluster, read_your_writes: bool) -> None:
    """failover1 replays nothing; its lag stays within a generous limit.
    With read-your-writes on, a thread's read-back never misses its write;
    off, reads on failover1 miss them (which shows the test can fail)."""
    settings = {**REPLICAS, "MAX_REPLICA_LAG": 30, "READ_YOUR_WRITES": read_your_writes}
    with override_settings(DBHA=settings):
        wait_for(lambda: {dbha.read_db() for _ in range(6)} == {"failover1", "failover2"},
                 what="both standbys serving reads")  # fmt: skip
        cluster.servers["failover1"].query("select pg_wal_replay_pause()")
        try:
            missing = 0
            for i in range(60):
                name = f"ryw-{read_your_writes}-{i}"
                Item.objects.create(name=name)
                if not Item.objects.filter(name=name).exists():
                    missing += 1
                connections.close_all()
                time.sleep(0.02)
        finally:
            cluster.servers["failover1"].query("select pg_wal_replay_resume()")
            # The cluster serves the next tests: leave no rows behind.
            cluster.servers["default"].query("delete from testapp_item where name like 'ryw-%'")
            cluster.pg.wait_replayed()
        if read_your_writes:
            assert missing == 0
            # Once probes show a standby has the writes, reads go there again.
            wait_for(lambda: dbha.read_db() != "default", what="reads back on standbys")
        else:
            assert missing > 0


def test_an_idle_standby_serves_a_threads_reads_again_after_its_write(cluster: Cluster) -> None:
    """After a WAL switch the primary's insert location sits past a segment
    header that nothing follows: a standby that replayed everything must
    still count as caught up (found by Django's own test suite)."""
    with override_settings(DBHA=REPLICAS):
        wait_for(lambda: dbha.read_db() != "default", what="replica reads")
        cluster.servers["default"].query("select pg_switch_wal()")
        cluster.pg.wait_replayed()
        insert = cluster.servers["default"].query("select pg_current_wal_insert_lsn()")
        assert insert.endswith("000028"), f"{insert}: 40 bytes into a segment"
        dbha.ModelDatabaseRouter().db_for_write(Item)  # a write, as far as dbha knows
        assert dbha.read_db() == "default", "until a probe shows a standby has it"
        wait_for(lambda: dbha.read_db() != "default", timeout=5, what="a caught-up standby")


def test_reads_in_an_atomic_block_on_the_writer_stay_on_the_writer(cluster: Cluster) -> None:
    from django.db import transaction

    with override_settings(DBHA=REPLICAS):
        wait_for(lambda: dbha.read_db() != "default", what="replica reads")
        router = dbha.ModelDatabaseRouter()
        with transaction.atomic(using="default"):
            assert router.db_for_read(Item) == "default"
            with transaction.atomic(using="default"):
                assert router.db_for_read(Item) == "default"
            assert router.db_for_read(Item) == "default", "the outer block is still open"
        assert router.db_for_read(Item) != "default"
        # A block on another alias pins nothing.
        with transaction.atomic(using="failover1"):
            assert router.db_for_read(Item) != "default"

        def elsewhere() -> str:
            seen: list[str] = []
            thread = threading.Thread(target=lambda: seen.append(dbha.read_db()))
            thread.start()
            thread.join()
            return seen[0]

        # Settings changed inside a block (as tests do): it still counts.
        new_settings = override_settings(DBHA={**REPLICAS, "MAX_REPLICA_LAG": 6})
        with transaction.atomic(using="default"), new_settings:
            wait_for(lambda: elsewhere() != "default", what="replica reads, new settings")
            assert router.db_for_read(Item) == "default"
        connections.close_all()


# --- process-level defects -------------------------------------------------------------------


def test_a_child_forked_while_another_thread_closes_dbha_gets_answers(cluster: Cluster) -> None:
    """The start lock inherited locked from a closing thread must not hang
    the child's first call."""
    assert dbha.available_db() == "default"
    stop = threading.Event()

    def churn() -> None:
        for _ in range(10_000):
            if stop.is_set():
                return
            dbha.close()
            dbha.available_db()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(30):
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)  # a hung child dies rather than hangs the test
                code = 1
                with contextlib.suppress(BaseException):
                    code = 0 if dbha.available_db() in PG_PORTS else 2
                os._exit(code)
            _, code = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(code) == 0, "the child hung or failed"
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(timeout=30)


def test_a_transaction_opened_before_dbha_started_keeps_reads_on_the_writer(
    cluster: Cluster,
) -> None:
    """Found by Django's own test suite under `--parallel`: a TestCase's
    class-level atomic blocks open before a worker's first dbha call, in the
    parent before the fork; their reads must still stay on the writer."""
    from django.db import transaction

    router = dbha.ModelDatabaseRouter()
    with override_settings(DBHA=REPLICAS):
        wait_for(lambda: dbha.read_db() != "default", what="replica reads")
        dbha.close()
        with transaction.atomic(using="default"):
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)
                code = 1
                with contextlib.suppress(BaseException):
                    # The child's first call, inside the parent's block.
                    code = 0 if router.db_for_read(Item) == "default" else 2
                os._exit(code)
            _, code = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(code) == 0, "the child read from a standby"
            # The parent's first call after the restart, inside the block.
            assert router.db_for_read(Item) == "default"
            with transaction.atomic(using="default"):
                assert router.db_for_read(Item) == "default"
            assert router.db_for_read(Item) == "default", "the outer block is open"
        assert router.db_for_read(Item) != "default"
        connections.close_all()


def test_close_returns_while_a_log_handler_calls_dbha(cluster: Cluster) -> None:
    calls: list[int] = []

    class Asks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            time.sleep(0.05)  # still delivering while close() runs
            calls.append(len(dbha.status()))

    handler = Asks()
    logger = logging.getLogger("dbha")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for _ in range(3):
            dbha.available_db()  # its first round logs a few lines
            closer = threading.Thread(target=dbha.close)
            closer.start()
            closer.join(timeout=15)
            assert not closer.is_alive(), "close() hung"
        assert calls, "the handler ran"
    finally:
        logger.removeHandler(handler)
        dbha.close()


def test_scram_with_600000_iterations(cluster: Cluster) -> None:
    """PostgreSQL 16 lets `scram_iterations` go far past 100,000; a stored
    verifier with 600,000 (accepted by 15 too) must not mark the node down."""
    import base64
    import hashlib
    import hmac

    password, salt, iterations = "many-rounds", os.urandom(16), 600_000
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = base64.b64encode
    verifier = (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}$"
        f"{b64(hashlib.sha256(client_key).digest()).decode()}:{b64(server_key).decode()}"
    )
    primary = cluster.servers["default"]
    primary.query(f"create user slow_scram password '{verifier}'")
    hba = primary.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("host all slow_scram 127.0.0.1/32 scram-sha-256\n" + original)
    primary.query("select pg_reload_conf()")
    try:
        entry = pg_settings(PG_PORTS["default"], USER="slow_scram", PASSWORD=password)
        settings = {**TEST_DBHA, "CONNECT_TIMEOUT": 10}
        with override_settings(DATABASES={"default": entry}, DBHA=settings):
            assert dbha.available_db() == "default"
            record = status("default")
            assert (record.state, record.role, record.last_error) == ("up", "primary", None)
    finally:
        hba.write_text(original)
        primary.query("select pg_reload_conf()")
        primary.query("drop user slow_scram")

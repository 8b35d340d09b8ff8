"""dbha's signals and log records against real PostgreSQL: each transition
is one signal, sent from the `dbha-events` thread; records carry structured
fields; the Rust side logs at the `dbha` logger's level; receivers that
raise or stall never disturb routing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.dispatch import Signal
from django.test import override_settings

import dbha
from dbha import signals
from dbha.testing import simulated_cluster
from tests.conftest import TEST_DBHA, Cluster, wait_for
from tests.workload import status, writer_is

SIGNALS = {
    "writer_changed": signals.writer_changed,
    "node_down": signals.node_down,
    "node_up": signals.node_up,
    "split_brain": signals.split_brain,
    "no_writer": signals.no_writer,
}


class Received:
    """Every dbha signal received: (name, arguments, thread name)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], str]] = []
        self.lock = threading.Lock()

    def receiver(self, name: str) -> Any:
        def receive(sender: Any, signal: Signal, **kwargs: Any) -> None:
            assert sender is dbha.ModelDatabaseRouter
            with self.lock:
                self.calls.append((name, kwargs, threading.current_thread().name))

        return receive

    def of(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [kwargs for n, kwargs, _ in self.calls if n == name]


@pytest.fixture
def received() -> Iterator[Received]:
    got = Received()
    receivers = {name: got.receiver(name) for name in SIGNALS}
    for name, signal in SIGNALS.items():
        signal.connect(receivers[name], dispatch_uid=f"test-{name}")
    try:
        yield got
    finally:
        for name, signal in SIGNALS.items():
            signal.disconnect(dispatch_uid=f"test-{name}")


def test_each_transition_is_one_signal(cluster: Cluster, received: Received) -> None:
    assert dbha.available_db() == "default"
    time.sleep(0.5)
    assert received.calls == [], "a process's first findings are logged, not signalled"

    cluster.servers["default"].kill()
    wait_for(lambda: received.of("no_writer"), what="no_writer")
    cluster.servers["failover2"].promote()
    wait_for(lambda: writer_is("failover2"), what="the promotion")
    cluster.servers["default"].start()  # un-rewound: a second primary
    wait_for(lambda: received.of("split_brain"), what="split_brain")
    time.sleep(1)  # several more rounds: nothing is sent twice

    reason = received.of("node_down")[0]["reason"]
    assert reason in {"connection refused", "closed by server before answering"}
    assert received.of("node_down") == [{"group": "default", "alias": "default", "reason": reason}]
    assert received.of("no_writer") == [{"group": "default"}]
    assert received.of("writer_changed") == [
        {"group": "default", "old": "default", "new": "failover2"}
    ]
    assert received.of("node_up") == [{"group": "default", "alias": "default"}]
    assert received.of("split_brain") == [
        {"group": "default", "aliases": ["default"], "writer": "failover2"}
    ]
    assert {thread for _, _, thread in received.calls} == {"dbha-events"}


def test_records_carry_structured_fields(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dbha")
    dbha.available_db()
    cluster.servers["default"].kill()
    wait_for(lambda: status("default").state == "down", what="the kill")
    wait_for(lambda: any(getattr(r, "event", None) == "no_writer" for r in caplog.records),
             what="the record")  # fmt: skip
    down = next(r for r in caplog.records if getattr(r, "event", None) == "node_down")
    assert (down.group, down.alias, down.levelname) == ("default", "default", "WARNING")  # type: ignore[attr-defined]
    assert down.reason in down.getMessage()  # type: ignore[attr-defined]
    first = next(r for r in caplog.records if getattr(r, "event", None) == "writer_changed")
    assert (first.old, first.new) == (None, "default")  # type: ignore[attr-defined]
    # Every record has every field, so a formatter may name them all.
    for record in caplog.records:
        if record.name == "dbha":
            assert all(hasattr(record, field) for field in dbha.events.EXTRA_FIELDS)


def test_the_rust_side_logs_at_the_loggers_level(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    def probe_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "dbha" and r.levelno == logging.DEBUG]

    caplog.set_level(logging.INFO, logger="dbha")
    dbha.available_db()
    for _ in range(5):
        dbha.check_now()
    assert [r.getMessage() for r in probe_lines()] == [], "nothing below INFO is delivered"
    caplog.set_level(logging.DEBUG, logger="dbha")

    def primary_lines() -> list[logging.LogRecord]:
        dbha.check_now()
        return [r for r in probe_lines() if "primary" in r.getMessage() and " ms" in r.getMessage()]

    # The events thread looks at the level at least once a second.
    wait_for(primary_lines, what="a debug line of the primary's probe")


def test_a_receiver_that_raises_or_stalls_never_disturbs_routing(
    received: Received, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    def raises(**kwargs: Any) -> None:
        raise RuntimeError("a broken receiver")

    def stalls(**kwargs: Any) -> None:
        release.wait(timeout=30)

    signals.node_down.connect(raises, dispatch_uid="test-raises")
    signals.writer_changed.connect(stalls, dispatch_uid="test-stalls")
    try:
        with override_settings(DBHA=TEST_DBHA), simulated_cluster() as cluster:
            cluster.kill("default")
            cluster.promote("failover1")
            # The first writer_changed stalls the events thread; routing
            # follows the next failover regardless.
            started = time.monotonic()
            cluster.kill("failover1")
            cluster.promote("failover2")
            assert dbha.available_db() == "failover2"
            assert time.monotonic() - started < 5
            release.set()
            wait_for(lambda: len(received.of("writer_changed")) == 2, what="the queued signals")
        # The raising receiver was logged by Django, and the receivers after
        # it still ran.
        assert any("a broken receiver" in str(r.exc_info) for r in caplog.records if r.exc_info)
        assert received.of("node_down")[0]["alias"] == "default"
    finally:
        release.set()
        signals.node_down.disconnect(dispatch_uid="test-raises")
        signals.writer_changed.disconnect(dispatch_uid="test-stalls")

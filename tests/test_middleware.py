"""Read pinning across requests with `dbha.middleware.PinningMiddleware`,
on real PostgreSQL with replay paused on both standbys (so they miss every
new write while their lag stays within MAX_REPLICA_LAG): a client's reads
after its write go to the writer, in another thread and in an async view,
while other clients keep reading from the standbys (and miss the row,
which shows the test can fail)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from django.db import connections
from django.test import AsyncClient, Client, override_settings

import dbha
from dbha.middleware import COOKIE
from tests.conftest import TEST_DBHA, Cluster, wait_for

STANDBYS = ("failover1", "failover2")
T = TypeVar("T")


def in_thread(work: Callable[[], T]) -> T:
    """Runs `work` in a thread of its own, as another worker thread would."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(work())
        except BaseException as e:
            errors.append(e)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results[0]


@pytest.fixture
def paused_replay(cluster: Cluster) -> Iterator[Cluster]:
    settings = {**TEST_DBHA, "READS": "replicas", "MAX_REPLICA_LAG": 30}
    middleware = ["dbha.middleware.PinningMiddleware"]
    urls = "tests.pinning_urls"
    with override_settings(DBHA=settings, MIDDLEWARE=middleware, ROOT_URLCONF=urls):
        wait_for(lambda: {dbha.read_db() for _ in range(6)} == set(STANDBYS),
                 what="both standbys serving reads")  # fmt: skip
        for alias in STANDBYS:
            cluster.servers[alias].query("select pg_wal_replay_pause()")
        try:
            yield cluster
        finally:
            for alias in STANDBYS:
                cluster.servers[alias].query("select pg_wal_replay_resume()")
            cluster.servers["default"].query("delete from testapp_item where name like 'pin-%'")
            cluster.pg.wait_replayed()
            connections.close_all()


def get(client: Client, url: str) -> dict[str, Any]:
    response = client.get(url)
    assert response.status_code == 200, response.content
    body: dict[str, Any] = response.json()
    return body


def test_a_clients_reads_after_its_write_see_it_in_another_thread(paused_replay: Cluster) -> None:
    writer = Client()
    wrote = in_thread(lambda: get(writer, "/write?name=pin-1"))
    assert wrote["db"] == "default"
    assert COOKIE in writer.cookies, "a request that wrote pins its client"

    # The same client, served by another thread: reads go to the writer.
    for _ in range(4):
        read = in_thread(lambda: get(writer, "/read?name=pin-1"))
        assert read == {"db": "default", "found": True}

    # Another client has no pin: its reads go to the standbys, which have
    # not replayed the row.
    stranger = Client()
    reads = [in_thread(lambda: get(stranger, "/read?name=pin-1")) for _ in range(4)]
    assert {r["db"] for r in reads} <= set(STANDBYS)
    assert not any(r["found"] for r in reads)
    assert COOKIE not in stranger.cookies, "reading pins nothing"


def test_a_forged_cookie_pins_nothing(paused_replay: Cluster) -> None:
    forger = Client()
    forger.cookies[COOKIE] = '{"default":99999999999999}'
    read = in_thread(lambda: get(forger, "/read?name=pin-x"))
    assert read["db"] in STANDBYS


def test_reads_after_a_write_in_the_same_request_see_it(paused_replay: Cluster) -> None:
    # Read-your-writes off for threads: the middleware still keeps the rest
    # of the request that wrote on nodes that have its write.
    settings = {**TEST_DBHA, "READS": "replicas", "MAX_REPLICA_LAG": 30, "READ_YOUR_WRITES": False}
    with override_settings(DBHA=settings):
        wait_for(lambda: {dbha.read_db() for _ in range(6)} == set(STANDBYS), what="new settings")
        client = Client()
        for i in range(4):
            read = in_thread(lambda i=i: get(client, f"/write-then-read?name=pin-r{i}"))
            assert read == {"db": "default", "found": True}
        # Without the middleware the same view misses its own write.
        with override_settings(MIDDLEWARE=[]):
            misses = [
                in_thread(lambda i=i: get(Client(), f"/write-then-read?name=pin-m{i}"))
                for i in range(4)
            ]
        assert not any(r["found"] for r in misses)


def test_an_async_view_is_pinned_too(paused_replay: Cluster) -> None:
    writer = Client()
    in_thread(lambda: get(writer, "/write?name=pin-a"))
    pinned = AsyncClient()
    pinned.cookies[COOKIE] = writer.cookies[COOKIE].value
    stranger = AsyncClient()

    async def reads() -> tuple[dict[str, Any], dict[str, Any]]:
        mine = await pinned.get("/read-async?name=pin-a")
        theirs = await stranger.get("/read-async?name=pin-a")
        return mine.json(), theirs.json()

    mine, theirs = in_thread(lambda: asyncio.run(reads()))
    assert mine == {"db": "default", "found": True}
    assert theirs["db"] in STANDBYS
    assert not theirs["found"]

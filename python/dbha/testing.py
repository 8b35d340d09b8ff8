"""Helpers for your own test suite: make an alias go down, hang, come back
or be promoted without real servers, and see what your application does.
Only the probes are scripted; dbha's decisions (RISE/FALL, the newest
timeline, fencing, replica reads, `ON_ALL_DOWN`) and its signals are real.

    from dbha.testing import simulated_cluster

    def test_checkout_survives_a_failover():
        with simulated_cluster() as cluster:     # default primary, the rest standbys
            cluster.kill("default")
            cluster.promote("failover1")
            assert dbha.available_db() == "failover1"

Your application's queries still go to the aliases' real `DATABASES`
entries; point those at a test database the aliases share (for instance
with `TEST: {"MIRROR": "default"}`), or test the routing decisions alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from dbha import _core, conf
from dbha.status import NodeStatus, status

#: Probe rounds `settle()` runs at most for one change.
MAX_ROUNDS = 50


@dataclass(frozen=True)
class Node:
    """What a simulated alias answers every probe."""

    #: "up", or a failure: "refused" (killed), "timeout" (hung), "closed".
    state: str
    role: str | None
    lag: float | None
    timeline: int | None


class SimulatedCluster:
    """The scripted state of every alias dbha watches. Each change returns
    once dbha has acted on it."""

    def __init__(self, nodes: dict[str, Node]) -> None:
        self.nodes = nodes

    def kill(self, alias: str) -> None:
        """The server is gone: connections are refused."""
        self._set(alias, state="refused")

    def hang(self, alias: str) -> None:
        """The server stops answering (every probe times out)."""
        self._set(alias, state="timeout")

    def revive(self, alias: str) -> None:
        """The server answers again, in the role it had."""
        self._set(alias, state="up")

    def promote(self, alias: str) -> None:
        """The server becomes a primary on a timeline above every other."""
        newest = max((n.timeline or 0) for n in self.nodes.values())
        self._set(alias, state="up", role="primary", lag=0.0, timeline=newest + 1)

    def demote(self, alias: str, lag: float = 0.0) -> None:
        """The server answers as a standby (rewound and rejoined)."""
        self._set(alias, state="up", role="standby", lag=lag, timeline=None)

    def lag(self, alias: str, seconds: float) -> None:
        """A standby falls behind (or catches up) by `seconds`."""
        self._set(alias, lag=seconds)

    def _set(self, alias: str, **changes: object) -> None:
        if alias not in self.nodes:
            raise ValueError(f"dbha does not watch alias {alias!r}; it watches {list(self.nodes)}")
        self.nodes[alias] = replace(self.nodes[alias], **changes)  # type: ignore[arg-type]
        _apply(alias, self.nodes[alias])
        self.settle()

    def settle(self) -> None:
        """Runs probe rounds until every alias's status shows its script
        (RISE and FALL take their rounds, as in production)."""
        for _ in range(MAX_ROUNDS):
            _core.check_now()
            if all(_shows(record, self.nodes[record.alias]) for record in status()):
                return
        raise AssertionError(f"dbha did not settle on {self.nodes}: {status()}")


@contextmanager
def simulated_cluster(primary: str | None = None) -> Iterator[SimulatedCluster]:
    """Scripts every alias dbha watches: `primary` (default: the first of
    each group) answers as a primary on timeline 1, the others as standbys
    without lag. The checker restarts on the script; on exit, it restarts
    probing the real servers."""
    groups = _core.watched_groups(*conf.read_settings())
    firsts = {aliases[0] for _, aliases in groups} if primary is None else {primary}
    nodes = {
        alias: Node("up", "primary", 0.0, 1)
        if alias in firsts
        else Node("up", "standby", 0.0, None)
        for _, aliases in groups
        for alias in aliases
    }
    _core.close()
    try:
        for alias, node in nodes.items():
            _apply(alias, node)
        cluster = SimulatedCluster(nodes)
        cluster.settle()
        yield cluster
    finally:
        _core.clear_simulation()
        _core.close()


def _apply(alias: str, node: Node) -> None:
    if node.state == "up":
        _core.simulate(alias, "up", node.role, node.lag, node.timeline)
    else:
        _core.simulate(alias, node.state)


def _shows(record: NodeStatus, node: Node) -> bool:
    if node.state != "up":
        return record.state == "down"
    return record.state == "up" and (node.role is None or record.role == node.role)

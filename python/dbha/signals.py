"""dbha's own signals, sent by the `dbha-events` thread (never by the
checker, never while it holds a lock) when the checker sees a change; a
process's first findings are logged, not signalled. Each is sent with
`sender=dbha.ModelDatabaseRouter`; a receiver that raises is logged by
Django (`django.dispatch`) and never propagated, and a slow one delays only
later signals, never routing.

- `writer_changed(group, old, new)`: writes of `group` go to `new` from now
  on; `old` was the writer before (`new` itself when writes resume after a
  time without a writer).
- `node_down(group, alias, reason)` and `node_up(group, alias)`.
- `split_brain(group, aliases, writer)`: the primaries in `aliases` take no
  writes while `writer` does: every write they take is lost.
- `no_writer(group)`: no node of the group takes writes (`ON_ALL_DOWN`).
"""

from __future__ import annotations

from typing import Any

from django.dispatch import Signal

writer_changed = Signal()
node_down = Signal()
node_up = Signal()
split_brain = Signal()
no_writer = Signal()

#: Event kind to the signal and the fields it is sent with.
SIGNALS: dict[str, tuple[Signal, tuple[str, ...]]] = {
    "writer_changed": (writer_changed, ("group", "old", "new")),
    "node_down": (node_down, ("group", "alias", "reason")),
    "node_up": (node_up, ("group", "alias")),
    "split_brain": (split_brain, ("group", "aliases", "new")),
    "no_writer": (no_writer, ("group",)),
}


def send(kind: str, fields: dict[str, Any]) -> None:
    """Sends the signal for a checker event (`dbha.events`)."""
    from dbha import ModelDatabaseRouter

    entry = SIGNALS.get(kind)
    if entry is None:
        return
    signal, names = entry
    arguments = {name: fields.get(name) for name in names}
    if kind == "split_brain":
        # The event's `new` is where writes go: the signal names it `writer`.
        arguments["writer"] = arguments.pop("new")
    signal.send_robust(sender=ModelDatabaseRouter, **arguments)

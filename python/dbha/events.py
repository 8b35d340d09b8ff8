"""The `dbha-events` thread: takes the checker's events and log records
from the Rust side and logs them on the `dbha` logger (with structured
`extra` fields), sends dbha's signals, and keeps the Rust side logging at
the logger's level. Routing never waits for it."""

from __future__ import annotations

import logging
import threading
from typing import Any

from dbha import _core

logger = logging.getLogger("dbha")
# A library's logger: the application decides where records go.
logger.addHandler(logging.NullHandler())

#: The `extra` fields of every record dbha logs (None where they do not
#: apply): `event` is the kind (`node_down`...), None for other records.
EXTRA_FIELDS = ("event", "group", "alias", "old", "new", "reason", "aliases")

#: How often the thread looks at the logger's level when nothing happens.
LEVEL_POLL = 1.0

#: How long `close()` waits for the thread to deliver what is queued (a
#: slow signal receiver is not waited for longer).
STOP_WAIT = 5.0


def log_level() -> int:
    return logger.getEffectiveLevel()


def start(queue: _core.EventQueue) -> threading.Thread:
    thread = threading.Thread(target=run, args=(queue,), name="dbha-events", daemon=True)
    thread.start()
    return thread


def stop(thread: threading.Thread) -> None:
    """Waits (bounded) for `thread` to deliver what was queued before it was
    told to stop; never for itself (a receiver that calls `dbha.close()`)."""
    if thread is not threading.current_thread():
        thread.join(STOP_WAIT)


def run(queue: _core.EventQueue) -> None:
    while True:
        _core.follow_log_level(logger.getEffectiveLevel())
        batch = queue.take(LEVEL_POLL)
        if batch is None:
            return
        for kind, level, message, first, fields in batch:
            try:
                deliver(kind, level, message, first, fields)
            except Exception:
                # A broken handler must not end the thread (and with it
                # every later event).
                logger.exception("dbha: could not deliver %s", kind or "a log record")


def deliver(
    kind: str | None, level: int, message: str, first: bool, fields: dict[str, Any]
) -> None:
    extra = {name: fields.get(name) for name in EXTRA_FIELDS}
    extra["event"] = kind
    logger.log(level, "%s", message, extra=extra)
    if kind is not None and not first:
        from dbha.signals import send

        send(kind, fields)

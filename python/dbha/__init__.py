"""Database high availability for Django.

A Rust health checker probes every database in the background of each
process; `available_db()` and `ModelDatabaseRouter` send queries to a healthy
server without ever waiting on a probe.
"""

import atexit

from dbha import signals as _signals  # noqa: F401  (resets on settings changes)
from dbha._core import (
    ModelDatabaseRouter,
    __version__,
    available_db,
    close,
    read_db,
    report_failure,
)
from dbha.exceptions import NoHealthyDatabase
from dbha.routing import use_writer
from dbha.status import NodeStatus, check_now, status

# Stop the threads before the interpreter finalises: the log thread must not
# try to enter an interpreter that is shutting down.
atexit.register(close)

__all__ = [
    "ModelDatabaseRouter",
    "NoHealthyDatabase",
    "NodeStatus",
    "__version__",
    "available_db",
    "check_now",
    "close",
    "read_db",
    "report_failure",
    "status",
    "use_writer",
]

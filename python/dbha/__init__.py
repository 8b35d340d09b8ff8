"""Database high availability for Django.

A Rust health checker probes every database in the background of each
process; `available_db()` and `ModelDatabaseRouter` send queries to a healthy
server without ever waiting on a probe.
"""

import atexit

# Imported for the Django signals they connect to: settings changes reset
# the checker, and `migrate` keeps off standbys.
from dbha import conf as _conf  # noqa: F401
from dbha import migrate as _migrate  # noqa: F401
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
from dbha.status import GroupStatus, NodeStatus, check_now, group_status, status

# Stop the threads before the interpreter finalises: the log thread must not
# try to enter an interpreter that is shutting down.
atexit.register(close)

__all__ = [
    "GroupStatus",
    "ModelDatabaseRouter",
    "NoHealthyDatabase",
    "NodeStatus",
    "__version__",
    "available_db",
    "check_now",
    "close",
    "group_status",
    "read_db",
    "report_failure",
    "status",
    "use_writer",
]

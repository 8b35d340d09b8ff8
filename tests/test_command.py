"""`manage.py dbha status|check` against a real primary and 2 streaming
standbys: the table (snapshots with ports, latencies, lags and times
normalised), the JSON, `--watch`, Ctrl-C, and the exit codes in each state."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import threading
import time
from datetime import datetime
from io import StringIO
from typing import TextIO

import pytest
from django.core.management import get_commands
from django.test import override_settings

import dbha
from dbha.management.commands.dbha import Command
from tests.conftest import TEST_DBHA, Cluster, wait_for
from tests.workload import status, writer_is

SECRET = "s3cret-password"
#: The test databases' USER and NAME: a DSN or a login would show it.
USER = "postgres"


def run(*argv: str, stdout: StringIO | None = None) -> tuple[int, str, str]:
    """Runs `manage.py dbha ...` as manage.py does (argument parsing, the
    system checks it asks for, CommandError to exit code), in this process,
    whose checker the tests watch. Returns the exit code, stdout, stderr."""
    out, err = stdout or StringIO(), StringIO()
    code: int | str | None = 0
    try:
        Command(stdout=out, stderr=err).run_from_argv(["manage.py", "dbha", *argv])
    except SystemExit as e:
        code = e.code
    assert isinstance(code, int)
    for text in (out.getvalue(), err.getvalue()):
        assert SECRET not in text
        assert USER not in text
    return code, out.getvalue(), err.getvalue()


def normalise(table: str) -> str:
    """The table with what changes from run to run replaced, keeping every
    column where it is: ports, latencies, lags and times."""
    table = re.sub(r"(?<=127\.0\.0\.1:)\d+", lambda m: "P" * len(m[0]), table)
    # A killed server refuses, or closes a connection it accepted as it died.
    table = table.replace("closed by server before answering", "connection refused")
    table = re.sub(r"\d+ (s|min|h) ago$", "# s ago", table, flags=re.MULTILINE)
    # Right-aligned columns: the number and its padding become one width.
    for unit in ("ms", "s", "min", "h"):
        table = re.sub(
            rf" +\d+(\.\d)? {unit}(?= )", lambda m, u=unit: f"# {u}".rjust(len(m[0])), table
        )
    return table


HEALTHY = """\
group default: healthy | writer: default | readers: default (the writer)
  ALIAS      ENDPOINT         STATE    ROLE     TL     LAG   LATENCY  SINCE
  default    127.0.0.1:PPPPP  up       primary   1     # s      # ms  # s ago
  failover1  127.0.0.1:PPPPP  up       standby   -     # s      # ms  # s ago
  failover2  127.0.0.1:PPPPP  up       standby   -     # s      # ms  # s ago
"""

NO_WRITER = """\
group default: NO WRITER (last writer: default) | readers: none
  ALIAS      ENDPOINT         STATE    ROLE     TL     LAG   LATENCY  SINCE
  default    127.0.0.1:PPPPP  down     primary   1     # s      # ms  # s ago
    last error: connection refused
  failover1  127.0.0.1:PPPPP  up       standby   -     # s      # ms  # s ago
  failover2  127.0.0.1:PPPPP  up       standby   -     # s      # ms  # s ago
"""

PROMOTED = """\
group default: healthy | writer: failover1 | readers: failover1 (the writer)
  ALIAS      ENDPOINT         STATE    ROLE     TL     LAG   LATENCY  SINCE
  default    127.0.0.1:PPPPP  down     primary   1     # s      # ms  # s ago
    last error: connection refused
  failover1  127.0.0.1:PPPPP  up       primary   2     # s      # ms  # s ago
  failover2  127.0.0.1:PPPPP  up       standby   -     # s      # ms  # s ago
"""


def assert_fits_80_columns(text: str) -> None:
    assert max(len(line) for line in text.splitlines()) <= 80, text


def test_the_command_is_found_in_the_dbha_app() -> None:
    assert get_commands()["dbha"] == "dbha"


def test_status_in_each_state_with_its_exit_code(cluster: Cluster) -> None:
    code, out, err = run("status")
    assert (code, normalise(out), err) == (0, HEALTHY, "")
    assert_fits_80_columns(out)

    cluster.servers["default"].kill()
    wait_for(lambda: status("default").state == "down", what="the primary down")
    code, out, err = run("status")
    assert (code, normalise(out)) == (1, NO_WRITER)
    assert err == "CommandError: dbha: no writer in 'default'\n"
    assert_fits_80_columns(out)

    cluster.servers["failover1"].promote()
    wait_for(lambda: writer_is("failover1"), what="failover1 to take the writes")
    code, out, err = run("status")
    assert (code, normalise(out), err) == (0, PROMOTED, "")
    assert_fits_80_columns(out)


def test_json_is_one_document_without_secrets(cluster: Cluster) -> None:
    code, out, _ = run("status", "--json")
    assert code == 0
    document = json.loads(out)
    assert set(document) == {"healthy", "process", "groups"}
    assert document["healthy"] is True
    assert document["process"]["pid"] == os.getpid()
    assert document["process"]["version"] == dbha.__version__
    group = document["groups"]["default"]
    assert group["writer"] == "default"
    assert group["route"] == "healthy"
    assert group["aliases"] == ["default", "failover1", "failover2"]
    assert [node["alias"] for node in group["nodes"]] == group["aliases"]
    primary = group["nodes"][0]
    assert set(primary) == {
        *("alias", "group", "endpoint", "state", "since", "role", "latency", "lag"),
        *("timeline", "last_error", "checked_at", "successes", "failures", "is_writer"),
        *("is_reader", "split_brain", "probe_errors", "reports"),
    }
    assert primary["endpoint"] == f"127.0.0.1:{cluster.servers['default'].port}"
    assert (primary["state"], primary["role"], primary["is_writer"]) == ("up", "primary", True)
    # ISO 8601, with the offset.
    assert datetime.fromisoformat(primary["checked_at"]).utcoffset() is not None
    assert datetime.fromisoformat(primary["since"]).utcoffset() is not None


def test_json_of_a_group_without_writer(cluster: Cluster) -> None:
    cluster.servers["default"].kill()
    wait_for(lambda: status("default").state == "down", what="the primary down")
    code, out, _ = run("status", "--json", "--group", "default")
    assert code == 1
    group = json.loads(out)["groups"]["default"]
    assert (group["healthy"], group["route"], group["writer"]) == (False, "no_writer", None)
    assert group["nodes"][0]["last_error"] == "connection refused"
    assert group["nodes"][0]["probe_errors"]["refused"] >= 1

    # The application reports the last writer failing too: requests fail.
    dbha.report_failure("default")
    wait_for(lambda: dbha.group_status()[0].route == "failing", what="the group failing")
    code, out, _ = run("status")
    assert code == 1
    assert out.splitlines()[0] == (
        "group default: NO WRITER, FAILING FAST (last writer: default) | readers: none"
    )
    code, out, _ = run("status", "--json")
    group = json.loads(out)["groups"]["default"]
    assert (code, group["route"], group["nodes"][0]["reports"]) == (1, "failing", 1)


def test_the_exit_code_covers_the_groups_shown(cluster: Cluster) -> None:
    # failover2 alone: a standby, never a writer.
    spare = "spare-standby-that-never-takes-writes"
    groups = {"main": ["default", "failover1"], spare: ["failover2"]}
    with override_settings(DBHA={**TEST_DBHA, "GROUPS": groups}):
        code, out, err = run("status")
        assert code == 1
        assert err == f"CommandError: dbha: no writer in '{spare}'\n"
        assert_fits_80_columns(out)
        lines = out.splitlines()
        assert lines[0] == "group main: healthy | writer: default | readers: default (the writer)"
        assert "" in lines, "a blank line between groups"
        # Too long for one line: the readers on the next.
        assert lines[lines.index("") + 1 :][:2] == [
            f"group {spare}: NO WRITER (last writer: failover2)",
            "  readers: none",
        ]
        assert run("status", "--group", "main")[0] == 0
        assert run("check", "--group", "main")[0] == 0
        assert run("check", "--group", spare)[0] == 1


def test_colours_only_on_request_and_columns_stay(cluster: Cluster) -> None:
    plain = run("status")[1]
    assert "\x1b[" not in plain
    code, coloured, _ = run("--force-color", "status")
    assert code == 0
    assert "\x1b[" in coloured
    assert normalise(re.sub(r"\x1b\[[0-9;]*m", "", coloured)) == HEALTHY


def test_watch_redraws_in_place_on_a_terminal(cluster: Cluster) -> None:
    master, replica = os.openpty()
    try:
        with os.fdopen(replica, "w", closefd=False) as terminal:
            code = run_on(terminal, "status", "--watch", "--count", "2", "--interval", "0.05")
        assert code == 0
        screen = read_available(master)
    finally:
        os.close(master)
        os.close(replica)
    assert screen.count("\x1b[H\x1b[2J") == 2
    assert screen.count("group default: ") == 2


def run_on(terminal: TextIO, *argv: str) -> int:
    try:
        Command(stdout=terminal).run_from_argv(["manage.py", "dbha", *argv])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def read_available(fd: int) -> str:
    """What a terminal received so far (bounded: a few KB, a few reads)."""
    chunks = []
    for _ in range(100):
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            break
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks).decode()


def test_misconfigured_settings_exit_2_with_dbhas_message(cluster: Cluster) -> None:
    # Django's system checks would stop the command first (exit 1) unless
    # it opts out of them.
    with override_settings(DBHA={**TEST_DBHA, "FALL": 0}):
        code, out, err = run("status")
        assert (code, out) == (2, "")
        assert 'CommandError: dbha: DBHA["FALL"] = 0: must be' in err
        code, out, err = run("status", "--json")
        assert code == 2
        document = json.loads(out)
        assert document["healthy"] is False
        assert 'DBHA["FALL"] = 0' in document["error"]
        code, _, err = run("check")
        assert code == 2
    # A message about credentials names the key, never the password (run()
    # checks every output for it).
    credentials = {"nope": {"USER": "monitor", "PASSWORD": SECRET}}
    with override_settings(DBHA={**TEST_DBHA, "PROBE_CREDENTIALS": credentials}):
        code, out, err = run("status", "--json")
        assert code == 2
        assert 'DBHA["PROBE_CREDENTIALS"]["nope"]' in err
        assert 'DBHA["PROBE_CREDENTIALS"]["nope"]' in json.loads(out)["error"]
    code, _, err = run("status", "--group", "nope")
    assert code == 2
    assert "unknown dbha group 'nope'" in err


def test_watch_redraws_count_times(cluster: Cluster) -> None:
    code, out, _ = run("status", "--watch", "--count", "2", "--interval", "0.05")
    assert code == 0
    frames = out.split("\n\n")
    assert len(frames) == 2
    for frame in frames:
        header, table = frame.split("\n", 1)
        assert header.startswith("dbha status at ")
        assert normalise(table.rstrip("\n") + "\n") == HEALTHY
    code, out, _ = run("status", "--watch", "--json", "--count", "3", "--interval", "0.05")
    assert code == 0
    documents = [json.loads(line) for line in out.splitlines()]
    assert [d["healthy"] for d in documents] == [True, True, True]


def test_ctrl_c_ends_watch_with_the_last_states_exit_code(cluster: Cluster) -> None:
    out = StringIO()
    main = threading.main_thread().ident
    assert main is not None

    def interrupt_after_two_frames() -> None:
        wait_for(lambda: out.getvalue().count("dbha status at") >= 2, what="two frames")
        signal.pthread_kill(main, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_after_two_frames)
    interrupter.start()
    try:
        started = time.monotonic()
        code, _, err = run("status", "--watch", "--count", "600", "--interval", "0.05", stdout=out)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped from --watch")
    finally:
        interrupter.join(20)
    assert time.monotonic() - started < 20
    assert (code, err) == (0, "")
    assert out.getvalue().count("dbha status at") >= 2


def test_check_probes_now(cluster: Cluster) -> None:
    # Rounds a minute apart: only `check` can have seen the hung standby.
    with override_settings(DBHA={**TEST_DBHA, "CHECK_INTERVAL": 60}):
        assert run("status")[0] == 0
        cluster.servers["failover2"].pause()
        code, out, _ = run("status")
        assert code == 0
        assert "last error" not in out
        code, out, _ = run("check")
        assert code == 0
        assert "failover2" in out
        assert "    last error: timeout\n" in out

"""`manage.py dbha status|check`: every node's health as a table or as
JSON, with exit codes for scripts (0 healthy, 1 no writer, 2 misconfigured)."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.management.color import Style, no_style
from django.utils import timezone as django_timezone

from dbha import health as report
from dbha.status import GroupStatus, NodeStatus, check_now, group_status

HEALTHY, UNHEALTHY, MISCONFIGURED = 0, 1, 2

WIDTH = 80
INDENT = "  "
GAP = "  "

#: Column header, alignment ("<" or ">") and least width. The numeric columns
#: get room for their widest usual values, so that a table redrawn by
#: `--watch` keeps its columns in place.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("ALIAS", "<", 0),
    ("ENDPOINT", "<", 0),
    ("STATE", "<", len("unknown")),
    ("ROLE", "<", len("primary")),
    ("TL", ">", 0),
    ("LAG", ">", len("59 min")),
    ("LATENCY", ">", len("999.9 ms")),
    ("SINCE", "<", 0),
)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} s: must be from 0.05 to 3600")
    return value


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else duration(seconds)


def ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    seconds = max((now - moment).total_seconds(), 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h ago"
    return django_timezone.localtime(moment).strftime("%Y-%m-%d %H:%M")


def cells(node: NodeStatus, now: datetime) -> list[str]:
    return [
        node.alias,
        node.endpoint,
        node.state,
        node.role,
        "-" if node.timeline is None else str(node.timeline),
        "-" if node.lag is None else duration(node.lag),
        latency(node.latency),
        ago(node.since, now),
    ]


def group_lines(group: GroupStatus, style: Style) -> list[str]:
    """The group's verdict, writer and readers: one line, or two when that
    would pass the terminal's width."""
    if group.healthy:
        verdict, paint, writer = "healthy", style.SUCCESS, f" | writer: {group.writer}"
    else:
        # "failing": the application reported the last writer failing and
        # the probes agree, so requests fail at once instead of waiting.
        verdict = "NO WRITER, FAILING FAST" if group.route == "failing" else "NO WRITER"
        paint, writer = style.ERROR, f" (last writer: {group.last_writer or '-'})"
    if group.readers:
        readers = "readers: " + ", ".join(group.readers)
    else:
        readers = f"readers: {group.writer} (the writer)" if group.writer else "readers: none"
    head = f"group {group.name}: "
    if len(head + verdict + writer + " | " + readers) <= WIDTH:
        return [head + paint(verdict) + writer + " | " + readers]
    return [head + paint(verdict) + writer, INDENT + readers]


def notes(node: NodeStatus) -> list[str]:
    """What does not fit in a row, wrapped to the terminal's width."""
    lines = []
    if node.split_brain:
        lines.append("split brain: a primary kept from writes (older timeline or a second one)")
    if node.last_error:
        lines.append(f"last error: {node.last_error}")
    prefix = INDENT * 2
    return [
        wrapped
        for line in lines
        for wrapped in textwrap.wrap(
            line, WIDTH, initial_indent=prefix, subsequent_indent=prefix + "  "
        )
    ]


def table(groups: list[GroupStatus], style: Style, now: datetime) -> list[str]:
    """The groups and their nodes, for a terminal 80 columns wide."""
    rows = {id(node): cells(node, now) for group in groups for node in group.nodes}
    widths = [
        max([least, len(header), *(len(row[i]) for row in rows.values())])
        for i, (header, _, least) in enumerate(COLUMNS)
    ]

    last = len(COLUMNS) - 1

    def line(values: list[str], paint: Callable[[int, str], str]) -> str:
        # The last column is not padded: no trailing blanks inside colours.
        padded = [
            paint(i, value if i == last else f"{value:{align}{width}}")
            for i, (value, (_, align, _), width) in enumerate(
                zip(values, COLUMNS, widths, strict=True)
            )
        ]
        return INDENT + GAP.join(padded)

    lines: list[str] = []
    for group in groups:
        if lines:
            lines.append("")
        lines.extend(group_lines(group, style))
        lines.append(line([h for h, _, _ in COLUMNS], lambda _, text: style.MIGRATE_HEADING(text)))
        for node in group.nodes:
            state_style = {"up": style.SUCCESS, "down": style.ERROR}.get(node.state, style.WARNING)

            def paint(i: int, text: str, state_style: Callable[[str], str] = state_style) -> str:
                return state_style(text) if COLUMNS[i][0] == "STATE" else text

            lines.append(line(rows[id(node)], paint))
            lines.extend(style.WARNING(note) for note in notes(node))
    return lines


class Command(BaseCommand):
    help = (
        "Shows what dbha's health checker in this process sees: every node's "
        "state, role and lag, and each group's writer and readers. Exit code 0: "
        "every group shown has a writer; 1: one has none; 2: dbha is misconfigured."
    )

    # Django's system checks would stop the command at dbha's own settings
    # errors with a SystemCheckError (exit 1); the operator must get exit 2
    # and dbha's message instead. (A tuple: Django takes any empty sequence.)
    requires_system_checks = ()

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="{status,check}")
        status = actions.add_parser(
            "status",
            help="Show the status as the checker last saw it.",
            description="Show the status as the checker last saw it.",
        )
        self.add_common_arguments(
            status, "Print one JSON document (with --watch: one per line, per redraw)."
        )
        status.add_argument(
            "--watch", action="store_true", help="Redraw the status until interrupted (Ctrl-C)."
        )
        status.add_argument(
            "--interval",
            type=positive_seconds,
            default=1.0,
            metavar="SECONDS",
            help="Seconds between redraws with --watch (default: 1).",
        )
        # Bounds --watch, for tests and scripts.
        status.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)
        check = actions.add_parser(
            "check",
            help="Probe now, wait for the result, then show the status.",
            description="Probe now, wait for the result, then show the status.",
        )
        self.add_common_arguments(check, "Print one JSON document.")

    @staticmethod
    def add_common_arguments(parser: argparse.ArgumentParser, json_help: str) -> None:
        parser.add_argument("--group", metavar="G", help="Only this group (default: every group).")
        parser.add_argument("--json", action="store_true", help=json_help)

    def handle(self, *args: Any, **options: Any) -> None:
        colour = options["force_color"] or (not options["no_color"] and self.stdout.isatty())
        self.paint = self.style if colour else no_style()
        self.as_json: bool = options["json"]
        group: str | None = options["group"]
        if options["action"] == "status" and options["watch"]:
            return self.watch(group, options["interval"], options["count"])
        groups = self.fetch(group, probe=options["action"] == "check")
        self.write_status(groups, indent=2)
        self.exit_for(groups)

    def fetch(self, group: str | None, probe: bool = False) -> list[GroupStatus]:
        """The status (after a probe round if `probe`); exit 2 for invalid
        settings or an unknown group."""
        try:
            if probe:
                check_now(group)
            return group_status(group)
        except (ImproperlyConfigured, ValueError) as e:
            if self.as_json:
                self.stdout.write(json.dumps(report.error_document(str(e)), indent=2))
            raise CommandError(str(e), returncode=MISCONFIGURED) from e

    def watch(self, group: str | None, interval: float, count: int | None) -> None:
        # A terminal gets the table redrawn in place; a pipe or a file gets
        # one frame after another.
        clear = self.stdout.isatty() and os.environ.get("TERM") != "dumb"
        groups: list[GroupStatus] | None = None
        frames = 0
        try:
            while count is None or frames < count:
                if frames:
                    time.sleep(interval)
                groups = self.fetch(group)
                if clear and not self.as_json:
                    self.stdout.write("\x1b[H\x1b[2J", ending="")
                elif frames and not self.as_json:
                    self.stdout.write("")
                if not self.as_json:
                    now = django_timezone.localtime(datetime.now(timezone.utc))
                    moment = now.strftime("%Y-%m-%d %H:%M:%S")
                    self.stdout.write(
                        f"dbha status at {moment}, every {interval:g} s (Ctrl-C ends)"
                    )
                self.write_status(groups, indent=None)
                self.stdout.flush()
                frames += 1
        except KeyboardInterrupt:
            self.stdout.write("")
        if groups is None:
            raise CommandError("dbha: interrupted before the first status", returncode=UNHEALTHY)
        self.exit_for(groups)

    def write_status(self, groups: list[GroupStatus], indent: int | None) -> None:
        if self.as_json:
            self.stdout.write(json.dumps(report.document(groups), indent=indent))
        else:
            now = datetime.now(timezone.utc)
            self.stdout.write("\n".join(table(groups, self.paint, now)))

    def exit_for(self, groups: list[GroupStatus]) -> None:
        failing = [group.name for group in groups if not group.healthy]
        if failing:
            names = ", ".join(repr(name) for name in failing)
            raise CommandError(f"dbha: no writer in {names}", returncode=UNHEALTHY)

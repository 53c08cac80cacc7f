"""What the management commands of every layer share (the operators' edge): argument types, and
their output, alike in every command: `--json` for scripts, plain words for people, refusals
that name the flag."""

import json
import os
from collections.abc import Mapping
from datetime import date
from decimal import Decimal

from django.core.management.base import CommandError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# The width of a command's tables when its output is a file or a pipe (a CI log, `| tee`), where
# rich would assume 80 columns and cut a benchmark's headers to "…" (COLUMNS still decides).
LOG_WIDTH = 200


def command_console(out, *, quiet: bool = False) -> Console:
    """rich's console for a command's output stream `out` (`self.stdout._out`): the terminal's
    width at a terminal, LOG_WIDTH columns otherwise; `quiet` (under `--json`) prints nothing."""
    width = None if out.isatty() or "COLUMNS" in os.environ else LOG_WIDTH
    return Console(file=out, quiet=quiet, width=width)


def positive_int(value: str) -> int:
    """argparse type for counts: a whole number of at least 1."""
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def progress_bar(console: Console, label: str) -> Progress:
    """rich's progress bar for long work, alike in every command: `label` (a format of the
    task, e.g. "{task.description}"), done of total, time elapsed and the time left."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )


def json_text(data) -> str:
    """What `--json` prints: one JSON document; amounts, ids and other exact values as strings
    (never floats), times in ISO 8601."""
    return json.dumps(data, indent=2, default=_json_value)


def _json_value(value) -> str:
    if isinstance(value, date):  # datetimes too
        return value.isoformat()
    return str(value)  # Decimal, UUID


def plain(value) -> str:
    """A value as a person reads it in a command's output, never a Python repr: yes/no, `-`
    for nothing, mappings as `name value` pairs, lists joined by commas."""
    if value is None or value == "" or value == {} or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(
            f"{str(key).replace('_', ' ')} {plain(item)}" for key, item in value.items()
        )
    if isinstance(value, list | tuple):
        return ", ".join(plain(item) for item in value)
    if isinstance(value, Decimal):
        return f"{value:f}"
    return str(value)


def flag_error(exc: Exception, flags: Mapping[str, str]) -> CommandError:
    """A service's refusal as the command's error, naming the flag the refused field came
    from when the message starts with that field: `reported: ...` -> `--reported: ...`,
    `amount '1e3' ...` -> `--amount: amount '1e3' ...`."""
    message = str(exc)
    for field, flag in flags.items():
        if message.startswith(f"{field}:"):
            return CommandError(flag + message.removeprefix(field))
        if message.startswith(f"{field} "):
            return CommandError(f"{flag}: {message}")
    return CommandError(message)

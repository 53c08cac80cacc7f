"""What the management commands of every layer share (the operators' edge): argument types, and
their output, alike in every command: `--json` for scripts, plain words for people, refusals
that name the flag."""

import argparse
import json
import os
import re
from collections.abc import Callable, Mapping
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

from gateway.boundary import printable_ascii

# The width of a command's tables when its output is a file or a pipe (a CI log, `| tee`), where
# rich would assume 80 columns and cut a benchmark's headers to "…" (COLUMNS still decides).
LOG_WIDTH = 200


def command_console(out, *, quiet: bool = False) -> Console:
    """rich's console for a command's output stream `out` (`self.stdout._out`): the terminal's
    width at a terminal, LOG_WIDTH columns otherwise; `quiet` (under `--json`) prints nothing."""
    width = None if out.isatty() or "COLUMNS" in os.environ else LOG_WIDTH
    return Console(file=out, quiet=quiet, width=width)


# The largest whole numbers PostgreSQL's integer and bigint hold: a count or size a command hands
# to SQL as an integer (a chunk of users, a LIMIT) stays within the first, a row's id the second.
PG_INTEGER_MAX = 2**31 - 1
PG_BIGINT_MAX = 2**63 - 1
# An operator's written reason (kept in audit rows as text): a few sentences, not a document.
REASON_MAX_LENGTH = 1000
_WHOLE_NUMBER = re.compile(r"[0-9]{1,30}")


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """argparse type for a whole number from `low` to `high` (ASCII digits, no sign), refused
    naming the range: `argument --port: invalid positive_int value: '99999' (a whole number
    from 1 to 65,535)`. Bounded so that no flag can reach a timedelta, a thread count or an SQL
    integer the code or PostgreSQL cannot take."""
    kind = "positive_int" if low >= 1 else "int"

    def whole_number(value: str) -> int:
        if _WHOLE_NUMBER.fullmatch(value) and low <= int(value) <= high:
            return int(value)
        raise argparse.ArgumentTypeError(
            f"invalid {kind} value: {_shown(value)} (a whole number from {low:,} to {high:,})"
        )

    whole_number.__name__ = kind
    return whole_number


# Counts and sizes: a whole number of at least 1 that PostgreSQL's integer holds.
positive_int = bounded_int(1, PG_INTEGER_MAX)
# A row's id (bigint).
record_id = bounded_int(1, PG_BIGINT_MAX)
# A TCP port to listen on.
port_number = bounded_int(1, 65_535)


def printable_text(max_length: int) -> Callable[[str], str]:
    """argparse type for free text an operator writes (a reason, a provider's name): at most
    `max_length` printable characters (str.isprintable: any script, spaces included). Refused,
    before anything is written, when it holds what PostgreSQL cannot store as text (a NUL; an
    unpaired surrogate: how Python passes on bytes of an argument that are not UTF-8, see
    gateway.boundary) or a control character (a tab, a newline). Empty text passes: whether a
    flag needs some is the command's to say (written_reason)."""

    def text(value: str) -> str:
        unprintable = next((char for char in value if not char.isprintable()), None)
        if unprintable is not None:
            raise argparse.ArgumentTypeError(
                f"holds {_character(unprintable)} at character {value.index(unprintable) + 1}; "
                "only printable UTF-8 text is taken (no NUL, tab, newline or other control "
                "character)"
            )
        if len(value) > max_length:
            raise argparse.ArgumentTypeError(f"{len(value):,} characters, at most {max_length:,}")
        return value

    text.__name__ = "text"
    return text


# A reason for the audit (`--reason`).
reason_text = printable_text(REASON_MAX_LENGTH)


def ascii_word(max_length: int) -> Callable[[str], str]:
    """argparse type for a name or an id (a client's name, a queue, a database, a URL): 1 to
    `max_length` printable ASCII characters without spaces (gateway.boundary.printable_ascii,
    as the input boundary takes a token)."""

    def word(value: str) -> str:
        if not printable_ascii(value, max_length=max_length):
            raise argparse.ArgumentTypeError(
                f"expected 1 to {max_length:,} printable ASCII characters without spaces, "
                f"got {_shown(value)}"
            )
        return value

    word.__name__ = "word"
    return word


def written_reason(reason: str, what: str) -> str:
    """`reason` when it says something, else CommandError as the services refuse a blank
    one (ReasonRequired): `<what> needs a written --reason`."""
    if not reason.strip():
        raise CommandError(f"{what} needs a written --reason")
    return reason


def _shown(value: str, limit: int = 40) -> str:
    """An argument as an error quotes it: its repr (escapes, one line), cut after `limit`."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def _character(char: str) -> str:
    if "\udc80" <= char <= "\udcff":  # Python's stand-in for a byte that is not UTF-8
        return f"byte 0x{ord(char) - 0xDC00:02x} (not UTF-8)"
    return f"{char!r}"


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

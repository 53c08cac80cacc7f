"""What each of `manage.py cutover`'s controls accepts: its sub-command, arguments, their types
and help (cutover.management.commands.cutover runs them)."""

import argparse
import uuid
from decimal import Decimal

from django.core.management.base import CommandParser

from cutover.phases import ORDER
from gateway.commands import ascii_word, bounded_int, positive_int, printable_text, reason_text
from gateway.models import ApiClient, ApiScope
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from ledger.selectors import BUFFER_ACCOUNTS

PHASES = [phase.value for phase in ORDER]
# Celery workers one backfill asks to help (`--helpers`): more than a run has ranges is idle.
MAX_BACKFILL_HELPERS = 1_000
# A balance API client's name (`--name`): a word, as `api:<name>` attributes its changes.
CLIENT_NAME_MAX_LENGTH = ApiClient._meta.get_field("name").max_length
client_name = ascii_word(CLIENT_NAME_MAX_LENGTH)
# Who reported a custody balance (`--source`), as custody_open stores it.
custody_source = printable_text(64)


def percent(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 100:
        raise ValueError(value)
    return number


def scope_list(value: str) -> list[str]:
    scopes = [scope.strip() for scope in value.split(",") if scope.strip()]
    if not scopes or set(scopes) - set(ApiScope.values):
        raise argparse.ArgumentTypeError(
            f"expected some of {','.join(ApiScope.values)}, got {value!r}"
        )
    return scopes


def limit_amount(value: str) -> Decimal:
    try:
        amount = amount_parse(value, "USDC")
    except InvalidAmount as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return amount


def cutover_arguments_add(parser: CommandParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = sub.add_parser("status", help="phase, flags, kill switch, discrepancies")
    status.add_argument("--json", action="store_true", help="print JSON")
    gates = sub.add_parser(
        "gates",
        help="evaluate the gate to the next phase, change nothing; exit 1 when it is not met",
    )
    gates.add_argument("--json", action="store_true", help="print JSON")

    advance = sub.add_parser(
        "advance",
        help="move to the next phase when its gate is met; in read_switch, "
        "`--to read_switch --percent N` raises the share of reads served by the ledger",
    )
    advance.add_argument("--to", required=True, choices=PHASES, help="the next phase")
    advance.add_argument(
        "--percent",
        type=percent,
        default=1,
        help="read_switch only: percentage of users reading from the ledger, 1..100 (1)",
    )
    advance.add_argument(
        "--force", action="store_true", help="advance although the gate is not met"
    )
    advance.add_argument(
        "--reason", type=reason_text, default="", help="why (required with --force)"
    )
    advance.add_argument("--json", action="store_true", help="print the audit record as JSON")

    rollback = sub.add_parser("rollback", help="emergency rollback to legacy in one step")
    rollback.add_argument(
        "--reason",
        type=reason_text,
        help="why (recorded in the audit trail; required unless --dry-run)",
    )
    rollback.add_argument(
        "--dry-run",
        action="store_true",
        help="run the whole rollback and undo it: prove it would succeed, change nothing",
    )
    rollback.add_argument("--json", action="store_true", help="print the audit record as JSON")

    backfill = sub.add_parser(
        "backfill",
        help="open ledger accounts with opening balances from the legacy balances "
        "(chunked, resumable, safe while mutations flow)",
    )
    backfill.add_argument(
        "--chunk-size", type=positive_int, default=500, help="users per transaction (500)"
    )
    backfill.add_argument(
        "--range-users",
        type=positive_int,
        default=None,
        help="users per range of a new run, each range with its own checkpoint, taken by "
        "one process or worker at a time (BACKFILL_RANGE_USERS)",
    )
    backfill.add_argument(
        "--helpers",
        type=bounded_int(0, MAX_BACKFILL_HELPERS),
        default=0,
        metavar="N",
        help="also ask N Celery workers (`cutover.backfill_ranges`, through --queue) to "
        "take the run's ranges beside this process (0: this process alone; at most "
        f"{MAX_BACKFILL_HELPERS:,})",
    )
    backfill.add_argument(
        "--queue",
        type=ascii_word(255),
        default=None,
        help="the Celery queue the helpers are asked through",
    )
    backfill.add_argument("--json", action="store_true", help="print the summary as JSON")

    reconcile = sub.add_parser(
        "reconcile",
        help="compare every user's legacy and ledger balance; record differences; exit 1 "
        "when any user differs",
    )
    reconcile.add_argument("--json", action="store_true", help="print the summary as JSON")

    client = sub.add_parser(
        "client", help="create a balance API client and print its bearer token once"
    )
    client.add_argument(
        "--name",
        type=client_name,
        required=True,
        help=f"a unique name for the caller: up to {CLIENT_NAME_MAX_LENGTH} printable ASCII "
        "characters, no spaces",
    )
    client.add_argument(
        "--user-id",
        type=uuid.UUID,
        default=None,
        help="restrict the client to this user's balance (default: any user); such a "
        "client never gets the credit or addresses scope",
    )
    client.add_argument(
        "--scopes",
        required=True,
        type=scope_list,
        help=f"comma-separated, some of {','.join(ApiScope.values)} (e.g. read,debit)",
    )
    client.add_argument(
        "--max-amount",
        type=limit_amount,
        default=None,
        help="the largest amount of one credit, debit or withdrawal (default: no cap)",
    )
    client.add_argument(
        "--daily-limit",
        type=limit_amount,
        default=None,
        help="the most moved in each direction (in: credits; out: debits and withdrawals) "
        "over any 24 hours (default: no cap)",
    )
    client.add_argument(
        "--reason", type=reason_text, default="", help="why, for the operator audit"
    )
    client.add_argument("--json", action="store_true", help="print JSON")

    custody = sub.add_parser(
        "custody",
        help="the system buffers' custody: book an opening balance from a provider's "
        "reported balance (once per currency), or show where custody stands",
    )
    custody_sub = custody.add_subparsers(dest="custody_action", required=True, metavar="ACTION")
    custody_open_parser = custody_sub.add_parser(
        "open",
        help="book the buffer of --currency at the balance its provider reports, against "
        "opening-balance equity (audited; refused if already open)",
    )
    custody_open_parser.add_argument(
        "--currency", required=True, choices=list(BUFFER_ACCOUNTS), help="the buffer's currency"
    )
    custody_open_parser.add_argument(
        "--reported",
        required=True,
        help="the provider's reported balance, a plain decimal (0 allowed, never negative)",
    )
    custody_open_parser.add_argument(
        "--source", type=custody_source, required=True, help="who reported it (e.g. circle, due)"
    )
    custody_open_parser.add_argument(
        "--reason", type=reason_text, required=True, help="why (recorded)"
    )
    custody_open_parser.add_argument("--json", action="store_true", help="print JSON")
    custody_status_parser = custody_sub.add_parser(
        "status", help="per currency: opened or not, the buffer's balance, open discrepancies"
    )
    custody_status_parser.add_argument("--json", action="store_true", help="print JSON")

    archive = sub.add_parser(
        "archive-legacy",
        help="Phase 5: after CUTOVER_LEGACY_ARCHIVE_AFTER (90d) in cutover, copy the legacy "
        "`balances` into the schema legacy_archive, empty it and close both to writes "
        "(audited; once: a second run changes nothing; afterwards no rollback)",
    )
    archive.add_argument("--reason", type=reason_text, required=True, help="why (recorded)")
    archive.add_argument("--json", action="store_true", help="print the archive as JSON")

    killswitch = sub.add_parser("killswitch", help="stop or resume every money mutation")
    killswitch.add_argument("state", choices=["on", "off"], help="on stops, off resumes")
    killswitch.add_argument("--reason", type=reason_text, required=True, help="why (recorded)")
    killswitch.add_argument("--json", action="store_true", help="print the audit record as JSON")

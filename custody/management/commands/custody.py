"""`python manage.py custody open|reconcile`: the system buffers against what Circle and Due
report. (`manage.py cutover custody open --reported X` books a figure an operator has from
elsewhere; `cutover custody status` shows where custody stands.)"""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from custody.services import SOURCES, custody_open_from_providers, custody_reconcile_from_providers
from cutover.actors import Actor
from cutover.exceptions import CutoverError
from gateway.commands import flag_error, json_text, plain, reason_text
from ledger.exceptions import LedgerError
from onchain.exceptions import OnchainError
from treasury.exceptions import TreasuryError


class Command(BaseCommand):
    help = (
        "Custody from the providers: `open` books each buffer's opening balance at what its "
        "custodian reports (Circle: USDC in our wallet; Due: USD), once per currency, audited; "
        "`reconcile` compares the buffers with what they report now and records differences "
        "(exit 1 when any differs)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        opening = sub.add_parser("open", help="book opening balances from the providers")
        opening.add_argument(
            "--currency",
            action="append",
            choices=sorted(SOURCES),
            help="only this buffer (repeatable; default: every buffer)",
        )
        opening.add_argument(
            "--reason", type=reason_text, required=True, help="why (recorded in the audit)"
        )
        opening.add_argument("--json", action="store_true", help="print JSON")
        reconcile = sub.add_parser("reconcile", help="compare the buffers with the providers")
        reconcile.add_argument("--json", action="store_true", help="print JSON")

    def handle(self, *args, **options):
        try:
            if options["action"] == "open":
                rows = [
                    {
                        "currency": o.currency,
                        "source": o.source,
                        "reported": str(o.reported),
                        "buffer_before": str(o.buffer_before),
                        "ledger_transaction_id": o.ledger_transaction_id,
                    }
                    for o in custody_open_from_providers(
                        actor=Actor.command_line(),
                        reason=options["reason"],
                        currencies=options["currency"],
                    )
                ]
                differing = 0
            else:
                comparisons = custody_reconcile_from_providers()
                rows = [
                    {
                        "currency": c.currency,
                        "source": c.source,
                        "ledger": str(c.ledger_balance),
                        "reported": str(c.reported),
                        "difference": str(c.difference),
                        "discrepancy_id": c.discrepancy_id,
                    }
                    for c in comparisons
                ]
                differing = sum(not c.agrees for c in comparisons)
        except (CutoverError, LedgerError, OnchainError, TreasuryError) as exc:
            raise flag_error(exc, {"reason": "--reason"}) from None
        if options["json"]:
            self.stdout.write(json_text({"custody": rows, "differing": differing}))
        else:
            for row in rows:
                self.stdout.write("  ".join(f"{key}={plain(value)}" for key, value in row.items()))
        if differing:
            raise CommandError(f"{differing} buffer(s) differ from their custodian", returncode=1)

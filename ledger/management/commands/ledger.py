"""`python manage.py ledger verify`: re-check every ledger rule from the stored rows."""

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ledger.selectors import ledger_integrity_checks


class Command(BaseCommand):
    help = (
        "Ledger operations. `verify` checks balanced transactions, cached balances and hash chains."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{verify}")
        verify = sub.add_parser(
            "verify",
            help="check every transaction balances, every cached balance equals its entries and "
            "every account's hash chain is intact; exits 1 naming what is wrong",
        )
        verify.add_argument("--json", action="store_true", help="print the result as JSON")

    def handle(self, *args, **options) -> None:
        checks = ledger_integrity_checks()
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "ok": all(c.ok for c in checks),
                        "checks": [
                            {
                                "name": c.name,
                                "description": c.description,
                                "checked": c.checked,
                                "ok": c.ok,
                                "problems": c.problems,
                            }
                            for c in checks
                        ],
                    },
                    indent=2,
                )
            )
        else:
            for check in checks:
                mark = self.style.SUCCESS("ok  ") if check.ok else self.style.ERROR("FAIL")
                self.stdout.write(
                    f"{mark} {check.name}: {check.description} ({check.checked} checked)"
                )
                for problem in check.problems:
                    self.stdout.write(f"       {problem}")
        failed = [c.name for c in checks if not c.ok]
        if failed:
            raise CommandError(f"ledger verify failed: {', '.join(failed)}")

"""`python manage.py bench posting`: benchmarks that print numbers beside their reference."""

import json
from contextlib import ExitStack

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.table import Table

from config.benchmarks import (
    bench_accounts_open,
    bench_users_in_phase,
    pgbench_binary,
    pgbench_measure,
    posting_measure,
)
from config.runtime import database_ready, positive_int, scratch_database
from cutover.phases import ORDER


class Command(BaseCommand):
    help = "Benchmarks. `posting`: our posting path side by side with pgbench on the same server."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{posting}")
        posting = sub.add_parser(
            "posting",
            help="postings/s and p50/p95/p99 of transaction_post from N concurrent clients (laid "
            "out as pgbench -j 2 lays out its own: two processes, clients as threads), then "
            "pgbench running an equivalent plain-SQL posting with the same client count, and the "
            "ratio",
        )
        posting.add_argument(
            "--clients",
            type=positive_int,
            nargs="+",
            default=[4],
            help="concurrent clients; several values run one after another (4)",
        )
        posting.add_argument(
            "--seconds", type=positive_int, default=10, help="seconds per measurement (10)"
        )
        posting.add_argument(
            "--accounts", type=positive_int, default=1000, help="accounts to spread over (1000)"
        )
        posting.add_argument(
            "--phase",
            choices=[phase.value for phase in ORDER],
            default=None,
            help="post through the balance path in this rollout phase (legacy write, ledger "
            "posting and compare in shadow), in a scratch database; default: transaction_post "
            "transfers between ledger accounts",
        )
        posting.add_argument("--json", action="store_true", help="print the results as JSON")

    def handle(self, *args, **options) -> None:
        try:
            pgbench_binary()
        except FileNotFoundError as exc:
            raise CommandError(str(exc)) from None
        if options["accounts"] < 2:
            raise CommandError("--accounts: at least 2 accounts are needed")
        console = Console(file=self.stdout._out, quiet=options["json"])
        rows = []
        phase = options["phase"]
        path = f"balance path ({phase})" if phase else "transaction_post"
        with ExitStack() as stack:
            stack.enter_context(database_ready(console.print))
            if phase:
                stack.enter_context(scratch_database("bench"))
                console.print(f"Opening {options['accounts']} users in {phase} ...")
                targets = bench_users_in_phase(options["accounts"], phase)
            else:
                console.print(f"Opening {options['accounts']} bench accounts ...")
                targets = bench_accounts_open(options["accounts"])
            for clients in options["clients"]:
                console.print(f"{clients} clients: {path} for {options['seconds']} s ...")
                ours = posting_measure(clients, options["seconds"], targets)
                console.print(f"{clients} clients: pgbench for {options['seconds']} s ...")
                reference = pgbench_measure(clients, options["seconds"], options["accounts"])
                ratio = (
                    ours["per_second"] / reference["per_second"] if reference["per_second"] else 0
                )
                rows.append(
                    {
                        "clients": clients,
                        "ours": ours,
                        "pgbench": reference,
                        "ratio": round(ratio, 3),
                    }
                )
        if options["json"]:
            self.stdout.write(
                json.dumps({"benchmark": "posting", "path": path, "results": rows}, indent=2)
            )
            return
        table = Table(title=f"bench posting: {path} vs pgbench plain-SQL posting")
        for column in (
            "clients",
            "ours/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "pgbench/s",
            "pgbench avg ms",
            "ratio",
        ):
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(
                str(row["clients"]),
                f"{row['ours']['per_second']:.0f}",
                f"{row['ours']['p50_ms']:.2f}",
                f"{row['ours']['p95_ms']:.2f}",
                f"{row['ours']['p99_ms']:.2f}",
                f"{row['pgbench']['per_second']:.0f}",
                f"{row['pgbench']['latency_avg_ms']:.2f}",
                f"{row['ratio']:.2f}",
            )
        console.print(table)

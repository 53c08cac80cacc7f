"""`python manage.py rehearse`: the whole product rehearsed on synthetic users and traffic."""

import json
import random
import uuid

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from config.rehearsal import invariants_check, latency_figures, traffic_run, users_open
from config.runtime import database_ready, positive_int


class Command(BaseCommand):
    help = (
        "Rehearse on synthetic users: open accounts with opening balances, drive concurrent "
        "transfers, credits and debits (with duplicate deliveries and overdraft attempts) "
        "through the posting path from several processes, then check every invariant and "
        "print a report. Without DATABASE_URL it runs on the embedded PostgreSQL."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--users", type=positive_int, default=500, help="synthetic users (500)")
        parser.add_argument(
            "--workers", type=positive_int, default=4, help="concurrent worker processes (4)"
        )
        parser.add_argument(
            "--operations", type=positive_int, default=8000, help="operations in all (8000)"
        )
        parser.add_argument("--seed", type=int, default=7, help="random seed (7)")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")

    def handle(self, *args, **options) -> None:
        if options["users"] < 2:
            raise CommandError("--users: at least 2 users are needed for transfers")
        console = Console(file=self.stdout._out, stderr=False, quiet=options["json"])
        rng = random.Random(options["seed"])
        namespace = f"rehearsal-{uuid.uuid4().hex[:12]}"
        with database_ready(console.print):
            with self._progress(console) as progress:
                task = progress.add_task("opening users", total=options["users"])
                account_ids, opening = users_open(
                    namespace,
                    options["users"],
                    rng,
                    on_user=lambda done: progress.update(task, completed=done),
                )
                task = progress.add_task("traffic", total=options["operations"])
                report, seconds = traffic_run(
                    namespace,
                    account_ids,
                    options["workers"],
                    options["operations"],
                    options["seed"],
                    on_tick=lambda done: progress.update(task, completed=done),
                )
            checks = invariants_check(account_ids, opening, report)
        summary = {
            "namespace": namespace,
            "users": options["users"],
            "workers": options["workers"],
            "operations": options["operations"],
            "postings": report.postings,
            "idempotent_replays": report.replays,
            "refused_overdrafts": report.refused_overdrafts,
            "seconds": round(seconds, 3),
            **latency_figures(report, seconds),
            "invariants": checks,
            "ok": all(check["ok"] for check in checks),
        }
        if options["json"]:
            self.stdout.write(json.dumps(summary, indent=2, default=str))
        else:
            self._print(console, summary)
        if not summary["ok"]:
            failed = ", ".join(c["name"] for c in checks if not c["ok"])
            raise CommandError(f"rehearsal failed: {failed}")

    @staticmethod
    def _progress(console: Console) -> Progress:
        return Progress(
            TextColumn("{task.description:<14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )

    @staticmethod
    def _print(console: Console, summary: dict) -> None:
        traffic = Table(title="Rehearsal: ledger traffic", show_header=False)
        for key in (
            "users",
            "workers",
            "operations",
            "postings",
            "idempotent_replays",
            "refused_overdrafts",
            "seconds",
            "postings_per_second",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "max_ms",
        ):
            traffic.add_row(key.replace("_", " "), str(summary[key]))
        console.print(traffic)
        invariants = Table(title="Invariants")
        invariants.add_column("check")
        invariants.add_column("checked", justify="right")
        invariants.add_column("result")
        invariants.add_column("detail")
        for check in summary["invariants"]:
            invariants.add_row(
                check["name"],
                str(check["checked"]),
                "[green]ok[/green]" if check["ok"] else "[red]FAIL[/red]",
                "; ".join(check["detail"]),
            )
        console.print(invariants)
        verdict = "[green]PASS[/green]" if summary["ok"] else "[red]FAIL[/red]"
        console.print(f"Rehearsal {summary['namespace']}: {verdict}")

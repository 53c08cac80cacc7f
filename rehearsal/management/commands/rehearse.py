"""`python manage.py rehearse`: a whole rollout rehearsed on synthetic users and traffic."""

import os
from decimal import Decimal
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from rich.console import Console
from rich.table import Table

from config.cockpit_charts import run_charts
from cutover.exceptions import CutoverError
from gateway.commands import bounded_int, command_console, json_text, positive_int, progress_bar
from rehearsal.bench_arguments import MAX_WORKERS
from rehearsal.rehearsal import Rehearsal
from rehearsal.report_html import report_html
from rehearsal.runtime import ScratchDatabaseError, database_ready, scratch_database


class Command(BaseCommand):
    help = (
        "Rehearse the whole rollout in a scratch database: legacy users in USDC and USD -> "
        "custody opened from the Circle and Due sandboxes -> a withdrawal of pre-shadow money "
        "-> backfill under traffic -> shadow (with an injected drift that reconciliation must "
        "catch and the gate must block on) -> read_switch 1/10/50/100 % -> strict -> cutover "
        "-> a conversion whose submit answer is lost -> rollback drill in two currencies "
        "(dry run first) -> custody reconciled, with duplicate deliveries and overdraft "
        "attempts in the traffic; then every invariant is checked and a report printed. "
        "Without DATABASE_URL it runs on the embedded PostgreSQL; with it, on a scratch "
        "database created (and dropped) on that server."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--users", type=positive_int, default=500, help="synthetic users (500)")
        parser.add_argument(
            "--workers",
            type=bounded_int(1, MAX_WORKERS),
            default=4,
            help=f"concurrent worker processes, at most {MAX_WORKERS} (4)",
        )
        parser.add_argument(
            "--operations",
            type=positive_int,
            default=2000,
            help="balance mutations per stage, over all workers (2000)",
        )
        parser.add_argument("--seed", type=int, default=7, help="random seed (7)")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument(
            "--html",
            type=Path,
            metavar="PATH",
            help="also write the report to PATH as one self-contained HTML file (the tables "
            "and the charts, inline: it names no address), to attach to a change request",
        )

    def handle(self, *args, **options) -> None:
        if options["users"] < 2:
            raise CommandError("--users: at least 2 users are needed")
        html_path = options["html"]
        # Said before the run, not after it: a rehearsal takes a while.
        if html_path is not None and html_path.is_dir():
            raise CommandError(f"--html: {html_path} is a directory; name the file to write")
        if html_path is not None and not os.access(html_path.parent, os.W_OK):
            raise CommandError(f"--html: cannot write into {html_path.parent}")
        console = command_console(self.stdout._out, quiet=options["json"])
        progress = progress_bar(console, "{task.description:<18}")
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        try:
            with database_ready(console.print), scratch_database("rehearsal") as name:
                console.print(f"Scratch database {name} (dropped at the end)")
                started = timezone.now()
                with progress:
                    report = Rehearsal(
                        users=options["users"],
                        workers=options["workers"],
                        operations=options["operations"],
                        seed=options["seed"],
                        on_progress=on_progress,
                    ).run()
                # The charts read the run's history, so before its scratch database is dropped.
                charts = run_charts(since=started, until=timezone.now()) if html_path else []
        except ScratchDatabaseError as exc:
            raise CommandError(str(exc)) from None
        except CutoverError as exc:
            raise CommandError(f"rehearsal stopped: {exc}") from None
        if options["json"]:
            self.stdout.write(json_text(report))
        else:
            self._print(console, report)
        if html_path is not None:
            html = report_html(report=report, run_charts=charts, generated_at=timezone.now())
            try:
                html_path.write_text(html, encoding="utf-8")
            except OSError as exc:
                raise CommandError(f"--html: cannot write {html_path}: {exc.strerror}") from None
            console.print(f"HTML report written to {html_path}")
        if not report["ok"]:
            failed = ", ".join(c["name"] for c in report["invariants"] if not c["ok"])
            raise CommandError(f"rehearsal failed: {failed}")

    @staticmethod
    def _print(console: Console, report: dict) -> None:
        stages = Table(
            title=f"Rollout rehearsal: {report['users']} users, {report['workers']} workers "
            "(latencies in ms)"
        )
        for column in ("stage", "ops", "applied", "dups", "refused", "mut/s", "p50", "p95", "p99"):
            stages.add_column(
                column, justify="left" if column == "stage" else "right", no_wrap=True
            )
        for s in report["stages"]:
            stages.add_row(
                s["stage"],
                str(s["operations"]),
                str(s["applied"]),
                str(s["replays"]),
                str(s["refused_overdrafts"] + s["refused_other"]),
                f"{s['mutations_per_second']:.0f}",
                f"{s['p50_ms']:.1f}",
                f"{s['p95_ms']:.1f}",
                f"{s['p99_ms']:.1f}",
            )
        console.print(stages)
        for s in report["stages"]:
            for note in s["notes"]:
                console.print(f"  {s['stage']}: {note}")
        gates = Table(title="Gates and their evidence")
        for column in ("transition", "result", "checks"):
            gates.add_column(column)
        for gate in report["gates"]:
            evidence = gate["evidence"]
            parts = [
                f"{'ok' if c['ok'] else 'NOT MET'} {c['name']} ({c['actual']})"
                for c in evidence.get("checks", [])
            ]
            if "proof" in evidence:
                parts.append(f"proof: {evidence['proof']['actual']}")
            if "read_percent_after" in evidence:
                parts = [
                    f"reads from the ledger: {evidence['read_percent_before']} % -> "
                    f"{evidence['read_percent_after']} % of users"
                ]
            if "legacy_rows_rebuilt" in evidence:
                parts.append(
                    f"legacy rows rebuilt from the ledger: {evidence['legacy_rows_rebuilt']}"
                )
            gates.add_row(gate["transition"], gate["result"], "; ".join(parts) or "-")
        console.print(gates)
        onchain = Table(title="USDC deposits and withdrawals through the Circle sandbox")
        for column in ("phase", "dep", "redeliv", "polled", "parked", "wd ok/ref/fail"):
            onchain.add_column(column, justify="left" if column == "phase" else "right")
        for column in ("in", "out", "buffer"):
            onchain.add_column(column, justify="right", no_wrap=True)
        for row in report["onchain"]:
            onchain.add_row(
                row["phase"],
                str(row["deposits"]),
                str(row["redeliveries"]),
                str(row["credited_by_poll"]),
                str(row["parked"]),
                f"{row['completed']}/{row['refused_by_circle']}/{row['failed_on_chain']}",
                f"{Decimal(row['deposited']):.2f}",
                f"{Decimal(row['withdrawn']):.2f}",
                f"{Decimal(row['buffer_change']):+.2f}",
            )
        console.print(onchain)
        treasury = report["treasury"]
        t = {k: Decimal(v) for k, v in treasury.items() if isinstance(v, str)}
        console.print(
            f"Treasury: withdrawals took the USDC buffer from {t['buffer_before']:.2f} to "
            f"{t['buffer_low']:.2f} (minimum {t['minimum']:.0f}); the settlement cycle's job "
            f"({'; '.join(treasury['jobs']) or 'none'}) brought it to "
            f"{t['buffer_after']:.2f} (target {t['target']:.0f})."
        )
        pre = report["pre_shadow_withdrawal"]
        console.print(
            f"Pre-shadow money: {Decimal(pre['amount']):.2f} USDC requested and sent in "
            f"{pre['requested_in']}, {pre['status']} in {pre['completed_in']}."
        )
        custody = "; ".join(
            f"{r['currency']} ledger {Decimal(r['ledger']):.2f}, {r['source']} "
            f"{Decimal(r['reported']):.2f}"
            for r in report["custody_reconciled"]
        )
        console.print(f"Custody at the end: {custody}.")
        invariants = Table(title="Invariants")
        for column in ("check", "result", "detail"):
            invariants.add_column(column)
        for check in report["invariants"]:
            invariants.add_row(
                check["name"],
                "[green]ok[/green]" if check["ok"] else "[red]FAIL[/red]",
                check["detail"],
            )
        console.print(invariants)
        verdict = "[green]PASS[/green]" if report["ok"] else "[red]FAIL[/red]"
        console.print(f"Rehearsal: {verdict}")

"""`python manage.py cutover ...`: the operators' controls of the migration."""

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.table import Table

from cutover.actors import Actor
from cutover.backfill import backfill_progress, backfill_run
from cutover.custody import custody_open
from cutover.exceptions import CutoverError, GateNotMet
from cutover.gates import gate_evaluate
from cutover.legacy_archive import LEGACY_TABLE, days_text, legacy_archive
from cutover.management.cutover_arguments import cutover_arguments_add
from cutover.operators import api_client_issue
from cutover.phase_machine import (
    kill_switch_set,
    phase_advance,
    phase_rollback,
    phase_rollback_rehearse,
)
from cutover.phases import flags_of, next_phase
from cutover.reconciliation import reconciliation_run
from cutover.selectors import (
    backfill_pending,
    custody_status,
    ledger_write_stats,
    legacy_archive_get,
    open_discrepancy_count,
    phase_state,
)
from cutover.tasks import backfill_helpers_send
from gateway.commands import (
    command_console,
    flag_error,
    json_text,
    plain,
    progress_bar,
)
from gateway.exceptions import GatewayError
from gateway.models import ApiClient, ApiScope
from ledger.exceptions import LedgerError


class Command(BaseCommand):
    help = (
        "The migration's controls: status, gates, advance, rollback, backfill, reconcile, "
        "killswitch, custody, archive-legacy. Every change is checked, audited and attributed "
        "to the OS user (cli:<user>); --json prints what a script reads. Exit status: 0 done "
        "(the gate met, reconciliation clean); 1 refused or failed, `gates` with a gate not "
        "met and `reconcile` with differences included (their report is printed first); 2 a "
        "bad argument."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        cutover_arguments_add(parser)

    def handle(self, *args, **options) -> None:
        self.console = command_console(self.stdout._out, quiet=options.get("json", False))
        action = options["action"]
        try:
            getattr(self, f"_{action.replace('-', '_')}")(options)
        except GateNotMet as exc:
            if options.get("json"):
                self.stdout.write(json_text(exc.evidence))
            raise CommandError(str(exc)) from None
        except (CutoverError, GatewayError, LedgerError) as exc:
            raise CommandError(str(exc)) from None

    def _emit(self, options, data: dict, shown: Table | str | None = None) -> None:
        """The data as JSON with --json; otherwise what a person reads, if there is any."""
        if options.get("json"):
            self.stdout.write(json_text(data))
        elif shown is not None:
            self.console.print(shown)

    def _status(self, options) -> None:
        state = phase_state()
        stats = ledger_write_stats(state.entered_at)
        data = {
            "phase": state.phase,
            "entered_at": state.entered_at.isoformat(),
            "read_percent": state.read_percent,
            "flags": flags_of(state.phase),
            "kill_switch": state.kill_switch,
            "kill_switch_reason": state.kill_switch_reason,
            "open_discrepancies": open_discrepancy_count(),
            "ledger_writes_in_phase": {k: v for k, v in stats.items() if k != "success_rate"},
            "ledger_write_success_rate": stats["success_rate"],
            "next_phase": next_phase(state.phase),
            "legacy_archive": _archive_summary(legacy_archive_get()),
        }
        archive = data["legacy_archive"]
        shown = {
            **data,
            "flags": ", ".join(
                f"{name}={str(value).lower()}" for name, value in data["flags"].items()
            ),
            "legacy_archive": f"{archive['table']} -> {archive['archived_as']} "
            f"({archive['rows']} rows) at {archive['archived_at']} by {archive['archived_by']}"
            if archive
            else "no",
        }
        self._emit(options, data, _facts("cutover status", shown))

    def _gates(self, options) -> None:
        state = phase_state()
        target = next_phase(state.phase)
        if target is None:
            raise CommandError("cutover is terminal: there is no next gate")
        gate = gate_evaluate(state, target)
        table = Table(
            title=f"gate {state.phase} -> {target}: {'MET' if gate.passed else 'NOT MET'}"
        )
        for column in ("check", "required", "actual", "ok"):
            table.add_column(column)
        for check in gate.checks:
            table.add_row(check.name, check.required, check.actual, "yes" if check.ok else "NO")
        self._emit(options, gate.as_evidence(), table)
        if not gate.passed:
            # A script or CI job reads the verdict from the exit status (the report is above).
            raise CommandError(
                f"gate {gate.from_phase} -> {gate.to_phase} not met: {gate.failures()}",
                returncode=1,
            )

    def _advance(self, options) -> None:
        audit = phase_advance(
            to=options["to"],
            actor=Actor.command_line(),
            reason=options["reason"],
            force=options["force"],
            read_percent=options["percent"],
        )
        self._audited(options, audit)

    def _rollback(self, options) -> None:
        if options["dry_run"]:
            evidence = phase_rollback_rehearse()
            self._emit(
                options,
                {"would_succeed": True, "evidence": evidence},
                _facts("a rollback would succeed now; nothing changed", evidence),
            )
            return
        if not options["reason"]:
            raise CommandError("--reason is required (the audit trail records why)")
        audit = phase_rollback(actor=Actor.command_line(), reason=options["reason"])
        self._audited(options, audit)

    def _client(self, options) -> None:
        if ApiClient.objects.filter(name=options["name"]).exists():
            raise CommandError(f"--name: a client named {options['name']!r} already exists")
        for scope in (ApiScope.CREDIT, ApiScope.ADDRESSES):
            if options["user_id"] and scope in options["scopes"]:
                raise CommandError(
                    f"--scopes: a client restricted with --user-id may not have the {scope} scope"
                )
        client, token = api_client_issue(
            name=options["name"],
            user_id=options["user_id"],
            scopes=options["scopes"],
            max_amount=options["max_amount"],
            daily_limit=options["daily_limit"],
            actor=Actor.command_line(),
            reason=options["reason"],
        )
        data = {
            "name": client.name,
            "user_id": client.user_id,
            "scopes": client.scopes,
            "max_amount": client.max_amount,
            "daily_limit": client.daily_limit,
            "token": token,
        }
        if options.get("json"):
            self._emit(options, data)
        else:
            scope = f"user {client.user_id}" if client.user_id else "any user"
            self.console.print(
                f"client {client.name} ({scope}; {','.join(client.scopes)}); "
                "bearer token (shown once):"
            )
            self.stdout.write(token)

    def _custody(self, options) -> None:
        if options["custody_action"] == "status":
            rows = custody_status()
            table = Table(title="custody")
            for column in ("currency", "buffer", "balance", "opened", "source", "discrepancies"):
                table.add_column(column)
            for row in rows:
                opened = (
                    f"{row['opened_at']:%Y-%m-%d %H:%M} at {row['reported_at_opening']}"
                    if row["opened"]
                    else "NO"
                )
                table.add_row(
                    row["currency"],
                    row["buffer"],
                    str(row["buffer_balance"]),
                    opened,
                    row["source"] or "",
                    str(row["open_discrepancies"]),
                )
            self._emit(options, {"custody": rows}, table)
            return
        try:
            opening = custody_open(
                currency=options["currency"],
                reported=options["reported"],
                source=options["source"],
                actor=Actor.command_line(),
                reason=options["reason"],
            )
        except CutoverError as exc:
            raise flag_error(exc, {"reported": "--reported", "source": "--source"}) from None
        data = {
            "currency": opening.currency,
            "reported": str(opening.reported),
            "source": opening.source,
            "buffer_before": str(opening.buffer_before),
            "ledger_transaction_id": opening.ledger_transaction_id,
            "opened_by": opening.opened_by,
            "opened_at": opening.opened_at.isoformat(),
        }
        self._emit(
            options,
            data,
            f"custody {opening.currency} opened at {opening.reported} from {opening.source} "
            f"(buffer was {opening.buffer_before}; ledger transaction "
            f"{opening.ledger_transaction_id})",
        )

    def _archive_legacy(self, options) -> None:
        result = legacy_archive(actor=Actor.command_line(), reason=options["reason"])
        archive = result.archive
        data = {
            **_archive_summary(archive),
            "already_archived": not result.created,
            "operator_audit_id": result.audit.pk if result.audit else None,
        }
        if result.created:
            totals = ", ".join(f"{c} {t['total']}" for c, t in archive.totals.items())
            shown = (
                f"{LEGACY_TABLE} archived into {archive.archived_as}: {archive.rows} rows "
                f"({totals or 'none'}) after {data['days_in_cutover']} in cutover; "
                f"{LEGACY_TABLE} is empty and closed to writes (operator audit #{result.audit.pk})"
            )
        else:
            shown = (
                f"{LEGACY_TABLE} is already archived into {archive.archived_as} "
                f"({archive.archived_at:%Y-%m-%d %H:%M} UTC by {archive.archived_by}); "
                "nothing changed"
            )
        self._emit(options, data, shown)

    def _killswitch(self, options) -> None:
        audit = kill_switch_set(
            engaged=options["state"] == "on", actor=Actor.command_line(), reason=options["reason"]
        )
        self._audited(options, audit)

    def _audited(self, options, audit) -> None:
        data = {
            "audit_id": audit.pk,
            "action": audit.action,
            "from": audit.from_phase,
            "to": audit.to_phase,
            "actor": audit.actor,
            "reason": audit.reason,
            "evidence": audit.evidence,
        }
        self._emit(
            options,
            data,
            f"{audit.action}: {audit.from_phase} -> {audit.to_phase} by {audit.actor} "
            f"(audit #{audit.pk})",
        )

    def _backfill(self, options) -> None:
        if options["helpers"] < 0:
            raise CommandError("--helpers: 0 or more workers")
        total = backfill_pending()
        helpers, chunk_size = options["helpers"], options["chunk_size"]
        runs: list[int] = []
        with progress_bar(self.console, "backfill") as progress:
            task = progress.add_task("backfill", total=total)

            def on_run(run) -> None:
                runs.append(run.pk)
                if helpers:
                    backfill_helpers_send(
                        run, chunk_size=chunk_size, helpers=helpers, queue=options["queue"]
                    )

            def on_progress(done: int) -> None:
                if helpers:  # the helpers' users too: the run's so far, over its ranges
                    done = backfill_progress(run_id=runs[-1])["users_examined"]
                progress.update(task, completed=done)

            result = backfill_run(
                chunk_size=chunk_size,
                range_users=options["range_users"],
                on_progress=on_progress,
                on_run=on_run,
            )
        data = {
            "runs": result.runs,
            "resumed": result.resumed,
            "helpers": helpers,
            "users_pending_at_start": total,
            "users_examined": result.users_examined,
            "postings": result.postings,
            "amount": str(result.amount),
            "users_pending_now": backfill_pending(),
        }
        self._emit(options, data, _facts("backfill", data))

    def _reconcile(self, options) -> None:
        with progress_bar(self.console, "reconcile: chunks") as progress:
            task = progress.add_task("reconcile", total=None)
            result = reconciliation_run(
                triggered_by=Actor.command_line().name,
                on_progress=lambda done, chunks: progress.update(
                    task, completed=done, total=chunks
                ),
            )
        data = {
            "run_id": result.run_id,
            "phase": result.phase,
            "users_checked": result.users_checked,
            "differences": result.differences,
            "known_differences": result.known_differences,
            "new_discrepancies": result.new_discrepancies,
            "resolved": result.resolved,
            "legacy_total": str(result.legacy_total),
            "ledger_total": str(result.ledger_total),
            "seconds": round(result.seconds, 3),
            "clean": result.clean,
        }
        self._emit(options, data, _facts("reconciliation", data))
        if not result.clean:
            # Recorded as discrepancies; the exit status tells a script or CI job.
            raise CommandError(
                f"{result.differences} user(s) differ between legacy and ledger "
                f"(run {result.run_id})",
                returncode=1,
            )


def _facts(title: str, facts: dict) -> Table:
    """Named facts as a two-column table for a person."""
    table = Table(title=title, show_header=False)
    for key, value in facts.items():
        table.add_row(key.replace("_", " "), plain(value))
    return table


def _archive_summary(archive) -> dict | None:
    if archive is None:
        return None
    return {
        "table": archive.table_name,
        "archived_as": archive.archived_as,
        "rows": archive.rows,
        "totals": archive.totals,
        "cutover_entered_at": archive.cutover_entered_at.isoformat(),
        "archived_at": archive.archived_at.isoformat(),
        "days_in_cutover": days_text(archive.archived_at - archive.cutover_entered_at),
        "archived_by": archive.archived_by,
        "reason": archive.reason,
    }

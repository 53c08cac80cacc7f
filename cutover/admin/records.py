"""The migration's records, read-only: the audit trails, the legacy store and its archive, the
balance journal, reconciliations, strict failures, custody and task deliveries."""

from django.contrib import admin

from cutover.models import (
    BalanceMutation,
    CustodyDiscrepancy,
    CustodyOpening,
    LegacyArchive,
    LegacyBalance,
    OperatorAudit,
    PhaseAudit,
    ReconciliationRun,
    StrictFailure,
    TaskDelivery,
)
from ledger.admin import ReadOnlyAdmin
from ledger.templatetags.console import (
    amount_column,
    duration_column,
    table_column,
)


@admin.register(PhaseAudit)
class PhaseAuditAdmin(ReadOnlyAdmin):
    list_display = ("at", "actor", "action", "from_phase", "to_phase", "reason")
    list_filter = ("action", "to_phase")
    search_fields = ("actor", "reason")
    fields = ("at", "actor", "action", "from_phase", "to_phase", "reason", "evidence_shown")
    evidence_shown = table_column("evidence", "evidence")


@admin.register(OperatorAudit)
class OperatorAuditAdmin(ReadOnlyAdmin):
    list_display = ("at", "actor", "action", "target", "reason")
    list_filter = ("action",)
    search_fields = ("actor", "target", "reason")
    fields = ("at", "actor", "action", "target", "reason", "before_shown", "after_shown")
    before_shown = table_column("before", "before")
    after_shown = table_column("after", "after")


@admin.register(LegacyBalance)
class LegacyBalanceAdmin(ReadOnlyAdmin):
    list_display = ("user_id", "buying_power_shown", "currency", "updated_at")
    search_fields = ("=user_id",)
    fields = ("user_id", "buying_power_shown", "currency", "updated_at")
    buying_power_shown = amount_column("buying_power", "buying power")


@admin.register(LegacyArchive)
class LegacyArchiveAdmin(ReadOnlyAdmin):
    list_display = ("table_name", "archived_as", "rows", "archived_at", "archived_by", "reason")
    fields = (
        "table_name",
        "archived_as",
        "rows",
        "totals_shown",
        "cutover_entered_at",
        "min_time_shown",
        "archived_at",
        "archived_by",
        "reason",
    )
    totals_shown = table_column("totals", "totals")
    min_time_shown = duration_column(
        "archived after (in cutover)", lambda archive: archive.min_time_in_cutover
    )


@admin.register(BalanceMutation)
class BalanceMutationAdmin(ReadOnlyAdmin):
    list_display = (
        "reference",
        "user_id",
        "direction",
        "amount_shown",
        "phase",
        "ledger_status",
        "created_at",
    )
    list_filter = ("phase", "ledger_status", "mismatch", "direction")
    search_fields = ("reference", "=user_id", "correlation_id")
    fields = (
        "reference",
        "user_id",
        "direction",
        "amount_shown",
        "reason",
        "phase",
        "legacy_after_shown",
        "ledger_status",
        "ledger_transaction_id",
        "ledger_error",
        "mismatch",
        "legacy_time",
        "ledger_time",
        "correlation_id",
        "created_at",
    )
    amount_shown = amount_column("amount")
    legacy_after_shown = amount_column("legacy_balance_after", "legacy balance after")

    @admin.display(description="legacy write time")
    def legacy_time(self, obj: BalanceMutation) -> str:
        return _write_time(obj.legacy_us)

    @admin.display(description="ledger write time")
    def ledger_time(self, obj: BalanceMutation) -> str:
        return _write_time(obj.ledger_us)


def _write_time(microseconds: int | None) -> str:
    """A store's write time on a journal row; none when the phase did not write that store (or
    the row predates the measurement)."""
    return "not measured" if microseconds is None else f"{microseconds / 1000:,.3f} ms"


@admin.register(ReconciliationRun)
class ReconciliationRunAdmin(ReadOnlyAdmin):
    list_display = (
        "finished_at",
        "status",
        "phase",
        "chunks",
        "users_checked",
        "differences",
        "known_differences",
        "new_discrepancies",
        "resolved",
        "took",
        "triggered_by",
    )
    fields = (
        "started_at",
        "finished_at",
        "took",
        "status",
        "phase",
        "chunks",
        "users_checked",
        "differences",
        "known_differences",
        "new_discrepancies",
        "resolved",
        "legacy_total_shown",
        "ledger_total_shown",
        "triggered_by",
    )
    took = duration_column(
        "took", lambda run: run.finished_at - run.started_at if run.finished_at else None
    )
    # Totals over every currency: the values' own places, no currency.
    legacy_total_shown = amount_column("legacy_total", "legacy total", currency="")
    ledger_total_shown = amount_column("ledger_total", "ledger total", currency="")


@admin.register(StrictFailure)
class StrictFailureAdmin(ReadOnlyAdmin):
    list_display = ("at", "phase", "user_id", "reference", "error")


@admin.register(CustodyOpening)
class CustodyOpeningAdmin(ReadOnlyAdmin):
    list_display = (
        "currency",
        "reported_shown",
        "source",
        "buffer_before_shown",
        "ledger_transaction_id",
        "opened_by",
        "opened_at",
    )
    fields = (
        "currency",
        "reported_shown",
        "source",
        "buffer_before_shown",
        "ledger_transaction_id",
        "opened_by",
        "reason",
        "opened_at",
    )
    reported_shown = amount_column("reported", "reported")
    buffer_before_shown = amount_column("buffer_before", "buffer before")


@admin.register(CustodyDiscrepancy)
class CustodyDiscrepancyAdmin(ReadOnlyAdmin):
    """Read-only: recorded and resolved by the custody reconciliation
    (cutover.custody.custody_reconcile)."""

    list_display = (
        "currency",
        "source",
        "status",
        "difference_shown",
        "ledger_shown",
        "reported_shown",
        "occurrences",
        "first_seen_at",
        "last_seen_at",
        "resolved_at",
    )
    list_filter = ("status", "currency", "source")
    fields = (
        "currency",
        "source",
        "status",
        "difference_shown",
        "ledger_shown",
        "reported_shown",
        "occurrences",
        "first_seen_at",
        "last_seen_at",
        "resolved_at",
    )
    difference_shown = amount_column("difference", "difference (ledger - reported)")
    ledger_shown = amount_column("ledger_balance", "ledger")
    reported_shown = amount_column("reported", "reported")


@admin.register(TaskDelivery)
class TaskDeliveryAdmin(ReadOnlyAdmin):
    """Read-only: a dead message is not sent again from here (every task is periodic: its next
    run comes from beat); an operator finds why its process died (the worker's log, its memory)."""

    list_display = (
        "last_started_at",
        "task_name",
        "task_id",
        "status",
        "attempts",
        "duplicates",
        "finished_at",
        "error_summary",
    )
    list_filter = ("status", "task_name")
    search_fields = ("task_id",)
    ordering = ("-last_started_at",)

    @admin.display(description="why (failed, dead)")
    def error_summary(self, delivery: TaskDelivery) -> str:
        return delivery.error.strip().splitlines()[-1][:120] if delivery.error else ""

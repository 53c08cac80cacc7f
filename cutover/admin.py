"""The operators' console for the migration. Nothing here writes a model directly: every change
goes through the cutover services, which checks permissions and writes the audit trail."""

from datetime import timedelta
from decimal import Decimal

from django import forms
from django.contrib import admin, messages
from django.db.models import Exists
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone

from cutover.actors import Actor
from cutover.discrepancies import (
    APPROVE_PERMISSION,
    REQUEST_PERMISSION,
    TRIAGE_PERMISSION,
    discrepancy_investigate,
    discrepancy_known_difference_mark,
    discrepancy_repair_approve,
    discrepancy_repair_request,
)
from cutover.exceptions import CutoverError
from cutover.models import (
    UNRESOLVED,
    BalanceMutation,
    CustodyDiscrepancy,
    CustodyOpening,
    Discrepancy,
    DiscrepancyRepair,
    LegacyArchive,
    LegacyBalance,
    OperatorAudit,
    PhaseAudit,
    PhaseState,
    ReconciliationRun,
    RepairSide,
    StrictFailure,
    TaskDelivery,
    TriageStatus,
)
from cutover.phase_machine import kill_switch_set
from cutover.phases import flags_of
from cutover.selectors import (
    discrepancy_history,
    known_difference_for,
    known_difference_matching,
    store_balances,
)
from ledger.admin import ReadOnlyAdmin
from ledger.templatetags.console import (
    amount_column,
    amount_display,
    duration_column,
    moment_display,
    table_column,
)


class ReasonForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Recorded in the audit trail with your name.",
    )


class KillSwitchForm(ReasonForm):
    intent = forms.ChoiceField(
        choices=[("engage", "engage"), ("release", "release")], widget=forms.HiddenInput
    )


@admin.register(PhaseState)
class PhaseStateAdmin(ReadOnlyAdmin):
    list_display = ("phase", "read_percent", "entered_at", "kill_switch", "kill_switch_reason")
    readonly_fields = (
        "phase",
        "read_percent",
        "entered_at",
        "flags",
        "kill_switch",
        "kill_switch_reason",
        "kill_switch_changed_at",
        "updated_at",
    )
    change_form_template = "admin/cutover/phasestate_change_form.html"

    @admin.display(description="feature flags")
    def flags(self, obj: PhaseState) -> str:
        # As the environment sets them (USE_LEDGER_INTEGRATION=false), not as Python prints them.
        return ", ".join(
            f"{name}={str(value).lower() if isinstance(value, bool) else value}"
            for name, value in flags_of(obj.phase).items()
        )

    def get_urls(self):
        return [
            path(
                "kill-switch/",
                self.admin_site.admin_view(self.kill_switch_view),
                name="cutover_kill_switch",
            ),
            *super().get_urls(),
        ]

    def kill_switch_view(self, request: HttpRequest):
        state = PhaseState.objects.get(pk=1)
        form = KillSwitchForm(
            request.POST or None,
            initial={"intent": "release" if state.kill_switch else "engage"},
        )
        if request.method == "POST" and form.is_valid():
            # The intent the operator confirmed, never one recomputed now: if someone else
            # flipped the switch meanwhile, the service refuses and nothing changes.
            engage = form.cleaned_data["intent"] == "engage"
            try:
                kill_switch_set(
                    engaged=engage,
                    actor=Actor.for_user(request.user),
                    reason=form.cleaned_data["reason"],
                )
            except CutoverError as exc:
                self.message_user(request, f"Nothing changed: {exc}.", messages.ERROR)
            else:
                verb = "engaged: every money mutation is refused" if engage else "released"
                self.message_user(request, f"Kill switch {verb}.", messages.SUCCESS)
            return HttpResponseRedirect(reverse("admin:cutover_phasestate_change", args=[1]))
        engage = form["intent"].value() == "engage"
        context = {
            **self.admin_site.each_context(request),
            "title": "Engage the kill switch" if engage else "Release the kill switch",
            "engage": engage,
            "state": state,
            "form": form,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/cutover/kill_switch_confirm.html", context)


KNOWN_DIFFERENCE_FOR = {
    "1": ("1 day", timedelta(days=1)),
    "3": ("3 days", timedelta(days=3)),
    "7": ("7 days", timedelta(days=7)),
    "14": ("14 days", timedelta(days=14)),
    "30": ("30 days", timedelta(days=30)),
}


class InvestigateForm(forms.Form):
    note = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2, "cols": 60}),
        help_text="What you are looking into: kept in the operator audit with your name.",
    )


class KnownDifferenceForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2, "cols": 60}),
        help_text="Why this difference is expected: kept in the operator audit.",
    )
    expires_in = forms.ChoiceField(
        choices=[(key, label) for key, (label, _) in KNOWN_DIFFERENCE_FOR.items()],
        initial="7",
        help_text="Until then this exact difference does not count against the gates.",
    )


class RepairRequestForm(forms.Form):
    side = forms.ChoiceField(choices=RepairSide.choices, widget=forms.RadioSelect)
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2, "cols": 60}),
        help_text="Why this store is the wrong one: kept with the repair and in the audit.",
    )


@admin.register(Discrepancy)
class DiscrepancyAdmin(ReadOnlyAdmin):
    """Read-only; worked on its own page (cutover.discrepancies): investigated, accepted as a
    known difference until an expiry, or repaired (requested by one operator, approved by
    another)."""

    list_display = (
        "id",
        "status",
        "counted",
        "difference_shown",
        "user_id",
        "legacy_shown",
        "ledger_shown",
        "source",
        "phase",
        "occurrences",
        "last_seen_at",
    )
    list_filter = ("status", "source", "phase", "currency")
    search_fields = ("=user_id", "reference")
    difference_shown = amount_column("difference", "difference (legacy - ledger)")
    legacy_shown = amount_column("legacy_balance", "legacy")
    ledger_shown = amount_column("ledger_balance", "ledger")

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(known=Exists(known_difference_matching()))

    @admin.display(description="counts against the gates", boolean=True)
    def counted(self, discrepancy: Discrepancy) -> bool:
        return discrepancy.status in UNRESOLVED and not discrepancy.known

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path(
                "<int:discrepancy_id>/investigate/",
                view(self.investigate_view),
                name="cutover_discrepancy_investigate",
            ),
            path(
                "<int:discrepancy_id>/known-difference/",
                view(self.known_difference_view),
                name="cutover_discrepancy_known_difference",
            ),
            path(
                "<int:discrepancy_id>/repair/",
                view(self.repair_request_view),
                name="cutover_discrepancy_repair",
            ),
            path(
                "repairs/<int:repair_id>/approve/",
                view(self.repair_approve_view),
                name="cutover_discrepancy_repair_approve",
            ),
            *super().get_urls(),
        ]

    def change_view(self, request: HttpRequest, object_id, form_url="", extra_context=None):
        discrepancy = self.get_object(request, object_id)
        if discrepancy is None or not self.has_view_permission(request, discrepancy):
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        user = request.user
        repairs = list(discrepancy.repairs.order_by("-id"))
        legacy_now, ledger_now = store_balances(discrepancy.user_id, discrepancy.currency)
        unresolved = discrepancy.status in UNRESOLVED
        rule = known_difference_for(discrepancy)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Discrepancy {discrepancy.pk}",
            "opts": self.opts,
            "discrepancy": discrepancy,
            "status_label": TriageStatus(discrepancy.status).label,
            "counted": unresolved and rule is None,
            "rule": rule,
            "legacy_now": legacy_now,
            "ledger_now": ledger_now,
            "difference_now": (legacy_now or Decimal(0)) - (ledger_now or Decimal(0)),
            "repairs": repairs,
            "history": discrepancy_history(discrepancy.pk),
            "may_approve": user.has_perm(APPROVE_PERMISSION),
            "actor_name": Actor.for_user(user).name,
            "investigate_form": InvestigateForm()
            if unresolved
            and discrepancy.status != TriageStatus.INVESTIGATING
            and user.has_perm(TRIAGE_PERMISSION)
            else None,
            "known_form": KnownDifferenceForm()
            if unresolved and rule is None and user.has_perm(TRIAGE_PERMISSION)
            else None,
            "repair_form": RepairRequestForm()
            if unresolved and user.has_perm(REQUEST_PERMISSION)
            else None,
        }
        return TemplateResponse(request, "admin/cutover/discrepancy_detail.html", context)

    def _back(self, discrepancy_id: int) -> HttpResponseRedirect:
        return HttpResponseRedirect(
            reverse("admin:cutover_discrepancy_change", args=[discrepancy_id])
        )

    def _act(self, request: HttpRequest, discrepancy_id: int, form_class, act) -> HttpResponse:
        """POST only: the form, then the service; its outcome or its refusal as a message."""
        if request.method != "POST":
            return self._back(discrepancy_id)
        form = form_class(request.POST)
        if not form.is_valid():
            fields = ", ".join(form.errors)
            self.message_user(request, f"Nothing changed: {fields} missing.", messages.ERROR)
            return self._back(discrepancy_id)
        try:
            done = act(Actor.for_user(request.user), form.cleaned_data)
        except CutoverError as exc:
            self.message_user(request, f"Nothing changed: {exc}.", messages.ERROR)
        else:
            self.message_user(request, done, messages.SUCCESS)
        return self._back(discrepancy_id)

    def investigate_view(self, request: HttpRequest, discrepancy_id: int) -> HttpResponse:
        def act(actor, data):
            discrepancy_investigate(discrepancy_id=discrepancy_id, actor=actor, note=data["note"])
            return f"Discrepancy {discrepancy_id} is under investigation."

        return self._act(request, discrepancy_id, InvestigateForm, act)

    def known_difference_view(self, request: HttpRequest, discrepancy_id: int) -> HttpResponse:
        def act(actor, data):
            _, period = KNOWN_DIFFERENCE_FOR[data["expires_in"]]
            rule = discrepancy_known_difference_mark(
                discrepancy_id=discrepancy_id,
                actor=actor,
                reason=data["reason"],
                expires_at=timezone.now() + period,
            )
            return (
                f"Discrepancy {discrepancy_id} is a known difference of "
                f"{amount_display(rule.difference, rule.currency)} until "
                f"{moment_display(rule.expires_at)}: it does not count against the gates "
                "until then."
            )

        return self._act(request, discrepancy_id, KnownDifferenceForm, act)

    def repair_request_view(self, request: HttpRequest, discrepancy_id: int) -> HttpResponse:
        def act(actor, data):
            repair = discrepancy_repair_request(
                discrepancy_id=discrepancy_id,
                actor=actor,
                side=data["side"],
                reason=data["reason"],
            )
            return (
                f"Repair {repair.pk} requested on the {repair.side} side: it waits for "
                "another operator's approval."
            )

        return self._act(request, discrepancy_id, RepairRequestForm, act)

    def repair_approve_view(self, request: HttpRequest, repair_id: int) -> HttpResponse:
        repair = DiscrepancyRepair.objects.filter(pk=repair_id).first()
        if repair is None:
            self.message_user(request, f"There is no repair {repair_id}.", messages.ERROR)
            return HttpResponseRedirect(reverse("admin:cutover_discrepancy_changelist"))

        def act(actor, data):
            applied = discrepancy_repair_approve(repair_id=repair_id, actor=actor)
            store = "ledger" if applied.side == RepairSide.LEDGER else "legacy store"
            after = (
                applied.ledger_after
                if applied.side == RepairSide.LEDGER
                else (applied.legacy_after)
            )
            return (
                f"Repair {repair_id} applied: the {store} now holds "
                f"{amount_display(after, applied.discrepancy.currency)}; discrepancy "
                f"{applied.discrepancy_id} is repaired."
            )

        return self._act(request, repair.discrepancy_id, forms.Form, act)


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

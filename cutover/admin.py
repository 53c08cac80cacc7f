"""The operators' console for the migration. Nothing here writes a model directly: every change
goes through the cutover services, which checks permissions and writes the audit trail."""

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from cutover.actors import Actor
from cutover.exceptions import CutoverError
from cutover.models import (
    BalanceMutation,
    CustodyDiscrepancy,
    CustodyOpening,
    Discrepancy,
    LegacyArchive,
    LegacyBalance,
    PhaseAudit,
    PhaseState,
    ReconciliationRun,
    StrictFailure,
)
from cutover.phase_machine import kill_switch_set
from cutover.phases import flags_of
from cutover.reconciliation import discrepancy_resolve
from gateway.actions import action_confirm
from ledger.admin import ReadOnlyAdmin


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
        return ", ".join(f"{name}={value}" for name, value in flags_of(obj.phase).items())

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


class ResolveForm(forms.Form):
    note = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))


@admin.register(Discrepancy)
class DiscrepancyAdmin(ReadOnlyAdmin):
    list_display = (
        "user_id",
        "currency",
        "legacy_balance",
        "ledger_balance",
        "difference",
        "status",
        "source",
        "phase",
        "occurrences",
        "last_seen_at",
    )
    list_filter = ("status", "source", "phase", "currency")
    search_fields = ("=user_id", "reference")
    actions = ["resolve"]

    def has_change_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("cutover.change_discrepancy")

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    @admin.action(description="Resolve selected discrepancies with a note", permissions=["change"])
    def resolve(self, request: HttpRequest, queryset):
        form = ResolveForm(request.POST if "note" in request.POST else None)
        if form.is_valid():
            done = 0
            for discrepancy in queryset:
                try:
                    discrepancy_resolve(
                        discrepancy_id=discrepancy.pk,
                        actor=Actor.for_user(request.user),
                        note=form.cleaned_data["note"],
                    )
                    done += 1
                except CutoverError as exc:
                    self.message_user(request, str(exc), messages.WARNING)
            self.message_user(request, f"{done} discrepancies resolved.", messages.SUCCESS)
            return None
        return action_confirm(
            self,
            request,
            queryset,
            action="resolve",
            title="Resolve discrepancies",
            button="Resolve",
            question="Resolve these discrepancies? Your note is kept with each.",
            form=form,
        )


@admin.register(PhaseAudit)
class PhaseAuditAdmin(ReadOnlyAdmin):
    list_display = ("at", "actor", "action", "from_phase", "to_phase", "reason")
    list_filter = ("action", "to_phase")
    search_fields = ("actor", "reason")


@admin.register(LegacyBalance)
class LegacyBalanceAdmin(ReadOnlyAdmin):
    list_display = ("user_id", "buying_power", "currency", "updated_at")
    search_fields = ("=user_id",)


@admin.register(LegacyArchive)
class LegacyArchiveAdmin(ReadOnlyAdmin):
    list_display = ("table_name", "archived_as", "rows", "archived_at", "archived_by", "reason")


@admin.register(BalanceMutation)
class BalanceMutationAdmin(ReadOnlyAdmin):
    list_display = (
        "reference",
        "user_id",
        "direction",
        "amount",
        "currency",
        "phase",
        "ledger_status",
        "created_at",
    )
    list_filter = ("phase", "ledger_status", "direction")
    search_fields = ("reference", "=user_id", "correlation_id")


@admin.register(ReconciliationRun)
class ReconciliationRunAdmin(ReadOnlyAdmin):
    list_display = (
        "finished_at",
        "phase",
        "users_checked",
        "differences",
        "new_discrepancies",
        "resolved",
        "triggered_by",
    )


@admin.register(StrictFailure)
class StrictFailureAdmin(ReadOnlyAdmin):
    list_display = ("at", "phase", "user_id", "reference", "error")


@admin.register(CustodyOpening)
class CustodyOpeningAdmin(ReadOnlyAdmin):
    list_display = (
        "currency",
        "reported",
        "source",
        "buffer_before",
        "ledger_transaction_id",
        "opened_by",
        "opened_at",
    )


@admin.register(CustodyDiscrepancy)
class CustodyDiscrepancyAdmin(ReadOnlyAdmin):
    """Read-only: recorded and resolved by the custody reconciliation
    (cutover.custody.custody_reconcile)."""

    list_display = (
        "currency",
        "source",
        "ledger_balance",
        "reported",
        "difference",
        "status",
        "occurrences",
        "first_seen_at",
        "last_seen_at",
        "resolved_at",
    )
    list_filter = ("status", "currency", "source")

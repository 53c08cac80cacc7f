"""The discrepancy console: each unresolved difference between the stores, with both balances
and its history, worked on its own page through cutover.discrepancies (investigate, accept as
a known difference for a while, request and approve a repair; every step permissioned and
audited)."""

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
    Discrepancy,
    DiscrepancyRepair,
    RepairSide,
    TriageStatus,
)
from cutover.selectors import (
    discrepancy_history,
    known_difference_for,
    known_difference_matching,
    store_balances,
)
from gateway.actions import reason_field
from ledger.admin import ReadOnlyAdmin
from ledger.templatetags.console import (
    amount_column,
    amount_display,
    moment_display,
)

KNOWN_DIFFERENCE_FOR = {
    "1": ("1 day", timedelta(days=1)),
    "3": ("3 days", timedelta(days=3)),
    "7": ("7 days", timedelta(days=7)),
    "14": ("14 days", timedelta(days=14)),
    "30": ("30 days", timedelta(days=30)),
}


class InvestigateForm(forms.Form):
    note = reason_field("What you are looking into: kept in the operator audit with your name.")


class KnownDifferenceForm(forms.Form):
    reason = reason_field("Why this difference is expected: kept in the operator audit.")
    expires_in = forms.ChoiceField(
        choices=[(key, label) for key, (label, _) in KNOWN_DIFFERENCE_FOR.items()],
        initial="7",
        help_text="Until then this exact difference does not count against the gates.",
    )


class RepairRequestForm(forms.Form):
    side = forms.ChoiceField(choices=RepairSide.choices, widget=forms.RadioSelect)
    reason = reason_field("Why this store is the wrong one: kept with the repair and in the audit.")


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

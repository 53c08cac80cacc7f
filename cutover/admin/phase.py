"""The phase console: the rollout's state and the kill switch, flipped through the cutover
services (permission, audit), never by writing the model."""

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from cutover.actors import Actor
from cutover.exceptions import CutoverError
from cutover.models import (
    PhaseState,
)
from cutover.phase_machine import kill_switch_set
from cutover.phases import flags_of
from gateway.actions import reason_field
from ledger.admin import ReadOnlyAdmin


class ReasonForm(forms.Form):
    reason = reason_field("Recorded in the audit trail with your name.")


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

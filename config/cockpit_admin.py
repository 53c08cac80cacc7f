"""The cockpit in the admin: the index page (the rollout at a glance above the app list) and
its actions, each a form posted to one of the phase machine's services, which checks the
operator's permission and writes the audit trail. A refusal is shown on the cockpit in words
(the service's own message; the gate's evidence as a table when a gate was not met) with the
status it deserves (400 a form to correct, 403 a permission, 409 the state refuses), never a
500; what was typed stays in the form."""

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path, reverse
from django.views.decorators.http import require_POST

from config.cockpit import READ_STEPS, cockpit_read
from config.cockpit_charts import cockpit_charts
from cutover.actors import Actor
from cutover.admin.phase import KillSwitchForm
from cutover.exceptions import CutoverError, GateNotMet, OperatorNotPermitted, ReasonRequired
from cutover.models import PHASE_CHOICES, AuditAction, PhaseAudit, PhaseState
from cutover.phase_machine import kill_switch_set, phase_advance, phase_rollback
from cutover.phases import Phase, next_phase
from cutover.selectors import phase_state
from gateway.actions import reason_field

PERMISSIONS = {
    "advance": ("cutover.advance_phase",),
    "force": ("cutover.advance_phase", "cutover.force_gate"),
    "rollback": ("cutover.rollback_phase",),
    "kill_switch": ("cutover.operate_kill_switch",),
}
READ_STEP_CHOICES = [(step, f"{step} %") for step in READ_STEPS]


class AdvanceForm(forms.Form):
    # The phase the page showed: an advance posted from a page older than the last change of
    # phase is refused, so a click meant as "advance to read_switch" never lands as a raise
    # of the read percentage (the service's answer to read_switch -> read_switch).
    seen_phase = forms.ChoiceField(choices=PHASE_CHOICES, widget=forms.HiddenInput)
    to = forms.ChoiceField(choices=PHASE_CHOICES, widget=forms.HiddenInput)
    read_percent = forms.TypedChoiceField(
        choices=READ_STEP_CHOICES,
        coerce=int,
        required=False,
        empty_value=1,
        label="Users reading from the ledger",
    )
    reason = reason_field("Recorded in the audit trail with your name.", required=False, cols=40)


class ForceForm(AdvanceForm):
    reason = reason_field(
        "Why the gate may be passed although it is not met; audited as forced.", cols=40
    )


class ReadPercentForm(forms.Form):
    seen_phase = forms.ChoiceField(choices=PHASE_CHOICES, widget=forms.HiddenInput)
    read_percent = forms.TypedChoiceField(
        choices=READ_STEP_CHOICES, coerce=int, label="Users reading from the ledger"
    )
    reason = reason_field("Recorded in the audit trail with your name.", required=False, cols=40)


class RollbackForm(forms.Form):
    reason = reason_field("Recorded in the audit trail with your name.", cols=40)
    confirm_phase = forms.CharField(
        label="Type the target phase to confirm",
        help_text=f"Type {Phase.LEGACY}: every step of the rollout is undone at once.",
    )

    def clean_confirm_phase(self) -> str:
        typed = self.cleaned_data["confirm_phase"]
        if typed != Phase.LEGACY:
            raise forms.ValidationError(
                f"the rollback goes to {Phase.LEGACY}; you typed {typed!r}, so nothing was "
                "rolled back"
            )
        return typed


FORMS = {
    "advance": AdvanceForm,
    "force": ForceForm,
    "reads": ReadPercentForm,
    "rollback": RollbackForm,
    "kill": KillSwitchForm,
}


def _forms(state: PhaseState, bound: dict[str, forms.Form]) -> dict[str, forms.Form]:
    """Each action's form: the one just posted as it was (with its errors), the others fresh
    for the state the page shows."""
    following = next_phase(Phase(state.phase))
    initial = {
        "advance": {"seen_phase": state.phase, "to": following},
        "force": {"seen_phase": state.phase, "to": following},
        "reads": {"seen_phase": state.phase},
        "rollback": {},
        "kill": {"intent": "release" if state.kill_switch else "engage"},
    }
    return {
        name: bound[name] if name in bound else form_class(prefix=name, initial=initial[name])
        for name, form_class in FORMS.items()
    }


def cockpit(
    request: HttpRequest,
    *,
    status: int = 200,
    refusal: dict | None = None,
    bound: dict[str, forms.Form] | None = None,
) -> HttpResponse:
    """The admin index: the cockpit (state, next gate, actions, charts), then the app list."""
    state = cockpit_read()
    may = {
        action: all(request.user.has_perm(p) for p in perms)
        for action, perms in PERMISSIONS.items()
    }
    read_steps = [(step, f"{step} %") for step in state.read_steps]
    page_forms = _forms(state.state, bound or {})
    for name in ("advance", "force", "reads"):
        page_forms[name].fields["read_percent"].choices = read_steps or READ_STEP_CHOICES
    context = {
        "title": "Cockpit",
        "cockpit": state,
        "charts": cockpit_charts(now=state.now),
        "may": may,
        "forms": page_forms,
        "refusal": refusal,
    }
    response = admin.site.index(request, extra_context=context)
    response.status_code = status
    return response


def _errors_in_words(form: forms.Form) -> str:
    return "; ".join(
        f"{form.fields[field].label or field if field in form.fields else 'form'}: "
        + " ".join(errors)
        for field, errors in form.errors.items()
    )


def _refused(request, action: str, name: str, form, *, status: int, message: str, evidence=None):
    return cockpit(
        request,
        status=status,
        refusal={"action": action, "message": message, "evidence": evidence},
        bound={name: form},
    )


def _status_of(exc: CutoverError) -> int:
    if isinstance(exc, OperatorNotPermitted):
        return 403
    return 400 if isinstance(exc, ReasonRequired) else 409


def _act(request: HttpRequest, name: str, action: str, apply) -> HttpResponse:
    """Validate the posted form `name`, run `apply(cleaned_data, actor)` (a service call that
    returns the success message), and go back to the cockpit; or show why nothing changed."""
    form = FORMS[name](request.POST, prefix=name)
    if not form.is_valid():
        return _refused(request, action, name, form, status=400, message=_errors_in_words(form))
    data = form.cleaned_data
    seen, now = data.get("seen_phase"), phase_state().phase
    if seen and seen != now:
        return _refused(
            request,
            action,
            name,
            form,
            status=409,
            message=f"the phase is {now} now, not {seen} as the page showed: look at the "
            "cockpit again before acting",
        )
    try:
        done = apply(data, Actor.for_user(request.user))
    except GateNotMet as exc:
        return _refused(
            request, action, name, form, status=409, message=str(exc), evidence=exc.evidence
        )
    except CutoverError as exc:
        return _refused(request, action, name, form, status=_status_of(exc), message=str(exc))
    messages.success(request, done)
    return HttpResponseRedirect(reverse("admin:index"))


def _advanced(audit: PhaseAudit) -> str:
    if audit.action == AuditAction.READ_PERCENT:
        return f"Reads from the ledger raised to {audit.evidence['read_percent_after']} % of users."
    move = f"{audit.from_phase} -> {audit.to_phase}"
    if audit.action == AuditAction.FORCE:
        return f"Forced {move} past a gate that was not met; audited as forced."
    return f"Advanced {move}."


@require_POST
def advance(request: HttpRequest) -> HttpResponse:
    return _act(
        request,
        "advance",
        "Advance",
        lambda data, actor: _advanced(
            phase_advance(
                to=data["to"],
                actor=actor,
                reason=data["reason"],
                read_percent=data["read_percent"],
            )
        ),
    )


@require_POST
def force(request: HttpRequest) -> HttpResponse:
    return _act(
        request,
        "force",
        "Force the gate",
        lambda data, actor: _advanced(
            phase_advance(
                to=data["to"],
                actor=actor,
                reason=data["reason"],
                force=True,
                read_percent=data["read_percent"],
            )
        ),
    )


@require_POST
def read_percent(request: HttpRequest) -> HttpResponse:
    return _act(
        request,
        "reads",
        "Raise the read percentage",
        lambda data, actor: _advanced(
            phase_advance(
                to=Phase.READ_SWITCH,
                actor=actor,
                reason=data["reason"],
                read_percent=data["read_percent"],
            )
        ),
    )


def _rolled_back(audit: PhaseAudit) -> str:
    rebuilt = audit.evidence.get("legacy_rows_rebuilt")
    return f"Rolled back {audit.from_phase} -> {audit.to_phase}." + (
        f" The legacy store was rebuilt from the ledger ({rebuilt} rows) and proved equal."
        if rebuilt is not None
        else ""
    )


@require_POST
def rollback(request: HttpRequest) -> HttpResponse:
    return _act(
        request,
        "rollback",
        "Roll back",
        lambda data, actor: _rolled_back(phase_rollback(actor=actor, reason=data["reason"])),
    )


def _kill_switch_flip(data: dict, actor: Actor) -> str:
    # The intent the operator confirmed, never one recomputed now: if someone else flipped
    # the switch meanwhile, the service refuses and nothing changes.
    engage = data["intent"] == "engage"
    kill_switch_set(engaged=engage, actor=actor, reason=data["reason"])
    return (
        "Kill switch engaged: every money mutation is refused."
        if engage
        else "Kill switch released."
    )


@require_POST
def kill_switch(request: HttpRequest) -> HttpResponse:
    return _act(request, "kill", "Kill switch", _kill_switch_flip)


urlpatterns = [
    path("", admin.site.admin_view(cockpit), name="cockpit"),
    path("cockpit/advance", admin.site.admin_view(advance), name="cockpit_advance"),
    path("cockpit/force", admin.site.admin_view(force), name="cockpit_force"),
    path("cockpit/read-percent", admin.site.admin_view(read_percent), name="cockpit_reads"),
    path("cockpit/rollback", admin.site.admin_view(rollback), name="cockpit_rollback"),
    path("cockpit/kill-switch", admin.site.admin_view(kill_switch), name="cockpit_kill_switch"),
]

"""What every admin page shows in its header and above its content: the phase, and while the
kill switch is on, a banner saying since when, who engaged it and why."""

from django.http import HttpRequest

from cutover.history import kill_switch_engaged_by
from cutover.models import PhaseState


def rollout_state(request: HttpRequest) -> dict:
    if not request.path.startswith("/admin/") or not getattr(request.user, "is_staff", False):
        return {}
    state = PhaseState.objects.filter(pk=1).first()
    if state is None:
        return {}
    return {
        "rollout_state": state,
        "kill_switch_engaged_by": kill_switch_engaged_by() if state.kill_switch else None,
    }

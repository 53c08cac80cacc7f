"""The operator audit: every operator action (withdrawals, jobs, discrepancies, thresholds,
providers, API clients, custody) is recorded, who, what, on which target, before, after and why,
in the action's own transaction."""

from django.db import connection

from cutover.actors import Actor
from cutover.models import (
    OperatorAudit,
)


def operator_action_record(
    *, actor: Actor | str, action: str, target: str, before: dict, after: dict, reason: str = ""
) -> OperatorAudit:
    """Audit an operator's action (who, what, on which target, before, after, why) in the
    action's own transaction: both are committed, or neither."""
    if not connection.in_atomic_block:
        raise RuntimeError("operator_action_record must run inside the action's transaction")
    return OperatorAudit.objects.create(
        actor=actor.name if isinstance(actor, Actor) else actor,
        action=action,
        target=target,
        before=before,
        after=after,
        reason=reason,
    )

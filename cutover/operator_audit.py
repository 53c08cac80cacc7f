"""The operator audit: every operator action (withdrawals, jobs, discrepancies, thresholds,
providers, API clients, custody) is recorded, who, what, on which target, before, after and why,
in the action's own transaction."""

import logging

from django.db import connection, transaction

from cutover.actors import Actor
from cutover.models import (
    OperatorAudit,
)

log = logging.getLogger(__name__)


def operator_action_record(
    *, actor: Actor | str, action: str, target: str, before: dict, after: dict, reason: str = ""
) -> OperatorAudit:
    """Audit an operator's action (who, what, on which target, before, after, why) in the
    action's own transaction: both are committed, or neither."""
    if not connection.in_atomic_block:
        raise RuntimeError("operator_action_record must run inside the action's transaction")
    audit = OperatorAudit.objects.create(
        actor=actor.name if isinstance(actor, Actor) else actor,
        action=action,
        target=target,
        before=before,
        after=after,
        reason=reason,
    )
    transaction.on_commit(lambda: _audit_log(audit))
    return audit


def _audit_log(audit: OperatorAudit) -> None:
    """The action on the log too, once it committed: who, what, on which target, why, and the
    audit row that holds before and after."""
    log.info(
        "%s on %s by %s: %s",
        audit.action,
        audit.target,
        audit.actor,
        audit.reason,
        extra={
            "audit_id": audit.pk,
            "action": audit.action,
            "target": audit.target,
            "actor": audit.actor,
            "reason": audit.reason,
        },
    )

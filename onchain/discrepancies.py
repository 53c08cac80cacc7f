"""Operators' work on transfer discrepancies: a notification that contradicted a credit is
resolved with a note (after crediting or debiting the difference through the balance path, if
the operator decides money must move); audited in the same transaction."""

from django.db import transaction
from django.utils import timezone

from cutover.actors import Actor
from cutover.exceptions import ReasonRequired, TransitionRefused
from cutover.operator_audit import operator_action_record
from onchain.models import TransferDiscrepancy, TransferDiscrepancyStatus


def transfer_discrepancy_resolve(*, discrepancy_id: int, actor: Actor, note: str) -> None:
    actor.require("onchain.change_transferdiscrepancy")
    if not note.strip():
        raise ReasonRequired("resolving a transfer discrepancy needs a note")
    with transaction.atomic(durable=True):
        discrepancy = TransferDiscrepancy.objects.select_for_update().get(pk=discrepancy_id)
        if discrepancy.status != TransferDiscrepancyStatus.OPEN:
            raise TransitionRefused(f"transfer discrepancy {discrepancy_id} is already resolved")
        discrepancy.status = TransferDiscrepancyStatus.RESOLVED
        discrepancy.resolved_at = timezone.now()
        discrepancy.resolved_by = actor.name
        discrepancy.resolution_note = note
        discrepancy.save()
        operator_action_record(
            actor=actor,
            action="transfer_discrepancy.resolve",
            target=f"transfer_discrepancy:{discrepancy_id}",
            before={"status": TransferDiscrepancyStatus.OPEN},
            after={"status": TransferDiscrepancyStatus.RESOLVED, "resolved_by": actor.name},
            reason=note,
        )

"""Strict-phase failures of the on-chain money paths, recorded for the strict -> cutover gate.

`strict_failure_recorded()` is used OUTSIDE a durable transaction: when the block raised
StrictLedgerFailure (everything in it rolled back), it records the StrictFailure row in a
transaction of its own and re-raises. `balance_mutation_apply` names the user and reference on
the failure so that the record can say whose request failed. This module stands in for
`cutover.services.strict_failure_recorded` (same name, same use) until that one is merged;
then both names are imported from `cutover.services` and this module goes.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from cutover import metrics as cutover_metrics
from cutover import services as cutover_services
from cutover.exceptions import StrictLedgerFailure
from cutover.models import StrictFailure
from cutover.selectors import phase_state


@contextmanager
def strict_failure_recorded() -> Iterator[None]:
    try:
        yield
    except StrictLedgerFailure as exc:
        StrictFailure.objects.create(
            phase=phase_state().phase, user_id=exc.user_id, reference=exc.reference, error=str(exc)
        )
        cutover_metrics.strict_failures.inc()
        raise


def balance_mutation_apply(**kwargs) -> cutover_services.MutationResult:
    try:
        return cutover_services.balance_mutation_apply(**kwargs)
    except StrictLedgerFailure as exc:
        exc.user_id, exc.reference = kwargs["user_id"], kwargs["reference"]
        raise

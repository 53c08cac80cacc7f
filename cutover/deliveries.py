"""Celery task deliveries: each message (one task id) runs at most once to an end, however often
the broker delivers it, and is given up after TASK_DELIVERY_MAX_ATTEMPTS starts that never
finished. Used by every task of the project through config.deliveries; here because every app
that runs tasks (cutover, treasury, onchain) builds on this one.

Our messages are acknowledged late and put back when their process dies (acks_late,
reject_on_worker_lost): a worker killed mid-task has the task run again, and every task is
idempotent for that (README, "Celery's delivery caveats"). What that leaves open is closed here:
- a message delivered again after its task finished (the acknowledgement lost with the worker,
  or Redis' visibility timeout passed) is not run again;
- two copies of one message at once: one runs, holding a session advisory lock on the task id
  (PostgreSQL releases it when the process dies); the other waits for it, up to the task's hard
  time limit, and then finds it finished;
- a message whose process dies every time (out of memory, a crash below Python) would be put
  back forever: its starts are counted in the database (Redis keeps no delivery count), and the
  delivery after the last allowed start is recorded dead (ALERT log,
  `celery_task_deliveries_dead_total`, admin: Task deliveries) and acknowledged, never run."""

import logging
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from django.db import OperationalError, connection, transaction
from django.db.models import F
from django.utils import timezone

from cutover import metrics
from cutover.locks import TASK_DELIVERY_LOCK
from cutover.models import TaskDelivery, TaskDeliveryStatus
from ledger.exceptions import sqlstate_of

log = logging.getLogger(__name__)


def task_options(*, soft_time_limit: int) -> dict:
    """Every task's delivery settings: acknowledged late and put back when its process dies
    (every task is idempotent for that, as its comment says), stopped at `soft_time_limit`
    seconds (killed 30 s later), and never retried by Celery: the next beat run is the
    retry."""
    return {
        "acks_late": True,
        "reject_on_worker_lost": True,
        "soft_time_limit": soft_time_limit,
        "time_limit": soft_time_limit + 30,
        "max_retries": 0,
    }


# A succeeded delivery's row is kept this long, so that a late redelivery of its message still
# finds it (longer than the broker's visibility timeout plus a task's run: tested), then
# deleted; failed and dead rows stay for the operators.
SUCCEEDED_KEPT = timedelta(days=1)
LOCK_NOT_AVAILABLE = "55P03"


class DeliveryDecision(StrEnum):
    RUN = "run"
    FINISHED = "finished"  # delivered again after it ended: not run again
    BUSY = "busy"  # another copy still runs after the wait: not run here
    DEAD = "dead"  # its process died at every allowed start: given up


@dataclass(frozen=True)
class DeliveryStart:
    decision: DeliveryDecision
    attempts: int
    reason: str


def task_delivery_start(
    *, task_id: str, task_name: str, wait: float | None, max_attempts: int
) -> DeliveryStart:
    """Decide what this delivery of message `task_id` does. Waits up to `wait` seconds (the
    task's hard time limit; None, for Celery's own tasks, which have none: as long as it runs)
    for a copy that is running. On RUN the message's lock stays held by this connection until
    task_delivery_release; otherwise it is released here. Called outside any transaction (the
    lock outlives them)."""
    if not _lock(task_id, wait):
        _duplicate_count(task_id)
        return DeliveryStart(DeliveryDecision.BUSY, 0, f"another copy still runs after {wait} s")
    try:
        start = _start_decide(task_id=task_id, task_name=task_name, max_attempts=max_attempts)
    except BaseException:
        task_delivery_release(task_id=task_id)
        raise
    if start.decision is not DeliveryDecision.RUN:
        task_delivery_release(task_id=task_id)
    return start


@transaction.atomic(durable=True)
def task_delivery_finish(*, task_id: str, status: TaskDeliveryStatus, error: str = "") -> None:
    """Record how the running delivery of `task_id` ended: succeeded, or failed (it raised, or
    the worker killed it at its hard time limit). A row that is not running stays as it is."""
    TaskDelivery.objects.filter(task_id=task_id, status=TaskDeliveryStatus.RUNNING).update(
        status=status, finished_at=timezone.now(), error=error
    )


def task_delivery_release(*, task_id: str) -> None:
    """The message's lock, taken by task_delivery_start, released: its copies may decide."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", [TASK_DELIVERY_LOCK, task_id])


def _lock(task_id: str, wait: float | None) -> bool:
    """The message's session lock, waiting up to `wait` seconds (None: no limit); False if
    another copy still holds it then. Outside a transaction, so the timeout is set and reset
    around the wait."""
    assert not connection.in_atomic_block, "a task delivery starts outside any transaction"
    # lock_timeout 0: PostgreSQL waits as long as it takes.
    timeout_ms = 0 if wait is None else round(wait * 1000)
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('lock_timeout', %s, false)", [str(timeout_ms)])
        try:
            cursor.execute(
                "SELECT pg_advisory_lock(%s, hashtext(%s))", [TASK_DELIVERY_LOCK, task_id]
            )
        except OperationalError as exc:
            if sqlstate_of(exc) != LOCK_NOT_AVAILABLE:
                raise
            return False
        finally:
            cursor.execute("RESET lock_timeout")
    return True


@transaction.atomic(durable=True)
def _duplicate_count(task_id: str) -> None:
    TaskDelivery.objects.filter(task_id=task_id).update(duplicates=F("duplicates") + 1)


@transaction.atomic(durable=True)
def _start_decide(*, task_id: str, task_name: str, max_attempts: int) -> DeliveryStart:
    """Under the message's lock, so no copy of it runs: a row still running was left by starts
    whose process died."""
    now = timezone.now()
    TaskDelivery.objects.filter(
        status=TaskDeliveryStatus.SUCCEEDED, finished_at__lt=now - SUCCEEDED_KEPT
    ).delete()
    delivery = TaskDelivery.objects.select_for_update().filter(task_id=task_id).first()
    if delivery is None:
        TaskDelivery.objects.create(task_id=task_id, task_name=task_name)
        return DeliveryStart(DeliveryDecision.RUN, 1, "first delivery")
    if delivery.status != TaskDeliveryStatus.RUNNING:
        delivery.duplicates += 1
        delivery.save(update_fields=["duplicates"])
        return DeliveryStart(
            DeliveryDecision.FINISHED,
            delivery.attempts,
            f"delivered again after it {delivery.status}",
        )
    if delivery.attempts >= max_attempts:
        delivery.status, delivery.finished_at = TaskDeliveryStatus.DEAD, now
        delivery.error = (
            f"started {delivery.attempts} times (TASK_DELIVERY_MAX_ATTEMPTS) and its process "
            "died every time; given up, never run again"
        )
        delivery.save(update_fields=["status", "finished_at", "error"])
        transaction.on_commit(metrics.task_deliveries_dead.inc)
        transaction.on_commit(
            lambda: log.error(
                "ALERT celery: task %s[%s] %s (admin: Task deliveries)",
                task_name,
                task_id,
                delivery.error,
            )
        )
        return DeliveryStart(DeliveryDecision.DEAD, delivery.attempts, delivery.error)
    delivery.attempts += 1
    delivery.last_started_at = now
    delivery.save(update_fields=["attempts", "last_started_at"])
    log.warning(
        "task %s[%s] started again (attempt %s of %s): its process died before it finished",
        task_name,
        task_id,
        delivery.attempts,
        max_attempts,
    )
    return DeliveryStart(DeliveryDecision.RUN, delivery.attempts, "an earlier start died")

"""The base class of every Celery task of the project (config/celery.py names it): each
delivery of a message goes through cutover.deliveries before the task's work, so a message runs
at most once to an end, copies of it wait for each other, and one whose process keeps dying is
given up after TASK_DELIVERY_MAX_ATTEMPTS starts. A task called as a plain function (tests,
commands) is not a delivery and just runs.

Imported by Celery when it builds the first task, after Django's apps are loaded."""

import logging
import traceback

from celery import Task
from celery.exceptions import TimeLimitExceeded
from django.conf import settings

from cutover.deliveries import (
    DeliveryDecision,
    task_delivery_finish,
    task_delivery_release,
    task_delivery_start,
)
from cutover.models import TaskDeliveryStatus
from gateway.faults import fault_point

log = logging.getLogger(__name__)


class DeliveryCountedTask(Task):
    def __call__(self, *args, **kwargs):
        if self.request.called_directly:
            return super().__call__(*args, **kwargs)
        task_id = self.request.id
        start = task_delivery_start(
            task_id=task_id,
            task_name=self.name,
            wait=self.time_limit,
            max_attempts=settings.TASK_DELIVERY_MAX_ATTEMPTS,
        )
        if start.decision is not DeliveryDecision.RUN:
            log.info("task %s[%s] not run: %s", self.name, task_id, start.reason)
            return {"skipped": start.reason}
        try:
            fault_point(f"task:{self.name}")
            try:
                result = super().__call__(*args, **kwargs)
            except Exception:  # recorded for the operators, then Celery's own handling
                task_delivery_finish(
                    task_id=task_id, status=TaskDeliveryStatus.FAILED, error=traceback.format_exc()
                )
                raise
            task_delivery_finish(task_id=task_id, status=TaskDeliveryStatus.SUCCEEDED)
            return result
        finally:
            task_delivery_release(task_id=task_id)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        # In the worker's main process when the task passed its hard time limit: its process
        # was killed there (no finally ran), and Celery acknowledges the message.
        if isinstance(exc, TimeLimitExceeded):
            task_delivery_finish(
                task_id=task_id,
                status=TaskDeliveryStatus.FAILED,
                error=f"killed at its hard time limit: {exc!r}",
            )

"""The AWS app's Celery task (a thin shell), run by beat at the start of every minute."""

import logging

from celery import shared_task

from aws.exceptions import AwsError
from aws.services import metrics_publish
from cutover.deliveries import task_options

log = logging.getLogger(__name__)


# Redelivery is harmless: each minute is sent once (the publication row, locked while a run
# sends); CloudWatch calls time out within 30 s (aws.services.CLIENT_CONFIG).
@shared_task(name="aws.metrics_publish", **task_options(soft_time_limit=120))
def metrics_publish_task() -> dict:
    """Seed 001's metrics to CloudWatch. Harmless to redeliver or to run on several workers:
    each minute's counts are sent once (the others find nothing left, or skip while one runs).
    CloudWatch unreachable or refusing: logged, and the minutes go with the next run."""
    try:
        publication = metrics_publish()
    except AwsError as exc:
        log.warning("CloudWatch metrics not published, the next run sends them: %s", exc)
        return {"skipped": str(exc)}
    if publication.busy:
        return {"skipped": "another publication is running"}
    if publication.dropped_minutes:
        log.warning(
            "CloudWatch: %s minutes before %s were never published (older than the backlog)",
            publication.dropped_minutes,
            publication.counted_from,
        )
    return {
        "counted_until": publication.counted_until.isoformat(),
        "data_points": len(publication.data_points),
    }

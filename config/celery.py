"""The Celery application; tasks are discovered in every installed app."""

import os

from celery import Celery
from celery.signals import setup_logging, task_postrun, task_prerun, worker_process_shutdown

from gateway.log_context import log_context_end, log_context_start

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

# Every task's deliveries are counted and run at most once to an end (config/deliveries.py).
app = Celery("ledger_cutover", task_cls="config.deliveries:DeliveryCountedTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_shutdown.connect
def _metrics_process_dead(pid=None, **kwargs):
    # As gunicorn's child_exit: a finished pool process's gauges stop counting as live.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


@setup_logging.connect
def _logging_configure(**kwargs):
    # Celery's own logging setup (its format, its --loglevel, WARNING by default) is skipped
    # when this signal has a receiver: the worker and beat log as the web does, in LOG_FORMAT
    # at LOG_LEVEL (INFO by default), with the log context on every line.
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)


@task_prerun.connect
def _task_log_context(task_id=None, task=None, **kwargs):
    # A task's lines carry its id as their correlation id (the beat enqueues them, not a
    # request), and Celery as their actor.
    log_context_start(correlation_id=task_id, actor="celery")


@task_postrun.connect
def _task_log_context_end(**kwargs):
    log_context_end()

"""gunicorn's settings for deploy/ and the benchmarks (`gunicorn -c python:config.gunicorn`):
four single-threaded workers (measured faster than threads for these requests)."""

import os

workers = 4
threads = 1


def child_exit(server, worker):
    # A dead worker's gauges must stop counting as live; its counters stay in the totals.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

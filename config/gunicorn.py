"""gunicorn's settings for deploy/ and the benchmarks (`gunicorn -c python:config.gunicorn`):
four single-threaded workers (measured faster than threads for these requests).

What gunicorn answers itself, before Django sees a request (a request line or header it cannot
parse, headers over its limits: 400 and 431; a transfer coding it does not take: 501), is
written in the API's error shape (gateway.api.ApiError) instead of gunicorn's HTML page, so a
client reads one error shape everywhere (tests/test_http_unreadable.py). gunicorn has no setting
for its error bodies: its one writer of them, gunicorn.util.write_error, which its workers look
up at each call, is replaced here, in the master, before the workers fork."""

import json
import os

from gunicorn import util

workers = 4
threads = 1

ERROR_CODES = {400: "bad_request", 403: "forbidden", 431: "too_large", 501: "not_implemented"}


def error_as_json(sock, status_int: int, reason: str, mesg: str) -> None:
    error = {"code": ERROR_CODES.get(status_int, "internal"), "message": mesg or reason}
    if status_int == 431:
        error["field"] = "headers"
    body = json.dumps({"error": error}).encode("ascii")  # what gunicorn echoes is escaped
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


util.write_error = error_as_json


def child_exit(server, worker):
    # A dead worker's gauges must stop counting as live; its counters stay in the totals.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

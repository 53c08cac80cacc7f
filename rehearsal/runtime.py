"""Helpers shared by the long-running commands (`rehearse`, `bench`): the database they run on,
worker processes and latency statistics."""

import multiprocessing
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.core.management import call_command
from django.core.servers.basehttp import (
    ThreadedWSGIServer,
    WSGIRequestHandler,
    get_internal_wsgi_application,
)
from django.db import DatabaseError, connections

from rehearsal import embedded_db


def database_url(name: str) -> str:
    """The configured server's URL for database `name`, for child processes (gunicorn, Celery,
    manage.py): DATABASE_URL with its database swapped, so a Unix-socket host is kept."""
    return urlunsplit(urlsplit(settings.DATABASE_URL)._replace(path=f"/{name}"))


@contextmanager
def database_ready(say: Callable[[str], None]) -> Iterator[str]:
    """The configured database, migrated; the embedded one (started here) without DATABASE_URL."""
    if settings.EMBEDDED_DATABASE:
        say(f"Using the embedded PostgreSQL in {embedded_db.EMBEDDED_DIR} (no DATABASE_URL)")
        with embedded_db.running() as url:
            call_command("migrate", interactive=False, verbosity=0)
            yield url
            connections.close_all()
    else:
        call_command("migrate", interactive=False, verbosity=0)
        yield settings.DATABASE_URL


class ScratchDatabaseError(RuntimeError):
    pass


@contextmanager
def scratch_database(prefix: str, keep: bool = False) -> Iterator[str]:
    """A new database beside the configured one, migrated, used by this process (and the ones
    it forks) for the duration of the block, then dropped (unless `keep`). Nothing else on the
    server is touched. Needs the CREATEDB privilege."""
    default = connections["default"]
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with default.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    except DatabaseError as exc:
        raise ScratchDatabaseError(
            f"cannot create the scratch database {name} (needs CREATEDB): {exc}"
        ) from None
    try:
        with database_used(name):
            call_command("migrate", interactive=False, verbosity=0)
            yield name
    finally:
        if not keep:
            with default.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database_used(name: str) -> Iterator[str]:
    """Another database on the same server, used by this process (and the ones it forks) for
    the duration of the block, then the one used before it again."""
    default = connections["default"]
    original = default.settings_dict["NAME"]
    connections.close_all()
    default.settings_dict["NAME"] = name
    try:
        yield name
    finally:
        connections.close_all()
        default.settings_dict["NAME"] = original


@contextmanager
def existing_database(name: str) -> Iterator[str]:
    """A database beside the configured one (one a scratch_database(keep=True) left), migrated,
    used by this process (and the ones it forks) for the duration of the block; kept."""
    with database_used(name):
        call_command("migrate", interactive=False, verbosity=0)
        yield name


def processes_run(
    target: Callable[..., Any],
    args_per_process: list[tuple],
    on_tick: Callable[[], None] | None = None,
) -> list[Any]:
    """Run `target(*args)` in one forked process each (each opens its own database connection)
    and return their results in order, calling `on_tick` about five times a second meanwhile.
    A process that dies makes this raise (BrokenProcessPool) instead of waiting forever."""
    connections.close_all()  # a forked child must not share the parent's socket
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=len(args_per_process), mp_context=context) as pool:
        futures = [pool.submit(target, *args) for args in args_per_process]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2)
            if on_tick:
                on_tick()
        return [future.result() for future in futures]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {
        "p50_ms": round(percentile(ordered, 0.50), 3),
        "p95_ms": round(percentile(ordered, 0.95), 3),
        "p99_ms": round(percentile(ordered, 0.99), 3),
        "max_ms": round(ordered[-1], 3) if ordered else 0.0,
    }


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # the rehearsal prints a report, not an access log
        pass


@contextmanager
def http_server() -> Iterator[str]:
    """This project's WSGI application on a loopback port, in threads of this process (on the
    database this process uses); yields its base URL."""
    server = ThreadedWSGIServer(("127.0.0.1", 0), _QuietHandler, allow_reuse_address=False)
    server.set_app(get_internal_wsgi_application())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

"""Helpers shared by the long-running commands (`rehearse`, `bench`): the database they run on,
worker processes and latency statistics."""

import logging
import multiprocessing
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from django.conf import settings
from django.core.management import call_command
from django.core.servers.basehttp import (
    ThreadedWSGIServer,
    WSGIRequestHandler,
    get_internal_wsgi_application,
)
from django.db import DatabaseError, connections

from cutover.locks import SCRATCH_DATABASE_LOCK
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


# A scratch database is marked with this comment while the session that made it lives (it
# holds SCRATCH_DATABASE_LOCK in the database itself). One whose maker was killed before it
# could drop it (kill -9, a lost machine) is found by the next scratch_database, which can take
# the lock, and dropped: a killed benchmark used to leave its database (a million users) behind.
SCRATCH_COMMENT = "ledger-cutover scratch database; dropped when the session that made it ends"
log = logging.getLogger("rehearsal")


@contextmanager
def scratch_database(prefix: str, keep: bool = False) -> Iterator[str]:
    """A new database beside the configured one, migrated, used by this process (and the ones
    it forks) for the duration of the block, then dropped (unless `keep`). Scratch databases
    that processes killed before their end left behind are dropped first. Nothing else on the
    server is touched. Needs the CREATEDB privilege."""
    default = connections["default"]
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    scratch_orphans_drop()
    try:
        with default.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    except DatabaseError as exc:
        raise ScratchDatabaseError(
            f"cannot create the scratch database {name} (needs CREATEDB): {exc}"
        ) from None
    holder = _scratch_connect(name)
    try:
        holder.execute("SELECT pg_advisory_lock(%s)", [SCRATCH_DATABASE_LOCK])
        holder.execute(f"COMMENT ON DATABASE \"{name}\" IS '{SCRATCH_COMMENT}'")
        with database_used(name):
            call_command("migrate", interactive=False, verbosity=0)
            yield name
    finally:
        if keep:  # no longer scratch: the caller keeps it (bench --seed-only)
            holder.execute(f'COMMENT ON DATABASE "{name}" IS NULL')
        holder.close()
        if not keep:
            with default.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def scratch_orphans_drop() -> list[str]:
    """Drop the scratch databases whose makers ended without dropping them (the lock in each
    is free); the names dropped. One being made or used holds its lock and is left alone."""
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT datname FROM pg_database WHERE shobj_description(oid, 'pg_database') = %s",
            [SCRATCH_COMMENT],
        )
        candidates = [row[0] for row in cursor.fetchall()]
    dropped = []
    for name in candidates:
        try:
            probe = _scratch_connect(name)
        except psycopg.OperationalError:  # dropped meanwhile by another process
            continue
        with probe:
            taken = probe.execute("SELECT pg_try_advisory_lock(%s)", [SCRATCH_DATABASE_LOCK])
            orphaned = taken.fetchone()[0]
        if not orphaned:
            continue
        try:
            with connections["default"].cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except DatabaseError as exc:  # another role's: its owner drops it
            log.warning("scratch database %s, left by a killed run, not dropped: %s", name, exc)
            continue
        log.warning("dropped scratch database %s: the run that made it was killed", name)
        dropped.append(name)
    return dropped


def _scratch_connect(name: str) -> psycopg.Connection:
    params = connections["default"].get_connection_params()
    params.pop("cursor_factory", None)  # Django's, for its own connections
    params.pop("context", None)
    params["dbname"] = name
    return psycopg.connect(**params, autocommit=True)


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

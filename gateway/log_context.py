"""What every log line says about where it came from, where that is known: the correlation id
(a request's X-Correlation-Id or a new one; a Celery task's id), the actor (an API client, an
admin user, Celery) and the phase the balance path ran in. Held in one context variable per
request or task and added to each record by LogContextFilter, which the settings attach to the
console handler; a value a log call passes itself (`extra={"phase": ...}`) wins.

Imported while logging is configured, before the apps are loaded: nothing here touches models."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# The values bound in the current request or task; None outside one (a command, the process
# between tasks), where nothing is bound: a value would outlive what it was true for.
_context: ContextVar[dict[str, str] | None] = ContextVar("log_context", default=None)


def _known(correlation_id: str | None, actor: str | None, phase: str | None) -> dict[str, str]:
    values = {"correlation_id": correlation_id, "actor": actor, "phase": phase}
    return {name: str(value) for name, value in values.items() if value}


@contextmanager
def log_context(
    *, correlation_id: str | None = None, actor: str | None = None, phase: str | None = None
) -> Iterator[None]:
    """Bind the values to every log line of the block (a request); what the block binds more
    with log_context_bind ends with it."""
    token = _context.set({**(_context.get() or {}), **_known(correlation_id, actor, phase)})
    try:
        yield
    finally:
        _context.reset(token)


def log_context_bind(*, actor: str | None = None, phase: str | None = None) -> None:
    """Add what has just become known (the authenticated client, the phase) to the current
    request's or task's lines; outside one, nothing."""
    current = _context.get()
    if current is not None:
        _context.set({**current, **_known(None, actor, phase)})


def log_context_start(*, correlation_id: str, actor: str) -> None:
    """A unit of work that no block can enclose (a Celery task, between its task_prerun and
    task_postrun signals) starts with these values, whatever was bound before."""
    _context.set(_known(correlation_id, actor, None))


def log_context_end() -> None:
    _context.set(None)


class LogContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = dict(_context.get() or {})
        # Django logs a request's 4xx/5xx after the middleware has returned (its context reset)
        # with the request attached: its correlation id is still the request's.
        correlation_id = getattr(getattr(record, "request", None), "correlation_id", None)
        if correlation_id:
            context.setdefault("correlation_id", correlation_id)
        for name, value in context.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True

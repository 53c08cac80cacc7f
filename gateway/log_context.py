"""What every log line says about where it came from, where that is known: the correlation id
(a request's X-Correlation-Id or a new one; a Celery task's id), the actor (an API client, an
admin user, Celery) and the phase the balance path ran in. Held in one context variable per
request or task and added to each record by LogContextFilter, which the settings attach to the
console handler; a value a log call passes itself (`extra={"phase": ...}`) wins.

Imported while logging is configured, before the apps are loaded: nothing here touches models."""

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# The values bound in the current request or task; None outside one (a command, the process
# between tasks), where nothing is bound: a value would outlive what it was true for.
_context: ContextVar[dict[str, str] | None] = ContextVar("log_context", default=None)


def _known(**values: str | None) -> dict[str, str]:
    return {name: str(value) for name, value in values.items() if value}


@contextmanager
def log_context(*, correlation_id: str) -> Iterator[None]:
    """A request: its correlation id on every log line of the block, and what the block binds
    more with log_context_bind; all of it ends with the block."""
    token = _context.set({"correlation_id": correlation_id})
    try:
        yield
    finally:
        _context.reset(token)


def log_context_bind(*, actor: str | None = None, phase: str | None = None) -> None:
    """Add what has just become known (the authenticated client, the phase) to the current
    request's or task's lines; outside one, nothing."""
    current = _context.get()
    if current is not None:
        _context.set({**current, **_known(actor=actor, phase=phase)})


def log_context_current() -> dict[str, str]:
    return dict(_context.get() or {})


def log_context_start(*, correlation_id: str, actor: str) -> None:
    """A unit of work that no block can enclose (a Celery task, between its task_prerun and
    task_postrun signals) starts with these values, whatever was bound before."""
    _context.set(_known(correlation_id=correlation_id, actor=actor))


def log_context_end() -> None:
    _context.set(None)


class LogContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # Django logs a request's 4xx/5xx after the middleware has returned (its context reset)
        # with the request attached: what the request had bound is on the request.
        context = {
            **getattr(getattr(record, "request", None), "log_context", {}),
            **log_context_current(),
        }
        for name, value in context.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class PlainFormatter(logging.Formatter):
    """LOG_FORMAT=plain: one line per record, a control character in its message (a request
    path's %0a, a NUL, an operator's tab) written as an escape, so that no input can forge a
    line of its own (found from outside: a path holding a newline wrote a fake "CRITICAL ...
    rollback" line). A traceback stays as Python prints it, after the line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", record.message)
        return super().formatMessage(record)

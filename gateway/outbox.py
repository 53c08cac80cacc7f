"""The outbox worker's loop, shared by every engine that sends rows to a provider (withdrawals to
Circle, conversion jobs to Due): due rows are claimed one at a time with FOR UPDATE SKIP LOCKED,
each in a durable transaction of its own, so any number of workers share the work and a row's
claim and recorded outcome commit before the next row is taken. A row is tried at most once
per pass; a failed attempt is put off by a doubling backoff."""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta

from django.db import transaction
from django.db.models import Model, QuerySet
from django.utils import timezone

from gateway.faults import fault_point


def outbox_drain(
    *,
    pending: QuerySet,
    send: Callable[[Model], str],
    report: object,
    limit: int,
    guard: Callable[[], AbstractContextManager] = nullcontext,
    on_error: Callable[[Model, Exception], str] | None = None,
) -> None:
    """Claim up to `limit` rows of `pending` whose `next_attempt_at` has come, oldest first,
    and `send` each (its row locked, inside the claim's transaction, within `guard()`). Each
    outcome `send` returns names a counter of `report`, added to. An exception from a claimed
    row's transaction goes to `on_error(row, exc)` (after its rollback), whose outcome is
    counted; without `on_error` it propagates."""
    tried: list[int] = []
    for _ in range(limit):
        claimed = None
        try:
            with guard(), transaction.atomic(durable=True):
                claimed = (
                    pending.select_for_update(skip_locked=True)
                    .filter(next_attempt_at__lte=timezone.now())
                    .exclude(pk__in=tried)
                    .order_by("next_attempt_at", "id")
                    .first()
                )
                if claimed is None:
                    break
                tried.append(claimed.pk)
                fault_point("outbox:claimed")
                outcome = send(claimed)
        except Exception as exc:
            if claimed is None or on_error is None:
                raise
            outcome = on_error(claimed, exc)
        setattr(report, outcome, getattr(report, outcome) + 1)


def outbox_backoff(base: timedelta, attempts: int, cap: timedelta | None = None) -> timedelta:
    """How long to wait after the `attempts`-th failed attempt: `base` doubled per attempt,
    at most `cap`."""
    delay = base * 2 ** (attempts - 1)
    return delay if cap is None else min(delay, cap)

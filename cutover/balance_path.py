"""The balance path: every user-balance mutation (credit, debit) goes through
cutover_balance_mutate (cutover/sql/cutover.sql) in one round trip, routed by phase, exactly once
per reference; strict-phase failures are recorded after their transaction rolled back. Every
mutation holds the phase lock shared for its whole transaction; within it the user's legacy row is
locked first, then (by the ledger) the accounts."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

import psycopg
from django.db import DatabaseError, connection, transaction

from cutover import metrics
from cutover.exceptions import (
    ConcurrentDuplicate,
    MutationConflict,
    StrictLedgerFailure,
    cutover_error_from,
)
from cutover.models import (
    Direction,
    LedgerStatus,
    StrictFailure,
)
from gateway.log_context import log_context_bind
from ledger.money import amount_parse


@dataclass(frozen=True)
class MutationResult:
    reference: str
    user_id: UUID
    direction: str
    amount: Decimal
    currency: str
    phase: str
    legacy_balance: Decimal | None
    ledger_status: str
    created: bool  # False: a replay of an earlier mutation with this reference
    # The posting that moved the counterparty: the dual write's, or in legacy the mirror's
    # against opening-balance equity once custody is open; None when nothing was posted.
    ledger_transaction_id: int | None = None


MUTATE_SQL = """
    SELECT created, phase, legacy_balance, ledger_balance, ledger_status, ledger_transaction_id,
           ledger_error, discrepancy
      FROM cutover_balance_mutate(%s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
# Errors after which a statement is not repeated: the balance path's own refusals (CU*), a lost
# connection (08), a cancelled statement (57: a timeout, a shutdown).
_FINAL_ERRORS = ("CU", "08", "57")
_write_tally = {LedgerStatus.POSTED: 0, LedgerStatus.FAILED: 0}


def _write_outcome(status: str) -> None:
    metrics.ledger_write_outcome.labels(outcome=status).inc()
    _write_tally[status] += 1
    metrics.write_success_rate.set(_write_tally[LedgerStatus.POSTED] / sum(_write_tally.values()))


def mutation_observed(*, phase: str, created: bool, ledger_status: str, discrepancy: bool) -> None:
    """What a cutover_balance_mutate call did: its phase on the request's or task's log lines,
    counted once its transaction commits (at once in autocommit). Also for a caller that calls
    the function from its own SQL."""
    log_context_bind(phase=phase)
    if created and ledger_status != LedgerStatus.NOT_WRITTEN:
        transaction.on_commit(lambda: _write_outcome(ledger_status))
    if discrepancy:
        transaction.on_commit(metrics.discrepancy_count.inc)


def mutation_statement_run(sql: str, params: list) -> tuple:
    """The row of `sql`, a statement whose last parameter is cutover_balance_mutate's
    p_isolate_ledger. In autocommit (the statement is its own transaction) it runs first
    without the ledger write's subtransaction, about a fifth of a shadow mutation's time in
    PostgreSQL; when that fails with anything but a final error (the ledger refused, an
    injected fault) nothing was written, and it runs once more with the subtransaction, which
    answers as the function documents: the failure recorded in shadow, CU005 in strict. Inside
    a transaction (a failed statement would abort it) with the subtransaction at once.

    In autocommit, a connection the server dropped (a restart, an idle timeout, a terminated
    backend) is opened again and the statement run once more: these statements bypass
    Django's per-request health check (a round trip before every request), and a mutation is
    applied once per reference, so if the lost attempt did commit, the repeat is its replay."""
    try:
        return _mutation_statement_attempt(sql, params)
    except DatabaseError:
        dropped = connection.connection is not None and connection.connection.broken
        if connection.in_atomic_block or not dropped:
            raise
    connection.close()
    return _mutation_statement_attempt(sql, params)


def _mutation_statement_attempt(sql: str, params: list) -> tuple:
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        if not connection.in_atomic_block:
            try:
                cursor.execute(sql, [*params, False], prepare=True)
                return cursor.fetchone()
            except psycopg.Error as exc:
                if exc.sqlstate is None or exc.sqlstate.startswith(_FINAL_ERRORS):
                    raise
        cursor.execute(sql, [*params, True], prepare=True)
        return cursor.fetchone()


def _mutation_execute(
    user_id, direction, amount, reference, reason, currency, counterparty, correlation_id
) -> MutationResult:
    if direction not in Direction.values:
        raise MutationConflict(f"direction must be credit or debit, not {direction!r}", "direction")
    amount = amount_parse(amount, currency)
    if not isinstance(reference, str) or not reference or len(reference) > 255:
        raise MutationConflict("reference must be 1..255 characters", "reference")
    counterparty = counterparty or (
        f"deposits_clearing_{currency.lower()}"
        if direction == Direction.CREDIT
        else f"withdrawals_clearing_{currency.lower()}"
    )
    params = [user_id, direction, amount, currency, reference, reason, counterparty, correlation_id]
    try:
        row = mutation_statement_run(MUTATE_SQL, params)
    except DatabaseError as exc:
        error = cutover_error_from(exc, user_id=user_id, reference=reference)
        if error is None:
            raise
        raise error from exc
    created, phase, legacy, _, status, ledger_transaction_id, _, discrepancy = row
    mutation_observed(phase=phase, created=created, ledger_status=status, discrepancy=discrepancy)
    return MutationResult(
        reference,
        user_id,
        direction,
        amount,
        currency,
        phase,
        legacy,
        status,
        created,
        ledger_transaction_id,
    )


@contextmanager
def strict_failure_recorded() -> Iterator[None]:
    """Record a strict-phase failure of the block: when it raises StrictLedgerFailure, write
    the StrictFailure row (phase, user, reference, error) in a transaction of its own, count it,
    and re-raise. Use it OUTSIDE the durable atomic block that applies the mutation, so the row
    is written after that block rolled back (and the "0 strict failures" gate sees it):

        with strict_failure_recorded(), transaction.atomic(durable=True):
            balance_mutation_apply(...)
    """
    if connection.in_atomic_block:
        raise RuntimeError(
            "strict_failure_recorded must wrap the transaction, not run inside one: "
            "its record would roll back with the failure"
        )
    try:
        yield
    except StrictLedgerFailure as exc:
        if not exc.recorded:
            with transaction.atomic(durable=True):
                StrictFailure.objects.create(
                    phase=exc.phase, user_id=exc.user_id, reference=exc.reference, error=str(exc)
                )
            exc.recorded = True
            metrics.strict_failures.inc()
        raise


def balance_mutation_apply(
    *,
    user_id: UUID,
    direction: str,
    amount: Decimal | str,
    reference: str,
    reason: str,
    currency: str = "USDC",
    counterparty: str | None = None,
    correlation_id: str = "",
) -> MutationResult:
    """Apply one user-balance mutation inside the caller's transaction, routed by phase
    (cutover_balance_mutate in cutover/sql/cutover.sql, one round trip).

    Exactly once per `reference` in every phase (the journal row); the same reference with a
    different mutation raises MutationConflict. `counterparty` names the system account on the
    other side of the ledger posting (default: the user's shard of deposits or withdrawals
    clearing). A StrictLedgerFailure dooms the caller's transaction: wrap that transaction in
    strict_failure_recorded() so the failure is recorded once it has rolled back.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("balance_mutation_apply must run inside transaction.atomic()")
    return _mutation_execute(
        user_id, direction, amount, reference, reason, currency, counterparty, correlation_id
    )


def balance_mutate(
    *,
    user_id: UUID,
    direction: str,
    amount: Decimal | str,
    reference: str,
    reason: str,
    currency: str = "USDC",
    counterparty: str | None = None,
    correlation_id: str = "",
) -> MutationResult:
    """One mutation in a database transaction of its own: a single statement in autocommit
    mode (the guarantee of atomic(durable=True) in one round trip). A strict-mode failure rolls
    the whole mutation back and is then recorded (strict_failure_recorded) before it is raised."""
    if connection.in_atomic_block:
        raise RuntimeError("balance_mutate commits on its own; inside atomic() use the _apply form")
    args = (user_id, direction, amount, reference, reason, currency, counterparty, correlation_id)
    with strict_failure_recorded():
        try:
            result = _mutation_execute(*args)
        except ConcurrentDuplicate:  # the other delivery won: this one is now a replay
            result = _mutation_execute(*args)
    metrics.balance_mutations.labels(
        phase=result.phase, outcome="applied" if result.created else "replayed"
    ).inc()
    return result


def balance_credit(**kwargs) -> MutationResult:
    return balance_mutate(direction=Direction.CREDIT, **kwargs)


def balance_debit(**kwargs) -> MutationResult:
    return balance_mutate(direction=Direction.DEBIT, **kwargs)

"""Writes of the cutover: the balance path (every user-balance mutation), the phase machine,
the kill switch, discrepancies, custody (the buffers' openings and their reconciliation),
reconciliation and backfill.

Locking: every balance mutation holds the phase lock shared (a PostgreSQL advisory lock) for its
whole transaction; phase changes and the kill switch take it exclusively. So a flip waits for the
mutations in flight, and no mutation starts under the old state once a flip has begun.
Within a mutation the user's legacy row is locked first, then (by the ledger) the accounts.
"""

import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from uuid import UUID, uuid4

import psycopg
from django.conf import settings
from django.db import DatabaseError, OperationalError, connection, transaction
from django.db.models import Sum
from django.utils import timezone

from cutover import metrics
from cutover.actors import Actor
from cutover.exceptions import (
    ApiClientLimitExceeded,
    ApiClientRefused,
    ConcurrentDuplicate,
    CustodyRefused,
    GateNotMet,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    KillSwitchEngaged,
    MutationConflict,
    NotApplicable,
    ReasonRequired,
    ReconciliationBusy,
    StrictLedgerFailure,
    TransitionRefused,
)
from cutover.locks import CUSTODY_RECONCILE_LOCK, PHASE_LOCK, RECONCILE_LOCK
from cutover.models import (
    ApiClient,
    ApiClientSpend,
    ApiScope,
    AuditAction,
    CustodyDiscrepancy,
    CustodyOpening,
    Direction,
    DiscrepancyStatus,
    IdempotencyRecord,
    IdempotencyStatus,
    LedgerStatus,
    OperatorAudit,
    PhaseAudit,
    PhaseState,
    ReconciliationRun,
    StrictFailure,
)
from cutover.phases import (
    DUAL_WRITE,
    Phase,
    next_phase,
)
from cutover.selectors import (
    CUSTODY_BUFFERS,
    DIFFERENCES_SQL,
    TOTALS_SQL,
    equality_proof,
    gate_evaluate,
    phase_state,
    store_totals,
    token_digest,
    user_account_type,
)
from ledger.exceptions import InsufficientFunds, InvalidAmount
from ledger.money import CURRENCY_DECIMALS, amount_parse
from ledger.selectors import system_account
from ledger.services import Leg, account_open, transaction_apply

BACKFILL_NAMESPACE = "backfill"
DEPRECATION_COMMENT = "DEPRECATED: balances live in ledger_accounts since the cutover of {at}."


def _advisory(sql: str, key: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, [key])


def _phase_lock_shared() -> None:
    _advisory("SELECT pg_advisory_xact_lock_shared(%s)", PHASE_LOCK)


def _phase_lock_exclusive() -> None:
    _advisory("SELECT pg_advisory_xact_lock(%s)", PHASE_LOCK)


# --- the balance path -------------------------------------------------------------------------


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
      FROM cutover_balance_mutate(%s, %s, %s, %s, %s, %s, %s, %s)
"""
# SQLSTATEs raised by cutover_balance_mutate (cutover/sql/cutover.sql).
MUTATION_ERRORS = {
    "CU002": KillSwitchEngaged,
    "CU003": MutationConflict,
    "CU004": InsufficientFunds,
    "CU005": StrictLedgerFailure,
    "CU006": ConcurrentDuplicate,
    "LD002": InsufficientFunds,
}


_write_tally = {LedgerStatus.POSTED: 0, LedgerStatus.FAILED: 0}


def _write_outcome(status: str) -> None:
    metrics.ledger_write_outcome.labels(outcome=status).inc()
    _write_tally[status] += 1
    metrics.write_success_rate.set(_write_tally[LedgerStatus.POSTED] / sum(_write_tally.values()))


def _mutation_execute(
    user_id, direction, amount, reference, reason, currency, counterparty, correlation_id
) -> MutationResult:
    if direction not in Direction.values:
        raise MutationConflict(f"direction must be credit or debit, not {direction!r}")
    amount = amount_parse(amount, currency)
    if not isinstance(reference, str) or not reference or len(reference) > 255:
        raise MutationConflict("reference must be 1..255 characters")
    counterparty = counterparty or (
        f"deposits_clearing_{currency.lower()}"
        if direction == Direction.CREDIT
        else f"withdrawals_clearing_{currency.lower()}"
    )
    params = [user_id, direction, amount, currency, reference, reason, counterparty, correlation_id]
    connection.ensure_connection()
    try:
        with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(MUTATE_SQL, params, prepare=True)
            row = cursor.fetchone()
    except DatabaseError as exc:
        error = MUTATION_ERRORS.get(getattr(exc.__cause__, "sqlstate", None) or "")
        if error is None:
            raise
        diag = exc.__cause__.diag
        message = (diag.message_primary or str(exc)).removeprefix("ledger: ")
        if error is StrictLedgerFailure:  # the SQL function puts the phase in DETAIL
            raise StrictLedgerFailure(
                message, phase=diag.message_detail or "", user_id=user_id, reference=reference
            ) from exc
        raise error(message) from exc
    created, phase, legacy, _, status, ledger_transaction_id, _, discrepancy = row
    if created and status != LedgerStatus.NOT_WRITTEN:
        transaction.on_commit(lambda: _write_outcome(status))
    if discrepancy:
        transaction.on_commit(metrics.discrepancy_count.inc)
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


# --- the phase machine ------------------------------------------------------------------------


def _audit(actor: Actor, action: str, before: str, after: str, reason: str, evidence: dict):
    return PhaseAudit.objects.create(
        actor=actor.name,
        action=action,
        from_phase=before,
        to_phase=after,
        reason=reason,
        evidence=evidence,
    )


def _locked_state() -> PhaseState:
    """The write fence: waits for every mutation in flight, holds new ones until commit."""
    _phase_lock_exclusive()
    return PhaseState.objects.select_for_update().get(pk=1)


def phase_advance(
    *, to: str, actor: Actor, reason: str = "", force: bool = False, read_percent: int = 1
) -> PhaseAudit:
    """Move to the next phase once its gate is met (or forced, with a reason, by an operator
    allowed to). In read_switch, advancing to read_switch again raises the read percentage."""
    target = Phase(to)
    actor.require("cutover.advance_phase")
    if force:
        actor.require("cutover.force_gate")
        if not reason.strip():
            raise ReasonRequired("--force needs a written --reason")
    if not 0 < read_percent <= 100:
        raise TransitionRefused(f"read percentage must be 1..100, not {read_percent}")
    with transaction.atomic(durable=True):
        state = _locked_state()
        current = Phase(state.phase)
        if target == current == Phase.READ_SWITCH:
            return _read_percent_raise(state, read_percent, actor, reason)
        expected = next_phase(current)
        if target != expected:
            allowed = f"the next phase is {expected}" if expected else "cutover is terminal"
            raise TransitionRefused(f"{current} -> {target} is not a legal transition; {allowed}")
        gate = gate_evaluate(state, target)
        evidence = gate.as_evidence()
        if not gate.passed and not force:
            raise GateNotMet(f"gate {current} -> {target} not met: {gate.failures()}", evidence)
        if target == Phase.CUTOVER:
            # Never forcible: the legacy store stops here, so both must agree to the cent.
            proof = equality_proof()
            evidence["proof"] = proof.__dict__
            if not proof.ok:
                raise GateNotMet(f"cutover refused: {proof.actual}", evidence)
            with connection.cursor() as cursor:
                comment = DEPRECATION_COMMENT.format(at=timezone.now().isoformat())
                cursor.execute(f"COMMENT ON TABLE balances IS '{comment}'")
        state.phase = target
        state.entered_at = timezone.now()
        state.read_percent = {Phase.READ_SWITCH: read_percent, Phase.STRICT: 100}.get(target, 0)
        if target == Phase.CUTOVER:
            state.read_percent = 100
        state.save()
        action = AuditAction.FORCE if not gate.passed else AuditAction.ADVANCE
        evidence["read_percent"] = state.read_percent
        return _audit(actor, action, current, target, reason, evidence)


def _read_percent_raise(state: PhaseState, percent: int, actor: Actor, reason: str) -> PhaseAudit:
    if percent <= state.read_percent:
        raise TransitionRefused(
            f"read percentage can only grow (now {state.read_percent} %, asked {percent} %); "
            "roll back to reduce it"
        )
    before = state.read_percent
    state.read_percent = percent
    state.save(update_fields=["read_percent", "updated_at"])
    return _audit(
        actor,
        AuditAction.READ_PERCENT,
        state.phase,
        state.phase,
        reason,
        {"read_percent_before": before, "read_percent_after": percent},
    )


# The rebuild of `balances` from the ledger (rollback from cutover): every legacy row gets its
# user's ledger balance (0 without an account), and every ledger balance account without a row
# gets one. One currency per user holds in every phase (cutover_balance_mutate and the index
# cutover_one_balance_account_per_user), so each row has at most one account to mirror and a
# row's currency is never rewritten.
LEGACY_MISMATCHED_CURRENCY_SQL = """
    SELECT b.user_id, b.currency, a.currency FROM balances b
      JOIN ledger_accounts a ON a.user_id = b.user_id
       AND a.account_type = lower(a.currency) || '_balance'
     WHERE a.currency <> b.currency ORDER BY b.user_id LIMIT 5
"""
LEGACY_REBUILD_SQL = """
    WITH ledger AS (
        SELECT a.user_id, a.currency, a.balance FROM ledger_accounts a
         WHERE a.user_id IS NOT NULL AND a.account_type = lower(a.currency) || '_balance'
    ),
    updated AS (
        UPDATE balances b SET buying_power = coalesce(l.balance, 0), updated_at = now()
          FROM balances target LEFT JOIN ledger l
            ON l.user_id = target.user_id AND l.currency = target.currency
         WHERE b.user_id = target.user_id
           AND b.buying_power IS DISTINCT FROM coalesce(l.balance, 0)
        RETURNING 1
    ),
    inserted AS (
        INSERT INTO balances (user_id, buying_power, currency, updated_at)
        SELECT l.user_id, l.balance, l.currency, now() FROM ledger l
         WHERE NOT EXISTS (SELECT 1 FROM balances b WHERE b.user_id = l.user_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM updated), (SELECT count(*) FROM inserted)
"""


def phase_rollback(*, actor: Actor, reason: str) -> PhaseAudit:
    """Emergency rollback to legacy from any phase, in one step. From cutover the legacy store
    is stale: it is rebuilt from the ledger in the same transaction as the flip."""
    actor.require("cutover.rollback_phase")
    if not reason.strip():
        raise ReasonRequired("rollback needs a written --reason")
    with transaction.atomic(durable=True):
        current, evidence = _rollback_apply()
        return _audit(actor, AuditAction.ROLLBACK, current, Phase.LEGACY, reason, evidence)


class _Rehearsed(Exception):
    def __init__(self, evidence: dict):
        self.evidence = evidence


def phase_rollback_rehearse() -> dict:
    """Prove that a rollback would succeed from the state as it is: the whole rollback (write
    fence, rebuild, equality proof) runs in a transaction that is then rolled back, so nothing
    changes. Returns its evidence, or raises the refusal the real rollback would meet. Holds
    the write fence while it runs, as the real one does."""
    try:
        with transaction.atomic(durable=True):
            _, evidence = _rollback_apply()
            raise _Rehearsed(evidence)
    except _Rehearsed as rehearsed:
        return rehearsed.evidence


def _rollback_apply() -> tuple[Phase, dict]:
    state = _locked_state()
    current = Phase(state.phase)
    if current == Phase.LEGACY:
        raise TransitionRefused("already in legacy: nothing to roll back")
    evidence: dict = {"totals_before": store_totals()}
    if current == Phase.CUTOVER:
        _legacy_rebuild(evidence)
    state.phase = Phase.LEGACY
    state.entered_at = timezone.now()
    state.read_percent = 0
    state.save()
    return current, evidence


def _legacy_rebuild(evidence: dict) -> None:
    """Rebuild `balances` from the ledger under the write fence, and prove both stores equal
    before the flip commits (a rollback that would lose a cent does not happen)."""
    with connection.cursor() as cursor:
        cursor.execute(LEGACY_MISMATCHED_CURRENCY_SQL)
        mismatched = cursor.fetchall()
        if mismatched:
            described = ", ".join(
                f"{u} ({legacy} legacy, {ledger} ledger)" for u, legacy, ledger in mismatched
            )
            raise TransitionRefused(
                f"rollback refused: users hold another currency in each store: {described}"
            )
        cursor.execute(LEGACY_REBUILD_SQL)
        updated, inserted = cursor.fetchone()
        evidence["legacy_rows_rebuilt"] = updated + inserted
        evidence["legacy_rows_created"] = inserted
        cursor.execute("COMMENT ON TABLE balances IS NULL")
    proof = equality_proof()
    evidence["totals_after"] = store_totals()
    evidence["proof"] = proof.__dict__
    if not proof.ok:
        raise TransitionRefused(
            f"rollback refused: the rebuilt legacy store differs: {proof.actual}"
        )


def kill_switch_set(*, engaged: bool, actor: Actor, reason: str) -> PhaseAudit:
    """Stop (or resume) every money mutation. Mutations in flight finish first; none starts
    after the flip."""
    actor.require("cutover.operate_kill_switch")
    if not reason.strip():
        raise ReasonRequired("the kill switch needs a written --reason")
    with transaction.atomic(durable=True):
        state = _locked_state()
        if state.kill_switch == engaged:
            raise TransitionRefused(f"the kill switch is already {'on' if engaged else 'off'}")
        state.kill_switch = engaged
        state.kill_switch_reason = reason if engaged else ""
        state.kill_switch_changed_at = timezone.now()
        state.save()
        action = AuditAction.KILL_SWITCH_ON if engaged else AuditAction.KILL_SWITCH_OFF
        return _audit(actor, action, state.phase, state.phase, reason, {})


def discrepancy_resolve(*, discrepancy_id: int, actor: Actor, note: str) -> None:
    from cutover.models import Discrepancy

    if not note.strip():
        raise ReasonRequired("resolving a discrepancy needs a note")
    with transaction.atomic(durable=True):
        discrepancy = Discrepancy.objects.select_for_update().get(pk=discrepancy_id)
        if discrepancy.status != DiscrepancyStatus.OPEN:
            raise TransitionRefused(f"discrepancy {discrepancy_id} is already resolved")
        discrepancy.status = DiscrepancyStatus.RESOLVED
        discrepancy.resolved_at = timezone.now()
        discrepancy.resolved_by = actor.name
        discrepancy.resolution_note = note
        discrepancy.save()
        operator_action_record(
            actor=actor,
            action="discrepancy.resolve",
            target=f"discrepancy:{discrepancy_id}",
            before={"status": DiscrepancyStatus.OPEN},
            after={"status": DiscrepancyStatus.RESOLVED, "resolved_by": actor.name},
            reason=note,
        )


def operator_action_record(
    *, actor: Actor | str, action: str, target: str, before: dict, after: dict, reason: str = ""
) -> OperatorAudit:
    """Audit an operator's action (who, what, on which target, before, after, why) in the
    action's own transaction: both are committed, or neither."""
    if not connection.in_atomic_block:
        raise RuntimeError("operator_action_record must run inside the action's transaction")
    return OperatorAudit.objects.create(
        actor=actor.name if isinstance(actor, Actor) else actor,
        action=action,
        target=target,
        before=before,
        after=after,
        reason=reason,
    )


# --- custody ----------------------------------------------------------------------------------

CUSTODY_NAMESPACE = "custody"


def custody_reading_parse(value: Decimal | str, currency: str) -> Decimal:
    """A provider's reported balance in `currency`: zero (an empty wallet) or a positive amount
    with at most the currency's places. Negative figures are refused."""
    if currency not in CUSTODY_BUFFERS:
        raise CustodyRefused(
            f"currency must be one of {', '.join(CUSTODY_BUFFERS)}, not {currency!r}"
        )
    places = CURRENCY_DECIMALS[currency]
    # amount_parse takes positive amounts only; zero is a legitimate balance here.
    if isinstance(value, str) and re.fullmatch(r"0(\.0+)?", value):
        if len(value.partition(".")[2]) > places:
            raise CustodyRefused(
                f"reported: {value} has more than {places} decimal places for {currency}"
            )
        return Decimal(0)
    if isinstance(value, Decimal) and value.is_zero() and value.as_tuple().exponent >= -places:
        return Decimal(0)
    if (isinstance(value, str) and value.strip().startswith("-")) or (
        isinstance(value, Decimal) and value.is_signed()
    ):
        raise CustodyRefused(f"reported: a provider's balance cannot be negative, got {value}")
    try:
        return amount_parse(value, currency)
    except InvalidAmount as exc:
        raise CustodyRefused(f"reported: {exc}") from None


def custody_open(
    *, currency: str, reported: Decimal | str, source: str, actor: Actor, reason: str
) -> CustodyOpening:
    """Book a system buffer's opening balance from what its provider reports: the buffer
    (`usdc_buffer` for USDC, `fiat_buffer` for USD) is brought to `reported` against the
    currency's opening-balance equity (namespace `custody`, reference `opening:<CUR>`), once per
    currency, audited. From then on the balance path mirrors legacy-phase mutations of that
    currency in the ledger (cutover_balance_mutate), so the buffers stay right across phases.

    Takes the phase lock exclusively (mutations in flight finish under the old rule; none
    starts meanwhile) and the buffer's row lock (postings to it wait)."""
    actor.require("cutover.open_custody")
    amount = custody_reading_parse(reported, currency)
    if not isinstance(source, str) or not source.strip() or len(source) > 64:
        raise CustodyRefused(
            "source: name the provider that reported the balance (1..64 characters)"
        )
    if not reason.strip():
        raise ReasonRequired("opening custody needs a written --reason")
    with transaction.atomic(durable=True):
        _phase_lock_exclusive()
        existing = CustodyOpening.objects.filter(currency=currency).first()
        if existing is not None:
            raise CustodyRefused(
                f"custody for {currency} is already open: {existing.reported} from "
                f"{existing.source} at {existing.opened_at:%Y-%m-%d %H:%M:%S}"
            )
        buffer = system_account(code=CUSTODY_BUFFERS[currency])
        equity = system_account(code=f"opening_balance_equity_{currency.lower()}")
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT balance FROM ledger_accounts WHERE id = %s FOR UPDATE", [buffer.pk]
            )
            (before,) = cursor.fetchone()
        difference = amount - before
        posting = None
        if difference:
            posting = transaction_apply(
                namespace=CUSTODY_NAMESPACE,
                reference_id=f"opening:{currency}",
                kind="custody_opening",
                legs=[Leg.debit(buffer, difference), Leg.credit(equity, difference)]
                if difference > 0
                else [Leg.debit(equity, -difference), Leg.credit(buffer, -difference)],
                metadata={"source": source, "reported": str(amount), "buffer_before": str(before)},
            )
        opening = CustodyOpening.objects.create(
            currency=currency,
            reported=amount,
            source=source.strip(),
            buffer_before=before,
            ledger_transaction_id=posting.transaction_id if posting else None,
            opened_by=actor.name,
            reason=reason,
        )
        operator_action_record(
            actor=actor,
            action="custody.open",
            target=f"custody:{currency}",
            before={"opened": False, "buffer": str(before)},
            after={
                "opened": True,
                "buffer": str(amount),
                "reported": str(amount),
                "source": opening.source,
                "ledger_transaction_id": opening.ledger_transaction_id,
            },
            reason=reason,
        )
    return opening


@dataclass(frozen=True)
class CustodyReading:
    """What a provider reports it holds for us in one currency."""

    currency: str
    source: str
    reported: Decimal | str


@dataclass(frozen=True)
class CustodyComparison:
    currency: str
    source: str
    ledger_balance: Decimal
    reported: Decimal
    difference: Decimal  # ledger - reported
    discrepancy_id: int | None  # the open custody discrepancy, None when they agree
    resolved: bool  # an open discrepancy was resolved by this run

    @property
    def agrees(self) -> bool:
        return not self.difference


def custody_reconcile(*, readings: Iterable[CustodyReading]) -> list[CustodyComparison]:
    """Compare each system buffer's ledger balance with what its provider reports; record a
    custody discrepancy when they differ (one open row per currency and source; later
    sightings update it), resolve the open one when they agree again. One run at a time
    (CUSTODY_RECONCILE_LOCK; a second is refused with ReconciliationBusy). Every reading is
    validated before anything is written."""
    parsed = []
    for reading in readings:
        if not isinstance(reading.source, str) or not reading.source.strip():
            raise CustodyRefused("source: every reading names its provider")
        parsed.append(
            (
                reading.currency,
                reading.source,
                custody_reading_parse(reading.reported, reading.currency),
            )
        )
    comparisons = []
    with transaction.atomic(durable=True):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [CUSTODY_RECONCILE_LOCK])
            if not cursor.fetchone()[0]:
                raise ReconciliationBusy("another custody reconciliation is running")
        now = timezone.now()
        for currency, source, reported in parsed:
            balance = system_account(code=CUSTODY_BUFFERS[currency]).balance
            difference = balance - reported
            found = (
                CustodyDiscrepancy.objects.select_for_update()
                .filter(currency=currency, source=source, status=DiscrepancyStatus.OPEN)
                .first()
            )
            resolved = False
            if difference and found is None:
                found = CustodyDiscrepancy.objects.create(
                    currency=currency,
                    source=source,
                    ledger_balance=balance,
                    reported=reported,
                    difference=difference,
                )
                transaction.on_commit(metrics.custody_discrepancies.inc)
            elif difference:
                found.ledger_balance, found.reported, found.difference = (
                    balance,
                    reported,
                    difference,
                )
                found.occurrences += 1
                found.last_seen_at = now
                found.save()
            elif found is not None:
                found.status = DiscrepancyStatus.RESOLVED
                found.resolved_at = found.last_seen_at = now
                found.save()
                resolved, found = True, None
            comparisons.append(
                CustodyComparison(
                    currency,
                    source,
                    balance,
                    reported,
                    difference,
                    found.pk if found else None,
                    resolved,
                )
            )
    return comparisons


# --- reconciliation ---------------------------------------------------------------------------

RECONCILE_RECORD_SQL = f"""
    WITH differences AS ({DIFFERENCES_SQL}),
    upserted AS (
        INSERT INTO cutover_discrepancies
            (user_id, currency, legacy_balance, ledger_balance, difference, status, source,
             phase, reference, detail, occurrences)
        SELECT user_id, currency, legacy, ledger, coalesce(legacy, 0) - coalesce(ledger, 0),
               'open', 'reconciliation', %(phase)s, '', '', 1
          FROM differences
        ON CONFLICT (user_id, currency) WHERE status = 'open' DO UPDATE
           SET legacy_balance = EXCLUDED.legacy_balance,
               ledger_balance = EXCLUDED.ledger_balance, difference = EXCLUDED.difference,
               occurrences = cutover_discrepancies.occurrences + 1, last_seen_at = now()
        RETURNING (xmax = 0) AS inserted
    ),
    resolved AS (
        UPDATE cutover_discrepancies d
           SET status = 'resolved', resolved_at = now(), resolved_by = 'reconciliation',
               resolution_note = 'legacy and ledger agree again'
         WHERE d.status = 'open'
           AND NOT EXISTS (SELECT 1 FROM differences r
                            WHERE r.user_id = d.user_id AND r.currency = d.currency)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM upserted),
           (SELECT count(*) FROM upserted WHERE inserted),
           (SELECT count(*) FROM resolved)
"""


@dataclass(frozen=True)
class ReconciliationResult:
    run_id: int
    phase: str
    users_checked: int
    differences: int
    new_discrepancies: int
    resolved: int
    legacy_total: Decimal
    ledger_total: Decimal
    seconds: float

    @property
    def clean(self) -> bool:
        return self.differences == 0


RECONCILE_ATTEMPTS = 3


def reconciliation_run(*, triggered_by: str) -> ReconciliationResult:
    """Compare every user's legacy and ledger balance in one snapshot, set-based; record new
    discrepancies, resolve the ones that agree again. One at a time (advisory lock).

    The snapshot is REPEATABLE READ: a discrepancy row that a concurrent mutation changed after
    it was taken makes PostgreSQL refuse the write (40001); the run is then repeated, a bounded
    number of times, on a fresh snapshot."""
    for attempt in range(1, RECONCILE_ATTEMPTS + 1):
        try:
            return _reconciliation_attempt(triggered_by)
        except OperationalError as exc:
            if getattr(exc.__cause__, "sqlstate", None) != "40001" or attempt == RECONCILE_ATTEMPTS:
                raise
    raise AssertionError("unreachable: the loop returns or raises")


def _reconciliation_attempt(triggered_by: str) -> ReconciliationResult:
    started = timezone.now()
    with transaction.atomic(durable=True):
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [RECONCILE_LOCK])
            if not cursor.fetchone()[0]:
                raise ReconciliationBusy("another reconciliation is running")
            phase = phase_state().phase
            if phase not in DUAL_WRITE:
                raise NotApplicable(
                    f"reconciliation compares the two stores while both are written "
                    f"(shadow, read_switch, strict); the phase is {phase}"
                )
            cursor.execute(TOTALS_SQL)
            legacy_total, ledger_total, users = cursor.fetchone()
            cursor.execute(RECONCILE_RECORD_SQL, {"phase": phase})
            differences, new, resolved = cursor.fetchone()
        finished = timezone.now()
        run = ReconciliationRun.objects.create(
            started_at=started,
            finished_at=finished,
            phase=phase,
            users_checked=users,
            differences=differences,
            new_discrepancies=new,
            resolved=resolved,
            legacy_total=legacy_total,
            ledger_total=ledger_total,
            triggered_by=triggered_by,
        )
    if new:
        metrics.discrepancy_count.inc(new)
    return ReconciliationResult(
        run.pk,
        phase,
        users,
        differences,
        new,
        resolved,
        legacy_total,
        ledger_total,
        (finished - started).total_seconds(),
    )


# --- backfill ---------------------------------------------------------------------------------

BACKFILL_CANDIDATES_SQL = f"""
    SELECT d.user_id, d.currency FROM ({DIFFERENCES_SQL}) d
     WHERE d.legacy IS NOT NULL AND d.user_id > %s
     ORDER BY d.user_id LIMIT %s
"""
BACKFILL_LOCK_ROWS_SQL = """
    SELECT user_id, buying_power, currency FROM balances
     WHERE user_id = ANY(%s) ORDER BY user_id FOR UPDATE
"""


@dataclass
class BackfillResult:
    users_examined: int = 0
    postings: int = 0
    amount: Decimal = Decimal(0)
    remaining: int = 0


def backfill_pending() -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM ({DIFFERENCES_SQL}) d WHERE d.legacy IS NOT NULL")
        return cursor.fetchone()[0]


def backfill_run(*, chunk_size: int = 500, on_progress=None) -> BackfillResult:
    """Bring every user's ledger balance to their legacy balance with opening-balance postings
    (against opening-balance equity), chunk by chunk, each chunk one transaction.

    Online: each user's legacy row is locked while its posting is computed and written, so a
    concurrent mutation waits and is not lost or counted twice. Resumable and idempotent: what
    is posted is the difference found under that lock, so a run killed at any point resumes by
    running again, and a finished user is never posted twice."""
    result = BackfillResult()
    cursor_user = UUID(int=0)
    while True:
        with transaction.atomic(durable=True):
            _phase_lock_shared()
            state = phase_state()
            if state.kill_switch:
                raise KillSwitchEngaged(f"kill switch engaged: {state.kill_switch_reason}")
            if state.phase == Phase.CUTOVER:
                raise NotApplicable("after cutover the legacy store is no longer the source")
            with connection.cursor() as cursor:
                cursor.execute(BACKFILL_CANDIDATES_SQL, [cursor_user, chunk_size])
                candidates = [row[0] for row in cursor.fetchall()]
                if not candidates:
                    break
                cursor.execute(BACKFILL_LOCK_ROWS_SQL, [candidates])
                rows = cursor.fetchall()
            for user_id, legacy, currency in rows:
                posted = _backfill_user(user_id, legacy, currency)
                result.users_examined += 1
                if posted:
                    result.postings += 1
                    result.amount += abs(posted)
            cursor_user = candidates[-1]
        if on_progress:
            on_progress(result.users_examined)
    return result


def _backfill_user(user_id: UUID, legacy: Decimal, currency: str) -> Decimal:
    """Post the difference between the user's legacy and ledger balance; returns it."""
    account = account_open(
        user_id=user_id, account_type=user_account_type(currency), currency=currency
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT balance, entry_count FROM ledger_accounts WHERE id = %s FOR UPDATE",
            [account.pk],
        )
        ledger, entries = cursor.fetchone()
    difference = legacy - ledger
    if not difference:
        return Decimal(0)
    equity = system_account(code=f"opening_balance_equity_{currency.lower()}")
    legs = (
        [Leg.debit(equity, difference), Leg.credit(account, difference)]
        if difference > 0
        else [Leg.debit(account, -difference), Leg.credit(equity, -difference)]
    )
    transaction_apply(
        namespace=BACKFILL_NAMESPACE,
        # Unique per state of the account: a re-run after a committed posting finds no
        # difference; one after a rolled-back chunk posts under the same reference.
        reference_id=f"{user_id}:{entries}",
        kind="opening_balance" if entries == 0 else "backfill_adjustment",
        legs=legs,
        metadata={"user_id": str(user_id), "legacy_balance": str(legacy)},
    )
    return difference


# --- balance API clients and idempotency keys -------------------------------------------------

# Money out of a user's balance: debits and withdrawals share one rolling limit.
SPEND_DIRECTION = {
    ApiScope.CREDIT: Direction.CREDIT,
    ApiScope.DEBIT: Direction.DEBIT,
    ApiScope.WITHDRAW: Direction.DEBIT,
}
SPEND_WINDOW = timedelta(hours=24)


def api_client_create(
    *,
    name: str,
    scopes: list[str],
    actor: Actor,
    user_id: UUID | None = None,
    max_amount: Decimal | None = None,
    daily_limit: Decimal | None = None,
    reason: str = "",
) -> tuple[ApiClient, str]:
    """A new API client and its bearer token (shown once; only its hash is stored), audited.
    A client scoped to one user never gets `credit` (the database refuses it as well)."""
    unknown = sorted(set(scopes) - set(ApiScope.values))
    if unknown or not scopes:
        raise ApiClientRefused(
            f"scopes must be some of {', '.join(ApiScope.values)}, "
            f"got {', '.join(scopes) or 'none'}"
        )
    if user_id is not None and ApiScope.CREDIT in scopes:
        raise ApiClientRefused("a client scoped to one user may not credit balances")
    for label, value in (("max amount", max_amount), ("daily limit", daily_limit)):
        if value is not None and value <= 0:
            raise ApiClientRefused(f"the {label} must be positive")
    token = secrets.token_urlsafe(32)
    with transaction.atomic():
        if ApiClient.objects.filter(name=name).exists():
            raise ApiClientRefused(f"a client named {name!r} already exists")
        client = ApiClient.objects.create(
            name=name,
            token_sha256=token_digest(token),
            user_id=user_id,
            scopes=sorted(set(scopes), key=ApiScope.values.index),
            max_amount=max_amount,
            daily_limit=daily_limit,
        )
        operator_action_record(
            actor=actor,
            action="api_client.create",
            target=f"api_client:{client.pk}",
            before={},
            after={
                "name": name,
                "user_id": str(user_id) if user_id else None,
                "scopes": client.scopes,
                "max_amount": str(max_amount) if max_amount is not None else None,
                "daily_limit": str(daily_limit) if daily_limit is not None else None,
            },
            reason=reason,
        )
    return client, token


@dataclass(frozen=True)
class IdempotencyClaim:
    record: IdempotencyRecord | None  # set: this request owns the key and must complete it
    replay_status: int | None = None
    replay_body: dict | None = None
    owner_token: UUID | None = None  # this claim's; completing or releasing needs it


def idempotency_claim(*, client: ApiClient, key: str, request_sha256: str) -> IdempotencyClaim:
    """Claim `key` for this request in a short transaction of its own, so a concurrent duplicate
    sees it at once: a finished request is replayed, one in flight is refused (409), the same
    key with another request is refused (422). An expired key starts afresh; a claim whose
    holder died is taken over after IDEMPOTENCY_LOCK_TIMEOUT under a new owner token, so the
    stalled holder can no longer complete or release it (the journal reference keeps the
    mutation itself exactly-once)."""
    now = timezone.now()
    owner_token = uuid4()
    with transaction.atomic(durable=True):
        IdempotencyRecord.objects.filter(client=client, key=key, expires_at__lte=now).delete()
        record, created = IdempotencyRecord.objects.get_or_create(
            client=client,
            key=key,
            defaults={
                "request_sha256": request_sha256,
                "status": IdempotencyStatus.IN_FLIGHT,
                "owner_token": owner_token,
                "locked_until": now + settings.IDEMPOTENCY_LOCK_TIMEOUT,
                "expires_at": now + settings.IDEMPOTENCY_KEY_TTL,
            },
        )
        if created:
            return IdempotencyClaim(record, owner_token=owner_token)
        record = IdempotencyRecord.objects.select_for_update().get(pk=record.pk)
        if record.request_sha256 != request_sha256:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used with a different request; use a new key"
            )
        if record.status == IdempotencyStatus.COMPLETED:
            return IdempotencyClaim(None, record.response_status, record.response_body)
        if record.locked_until > now:
            raise IdempotencyKeyInFlight("a request with this Idempotency-Key is in flight")
        record.locked_until = now + settings.IDEMPOTENCY_LOCK_TIMEOUT
        record.owner_token = owner_token
        record.save(update_fields=["locked_until", "owner_token"])
        return IdempotencyClaim(record, owner_token=owner_token)


def _owned(claim: IdempotencyClaim):
    return IdempotencyRecord.objects.filter(
        pk=claim.record.pk, owner_token=claim.owner_token, status=IdempotencyStatus.IN_FLIGHT
    )


def idempotency_complete(*, claim: IdempotencyClaim, status: int, body: dict) -> bool:
    """Store the answer, only while this claim still owns the record (False otherwise: a
    takeover's answer stands). A refused request (4xx) moved nothing: its spend is forgotten."""
    with transaction.atomic():
        done = _owned(claim).update(
            status=IdempotencyStatus.COMPLETED, response_status=status, response_body=body
        )
        if done and status >= 400:
            ApiClientSpend.objects.filter(idempotency_record=claim.record.pk).delete()
    return bool(done)


def idempotency_release(*, claim: IdempotencyClaim) -> bool:
    """Forget a claim whose request failed in a retryable way (nothing was applied), with its
    spend, only while this claim still owns the record (False otherwise)."""
    with transaction.atomic():
        owned = list(_owned(claim).select_for_update().values_list("pk", flat=True))
        if not owned:
            return False
        ApiClientSpend.objects.filter(idempotency_record__in=owned).delete()
        IdempotencyRecord.objects.filter(pk__in=owned).delete()
    return True


def api_client_spend(
    *, claim: IdempotencyClaim, scope: str, amount: Decimal, currency: str
) -> ApiClientSpend:
    """Count `amount` against the client's limits before the mutation runs: at most
    `max_amount` per operation and `daily_limit` per direction over the last 24 hours. Decided
    and recorded under a row lock on the client, so concurrent requests are counted one after
    the other; a takeover of the same key finds its spend already recorded."""
    direction = SPEND_DIRECTION[scope]
    with transaction.atomic():
        client = ApiClient.objects.select_for_update().get(pk=claim.record.client_id)
        if not _owned(claim).exists():
            raise IdempotencyKeyInFlight("this request no longer holds its Idempotency-Key")
        existing = ApiClientSpend.objects.filter(idempotency_record=claim.record.pk).first()
        if existing is not None:
            return existing
        if client.max_amount is not None and amount > client.max_amount:
            raise ApiClientLimitExceeded(
                f"{amount} is over this client's maximum of {client.max_amount} per operation",
                limit="max_amount",
            )
        if client.daily_limit is not None:
            spent = ApiClientSpend.objects.filter(
                client=client, direction=direction, at__gt=timezone.now() - SPEND_WINDOW
            ).aggregate(total=Sum("amount"))["total"] or Decimal(0)
            if spent + amount > client.daily_limit:
                raise ApiClientLimitExceeded(
                    f"{direction} of {amount} would take this client's last 24 h to "
                    f"{spent + amount}, over its daily limit of {client.daily_limit}",
                    limit="daily_limit",
                )
        return ApiClientSpend.objects.create(
            client=client,
            idempotency_record_id=claim.record.pk,
            direction=direction,
            amount=amount,
            currency=currency,
        )

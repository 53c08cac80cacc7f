"""Writes of the cutover: the balance path (every user-balance mutation), the phase machine,
the kill switch, discrepancies, reconciliation and backfill.

Locking: every balance mutation holds the phase lock shared (a PostgreSQL advisory lock) for its
whole transaction; phase changes and the kill switch take it exclusively. So a flip waits for the
mutations in flight, and no mutation starts under the old state once a flip has begun.
Within a mutation the user's legacy row is locked first, then (by the ledger) the accounts.
"""

import secrets
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from cutover import metrics
from cutover.actors import Actor
from cutover.exceptions import (
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
from cutover.models import (
    ApiClient,
    AuditAction,
    BalanceMutation,
    Direction,
    DiscrepancySource,
    IdempotencyRecord,
    IdempotencyStatus,
    LedgerStatus,
    PhaseAudit,
    PhaseState,
    ReconciliationRun,
    StrictFailure,
)
from cutover.phases import (
    DUAL_WRITE,
    LEDGER_FAILURE_TOLERATED,
    WRITES_LEDGER,
    WRITES_LEGACY,
    Phase,
    next_phase,
)
from cutover.selectors import (
    DIFFERENCES_SQL,
    TOTALS_SQL,
    equality_proof,
    gate_evaluate,
    phase_state,
    token_digest,
    user_account_type,
)
from ledger.exceptions import InsufficientFunds, LedgerError
from ledger.money import amount_parse
from ledger.selectors import system_account
from ledger.services import Leg, account_open, transaction_apply

# Advisory lock keys (any fixed 64-bit numbers; named here so they are never reused).
PHASE_LOCK = 7_401_001
RECONCILE_LOCK = 7_401_002
BACKFILL_LOCK = 7_401_003
LEDGER_NAMESPACE = "balance"
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


JOURNAL_INSERT_SQL = """
    INSERT INTO cutover_balance_mutations
        (reference, user_id, direction, amount, currency, reason, phase, ledger_status,
         correlation_id, ledger_error)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, '')
    ON CONFLICT (reference) DO NOTHING
    RETURNING id
"""
LEGACY_OPEN_SQL = """
    INSERT INTO balances (user_id, buying_power, currency) VALUES (%s, 0, %s)
    ON CONFLICT (user_id) DO NOTHING
"""
LEGACY_LOCK_SQL = "SELECT buying_power, currency FROM balances WHERE user_id = %s FOR UPDATE"
LEGACY_UPDATE_SQL = "UPDATE balances SET buying_power = %s, updated_at = now() WHERE user_id = %s"
DISCREPANCY_UPSERT_SQL = """
    INSERT INTO cutover_discrepancies
        (user_id, currency, legacy_balance, ledger_balance, difference, status, source, phase,
         reference, detail, occurrences)
    VALUES (%s, %s, %s, %s, %s, 'open', %s, %s, %s, %s, 1)
    ON CONFLICT (user_id, currency) WHERE status = 'open' DO UPDATE
       SET legacy_balance = EXCLUDED.legacy_balance, ledger_balance = EXCLUDED.ledger_balance,
           difference = EXCLUDED.difference, source = EXCLUDED.source,
           phase = EXCLUDED.phase, reference = EXCLUDED.reference, detail = EXCLUDED.detail,
           occurrences = cutover_discrepancies.occurrences + 1, last_seen_at = now()
"""


def _legacy_write(user_id: UUID, currency: str, delta: Decimal) -> Decimal:
    """The legacy write path as the old code had it: a row update under a row lock."""
    with connection.cursor() as cursor:
        if delta > 0:
            cursor.execute(LEGACY_OPEN_SQL, [user_id, currency])
        cursor.execute(LEGACY_LOCK_SQL, [user_id])
        row = cursor.fetchone()
        current, held = row if row else (Decimal(0), currency)
        if held != currency:
            raise MutationConflict(
                f"user {user_id} holds {held} in the legacy store, not {currency}"
            )
        after = current + delta
        if after < 0:
            raise InsufficientFunds(
                f"user {user_id}: balance {current} {currency} is less than {-delta}"
            )
        cursor.execute(LEGACY_UPDATE_SQL, [after, user_id])
    return after


def _ledger_legs(user_account, direction: str, amount: Decimal, counterparty: str | None):
    code = counterparty or (
        f"deposits_clearing_{user_account.currency_id.lower()}"
        if direction == Direction.CREDIT
        else f"withdrawals_clearing_{user_account.currency_id.lower()}"
    )
    other = system_account(code=code)
    if direction == Direction.CREDIT:
        return [Leg.debit(other, amount), Leg.credit(user_account, amount)]
    return [Leg.debit(user_account, amount), Leg.credit(other, amount)]


def _ledger_write(user_id, currency, direction, amount, reference, reason, counterparty, meta):
    account = account_open(
        user_id=user_id, account_type=user_account_type(currency), currency=currency
    )
    return transaction_apply(
        namespace=LEDGER_NAMESPACE,
        reference_id=reference,
        kind=f"balance_{direction}",
        legs=_ledger_legs(account, direction, amount, counterparty),
        metadata={"reason": reason, "user_id": str(user_id), **meta},
    ).transaction_id


def _ledger_balance(user_id: UUID, currency: str) -> Decimal | None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT balance FROM ledger_accounts WHERE user_id = %s AND account_type = %s "
            "AND currency = %s",
            [user_id, user_account_type(currency), currency],
        )
        row = cursor.fetchone()
    return row[0] if row else None


def discrepancy_record(
    *, user_id, currency, legacy, ledger, source, phase, reference="", detail=""
) -> None:
    """Open (or update) the user's discrepancy. Expects to run inside the writer's transaction."""
    difference = (legacy or Decimal(0)) - (ledger or Decimal(0))
    with connection.cursor() as cursor:
        cursor.execute(
            DISCREPANCY_UPSERT_SQL,
            [user_id, currency, legacy, ledger, difference, source, phase, reference, detail],
        )
    transaction.on_commit(metrics.discrepancy_count.inc)


def _replay(reference: str, user_id, direction, amount, currency) -> MutationResult:
    first = BalanceMutation.objects.get(reference=reference)
    if (first.user_id, first.direction, first.amount, first.currency) != (
        user_id,
        direction,
        amount,
        currency,
    ):
        raise MutationConflict(
            f"reference {reference} was already used for {first.direction} {first.amount} "
            f"{first.currency} to user {first.user_id}"
        )
    return MutationResult(
        reference,
        first.user_id,
        first.direction,
        first.amount,
        first.currency,
        first.phase,
        first.legacy_balance_after,
        first.ledger_status,
        created=False,
    )


_write_tally = {LedgerStatus.POSTED: 0, LedgerStatus.FAILED: 0}


def _write_outcome(status: str) -> None:
    metrics.ledger_write_outcome.labels(outcome=status).inc()
    _write_tally[status] += 1
    metrics.write_success_rate.set(_write_tally[LedgerStatus.POSTED] / sum(_write_tally.values()))


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
    """Apply one user-balance mutation inside the caller's transaction, routed by phase.

    Exactly once per `reference` in every phase (the journal row); the same reference with a
    different mutation raises MutationConflict. `counterparty` names the system account on the
    other side of the ledger posting (default: deposits or withdrawals clearing).
    """
    if not connection.in_atomic_block:
        raise RuntimeError("balance_mutation_apply must run inside transaction.atomic()")
    if direction not in Direction.values:
        raise MutationConflict(f"direction must be credit or debit, not {direction!r}")
    amount = amount_parse(amount, currency)
    _phase_lock_shared()
    state = phase_state()
    if state.kill_switch:
        raise KillSwitchEngaged(f"kill switch engaged: {state.kill_switch_reason}")
    phase = Phase(state.phase)
    writes_ledger = phase in WRITES_LEDGER
    with connection.cursor() as cursor:
        cursor.execute(
            JOURNAL_INSERT_SQL,
            [
                reference,
                user_id,
                direction,
                amount,
                currency,
                reason,
                phase.value,
                LedgerStatus.POSTED if writes_ledger else LedgerStatus.NOT_WRITTEN,
                correlation_id,
            ],
        )
        journal = cursor.fetchone()
    if journal is None:
        return _replay(reference, user_id, direction, amount, currency)

    delta = amount if direction == Direction.CREDIT else -amount
    legacy_after = _legacy_write(user_id, currency, delta) if phase in WRITES_LEGACY else None
    ledger_status, ledger_txn, ledger_error = LedgerStatus.NOT_WRITTEN, None, ""
    if writes_ledger:
        args = (user_id, currency, direction, amount, reference, reason, counterparty)
        meta = {"correlation_id": correlation_id} if correlation_id else {}
        if phase in LEDGER_FAILURE_TOLERATED:
            try:
                with transaction.atomic():  # the savepoint of the shadow write
                    ledger_txn = _ledger_write(*args, meta)
                ledger_status = LedgerStatus.POSTED
            except (LedgerError, DatabaseError) as exc:
                ledger_status, ledger_error = LedgerStatus.FAILED, str(exc)
        else:
            try:
                ledger_txn = _ledger_write(*args, meta)
            except InsufficientFunds:
                if phase == Phase.CUTOVER:
                    raise  # the ledger is the only store: an ordinary refusal
                raise StrictLedgerFailure(
                    f"ledger refused the debit that the legacy store allowed (user {user_id})"
                ) from None
            except (LedgerError, DatabaseError) as exc:
                raise StrictLedgerFailure(f"ledger write failed: {exc}") from exc
            ledger_status = LedgerStatus.POSTED
        transaction.on_commit(lambda: _write_outcome(ledger_status))

    BalanceMutation.objects.filter(pk=journal[0]).update(
        legacy_balance_after=legacy_after,
        ledger_status=ledger_status,
        ledger_transaction_id=ledger_txn,
        ledger_error=ledger_error,
    )
    if phase in DUAL_WRITE:
        ledger_after = _ledger_balance(user_id, currency)
        if ledger_after != legacy_after:
            discrepancy_record(
                user_id=user_id,
                currency=currency,
                legacy=legacy_after,
                ledger=ledger_after,
                source=(
                    DiscrepancySource.LEDGER_WRITE_FAILED
                    if ledger_status == LedgerStatus.FAILED
                    else DiscrepancySource.DUAL_WRITE
                ),
                phase=phase.value,
                reference=reference,
                detail=ledger_error,
            )
    return MutationResult(
        reference,
        user_id,
        direction,
        amount,
        currency,
        phase.value,
        legacy_after,
        ledger_status,
        created=True,
    )


def balance_mutate(**kwargs) -> MutationResult:
    """`balance_mutation_apply` in a transaction of its own. A strict-mode failure rolls the
    whole mutation back and is then recorded (StrictFailure) before it is raised."""
    try:
        with transaction.atomic(durable=True):
            result = balance_mutation_apply(**kwargs)
    except StrictLedgerFailure as exc:
        StrictFailure.objects.create(
            phase=phase_state().phase,
            user_id=kwargs["user_id"],
            reference=kwargs["reference"],
            error=str(exc),
        )
        metrics.strict_failures.inc()
        raise
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


def phase_seed(*, phase: str) -> PhaseState:
    """The first phase state, from the environment's flags (a no-op once it exists)."""
    with transaction.atomic():
        state, created = PhaseState.objects.get_or_create(
            pk=1, defaults={"phase": phase, "entered_at": timezone.now()}
        )
        if created:
            _audit(Actor("environment"), AuditAction.SEED, phase, phase, "first start", {})
    return state


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


LEGACY_REBUILD_SQL = """
    INSERT INTO balances (user_id, buying_power, currency, updated_at)
    SELECT a.user_id, a.balance, a.currency, now()
      FROM ledger_accounts a
     WHERE a.user_id IS NOT NULL AND a.account_type = lower(a.currency) || '_balance'
    ON CONFLICT (user_id) DO UPDATE
       SET buying_power = EXCLUDED.buying_power, currency = EXCLUDED.currency,
           updated_at = now()
     WHERE balances.buying_power IS DISTINCT FROM EXCLUDED.buying_power
"""


def phase_rollback(*, actor: Actor, reason: str) -> PhaseAudit:
    """Emergency rollback to legacy from any phase, in one step. From cutover the legacy store
    is stale: it is rebuilt from the ledger in the same transaction as the flip."""
    actor.require("cutover.rollback_phase")
    if not reason.strip():
        raise ReasonRequired("rollback needs a written --reason")
    with transaction.atomic(durable=True):
        state = _locked_state()
        current = Phase(state.phase)
        if current == Phase.LEGACY:
            raise TransitionRefused("already in legacy: nothing to roll back")
        evidence: dict = {"totals_before": _totals()}
        if current == Phase.CUTOVER:
            with connection.cursor() as cursor:
                cursor.execute(LEGACY_REBUILD_SQL)
                evidence["legacy_rows_rebuilt"] = cursor.rowcount
                cursor.execute("COMMENT ON TABLE balances IS NULL")
            evidence["totals_after"] = _totals()
        state.phase = Phase.LEGACY
        state.entered_at = timezone.now()
        state.read_percent = 0
        state.save()
        return _audit(actor, AuditAction.ROLLBACK, current, Phase.LEGACY, reason, evidence)


def _totals() -> dict:
    with connection.cursor() as cursor:
        cursor.execute(TOTALS_SQL)
        legacy, ledger, users = cursor.fetchone()
    return {"legacy_total": str(legacy), "ledger_total": str(ledger), "legacy_users": users}


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
    from cutover.models import Discrepancy, DiscrepancyStatus

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


def reconciliation_run(*, triggered_by: str) -> ReconciliationResult:
    """Compare every user's legacy and ledger balance in one snapshot, set-based; record new
    discrepancies, resolve the ones that agree again. One at a time (advisory lock)."""
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


def api_client_create(*, name: str, user_id: UUID | None = None) -> tuple[ApiClient, str]:
    """A new API client and its bearer token (shown once; only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    client = ApiClient.objects.create(name=name, token_sha256=token_digest(token), user_id=user_id)
    return client, token


@dataclass(frozen=True)
class IdempotencyClaim:
    record: IdempotencyRecord | None  # set: this request owns the key and must complete it
    replay_status: int | None = None
    replay_body: dict | None = None


def idempotency_claim(*, client: ApiClient, key: str, request_sha256: str) -> IdempotencyClaim:
    """Claim `key` for this request in a short transaction of its own, so a concurrent duplicate
    sees it at once: a finished request is replayed, one in flight is refused (409), the same
    key with another request is refused (422). An expired key starts afresh; a claim whose
    holder died is taken over after IDEMPOTENCY_LOCK_TIMEOUT (the journal reference keeps the
    mutation itself exactly-once)."""
    now = timezone.now()
    with transaction.atomic(durable=True):
        IdempotencyRecord.objects.filter(client=client, key=key, expires_at__lte=now).delete()
        record, created = IdempotencyRecord.objects.get_or_create(
            client=client,
            key=key,
            defaults={
                "request_sha256": request_sha256,
                "status": IdempotencyStatus.IN_FLIGHT,
                "locked_until": now + settings.IDEMPOTENCY_LOCK_TIMEOUT,
                "expires_at": now + settings.IDEMPOTENCY_KEY_TTL,
            },
        )
        if created:
            return IdempotencyClaim(record)
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
        record.save(update_fields=["locked_until"])
        return IdempotencyClaim(record)


def idempotency_complete(*, record: IdempotencyRecord, status: int, body: dict) -> None:
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        status=IdempotencyStatus.COMPLETED, response_status=status, response_body=body
    )


def idempotency_release(*, record: IdempotencyRecord) -> None:
    """Forget a claim whose request failed in a retryable way (nothing was applied)."""
    IdempotencyRecord.objects.filter(pk=record.pk, status=IdempotencyStatus.IN_FLIGHT).delete()

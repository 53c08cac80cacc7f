"""The phase machine: advancing through the phases (gates, read percentage, the cutover's
equality proof), the emergency rollback (rebuilding the legacy store after cutover) and the kill
switch. They take the phase lock exclusively (the write fence) while every balance mutation holds
it shared, so a flip waits for the mutations in flight and no mutation starts under the old state
once a flip has begun."""

import logging
import time
from dataclasses import dataclass

from django.db import connection, transaction
from django.utils import timezone

from cutover.actors import Actor
from cutover.exceptions import (
    GateNotMet,
    ReasonRequired,
    TransitionRefused,
)
from cutover.gates import Gate, GateCheck, equality_proof, gate_evaluate
from cutover.locks import PHASE_LOCK
from cutover.models import (
    AuditAction,
    PhaseAudit,
    PhaseState,
)
from cutover.phases import (
    Phase,
    next_phase,
)
from cutover.selectors import legacy_archive_get, phase_state, store_totals
from gateway.faults import fault_point
from ledger.selectors import Snapshot, snapshot_now

log = logging.getLogger(__name__)
DEPRECATION_COMMENT = "DEPRECATED: balances live in ledger_accounts since the cutover of {at}."


def _advisory(sql: str, key: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, [key])


def phase_lock_shared() -> None:
    _advisory("SELECT pg_advisory_xact_lock_shared(%s)", PHASE_LOCK)


def phase_lock_exclusive() -> None:
    _advisory("SELECT pg_advisory_xact_lock(%s)", PHASE_LOCK)


def _audit(actor: Actor, action: str, before: str, after: str, reason: str, evidence: dict):
    audit = PhaseAudit.objects.create(
        actor=actor.name,
        action=action,
        from_phase=before,
        to_phase=after,
        reason=reason,
        evidence=evidence,
    )
    transaction.on_commit(lambda: _audit_log(audit))
    return audit


# What an operator reaches for in an emergency is a warning on the log; the rest information.
_WARNING_ACTIONS = {AuditAction.FORCE, AuditAction.ROLLBACK, AuditAction.KILL_SWITCH_ON}


def _audit_log(audit: PhaseAudit) -> None:
    """The audited change on the log too, once it committed (a refused or rolled-back change
    never reaches it): who, what, from, to, why, and the audit row that holds the evidence."""
    log.log(
        logging.WARNING if audit.action in _WARNING_ACTIONS else logging.INFO,
        "%s %s -> %s by %s: %s",
        audit.action,
        audit.from_phase,
        audit.to_phase,
        audit.actor,
        audit.reason,
        extra={
            "audit_id": audit.pk,
            "action": audit.action,
            "actor": audit.actor,
            "from_phase": audit.from_phase,
            "to_phase": audit.to_phase,
            "phase": audit.to_phase,
            "reason": audit.reason,
        },
    )


def phase_state_fenced() -> PhaseState:
    """The write fence: waits for every mutation in flight, holds new ones until commit."""
    phase_lock_exclusive()
    return PhaseState.objects.select_for_update().get(pk=1)


def phase_advance(
    *, to: str, actor: Actor, reason: str = "", force: bool = False, read_percent: int = 1
) -> PhaseAudit:
    """Move to the next phase once its gate is met (or forced, with a reason, by an operator
    allowed to). In read_switch, advancing to read_switch again raises the read percentage.

    The gate's evidence (ledger verify into shadow, the stores' equality proof into cutover:
    passes over every entry or user) is computed first, in one snapshot, outside the write
    fence, so mutations flow meanwhile; a gate not met is refused there. Under the fence only
    the final proof runs: the cheap checks again, and what was written after that snapshot."""
    target = Phase(to)
    actor.require("cutover.advance_phase")
    if force:
        actor.require("cutover.force_gate")
        if not reason.strip():
            raise ReasonRequired("--force needs a written --reason")
    if not 0 < read_percent <= 100:
        raise TransitionRefused(f"read percentage must be 1..100, not {read_percent}")
    before = _gate_before_fence(target, force)
    with transaction.atomic(durable=True):
        fenced = time.perf_counter()
        state = phase_state_fenced()
        current = Phase(state.phase)
        if target == current == Phase.READ_SWITCH:
            return _read_percent_raise(state, read_percent, actor, reason)
        expected = next_phase(current)
        if target != expected:
            allowed = f"the next phase is {expected}" if expected else "cutover is terminal"
            raise TransitionRefused(f"{current} -> {target} is not a legal transition; {allowed}")
        if before is None or before.gate.from_phase != current:
            raise TransitionRefused(
                f"the phase became {current} while the gate's evidence was computed; advance again"
            )
        gate = gate_evaluate(state, target, since=before.snapshot)
        evidence = gate.as_evidence()
        evidence["before_fence"] = before.gate.as_evidence()
        if not gate.passed and not force:
            raise GateNotMet(f"gate {current} -> {target} not met: {gate.failures()}", evidence)
        if target == Phase.CUTOVER:
            # Never forcible: the legacy store stops here, so both must agree to the cent.
            proof = equality_proof(since=before.snapshot)
            evidence["proof"] = proof.__dict__
            evidence["before_fence"]["proof"] = before.proof.__dict__
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
        evidence["fence_ms"] = round((time.perf_counter() - fenced) * 1000, 1)
        return _audit(actor, action, current, target, reason, evidence)


@dataclass
class _Evidence:
    gate: Gate
    proof: GateCheck | None
    snapshot: Snapshot


def _gate_before_fence(target: Phase, force: bool) -> _Evidence | None:
    """The gate for `target` evaluated in one REPEATABLE READ snapshot, without the fence
    (None when `target` is no gate's: the read percentage, or a transition the fence will
    refuse). A gate not met (and not forced), or a failed cutover proof, is refused here."""
    with transaction.atomic(durable=True):
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        snapshot = snapshot_now()
        state = phase_state()
        current = Phase(state.phase)
        if target != next_phase(current):
            return None
        gate = gate_evaluate(state, target)
        proof = equality_proof() if target == Phase.CUTOVER else None
    evidence = gate.as_evidence()
    if not gate.passed and not force:
        raise GateNotMet(f"gate {current} -> {target} not met: {gate.failures()}", evidence)
    if proof is not None and not proof.ok:
        evidence["proof"] = proof.__dict__
        raise GateNotMet(f"cutover refused: {proof.actual}", evidence)
    return _Evidence(gate, proof, snapshot)


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
      JOIN ledger_user_balances a ON a.user_id = b.user_id
     WHERE a.currency <> b.currency ORDER BY b.user_id LIMIT 5
"""
LEGACY_REBUILD_SQL = """
    WITH ledger AS (
        SELECT a.user_id, a.currency, a.balance FROM ledger_user_balances a
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
    state = phase_state_fenced()
    current = Phase(state.phase)
    if current == Phase.LEGACY:
        raise TransitionRefused("already in legacy: nothing to roll back")
    archive = legacy_archive_get()
    if archive is not None:
        raise TransitionRefused(
            f"rollback refused: the legacy store was archived into {archive.archived_as} at "
            f"{archive.archived_at:%Y-%m-%d %H:%M} UTC by {archive.archived_by}; there is no "
            "legacy store to roll back to"
        )
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
        fault_point("rollback:legacy-rebuilt")
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
        state = phase_state_fenced()
        if state.kill_switch == engaged:
            raise TransitionRefused(f"the kill switch is already {'on' if engaged else 'off'}")
        state.kill_switch = engaged
        state.kill_switch_reason = reason if engaged else ""
        state.kill_switch_changed_at = timezone.now()
        state.save()
        action = AuditAction.KILL_SWITCH_ON if engaged else AuditAction.KILL_SWITCH_OFF
        return _audit(actor, action, state.phase, state.phase, reason, {})

"""Gates evaluated outside the write fence (cutover.phase_machine.phase_advance): the evidence
(ledger verify into shadow, the stores' equality into cutover) is computed in one snapshot while
mutations flow; under the fence only what was written after that snapshot is proved again. A
mutation that commits while the evidence is being computed (invisible to its snapshot) is still
caught by the final proof. Real connections: a second session holds a table the evidence reads,
so the mutation lands exactly then."""

import threading
import time

import pytest
from django.db import connection, transaction

from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.balance_path import balance_mutation_apply
from cutover.exceptions import GateNotMet
from cutover.gates import equality_proof
from cutover.models import PhaseState
from cutover.phase_machine import phase_advance
from ledger.selectors import ledger_integrity_checks, snapshot_now
from tests.cutover.factories import custody_open_all, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)
CLI = Actor("cli:test")


def phase() -> str:
    return PhaseState.objects.get(pk=1).phase


def waiting_on(table: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
            [table],
        )
        return cursor.fetchone()[0] > 0


def mutation_during_the_evidence(table: str, mutate) -> threading.Thread:
    """A session that locks `table` (which the gate's evidence reads after taking its
    snapshot), applies `mutate` in the same transaction, and commits once the advancing
    session waits for the table: the mutation commits during the evidence's computation."""
    locked = threading.Event()

    def session() -> None:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            mutate()
            locked.set()
            deadline = time.time() + 30
            while not waiting_on(table) and time.time() < deadline:
                time.sleep(0.02)
        connection.close()

    thread = threading.Thread(target=session)
    thread.start()
    locked.wait(timeout=30)
    return thread


def test_a_legacy_mutation_during_the_shadow_gates_evidence_is_caught_under_the_fence():
    users = [legacy_user("25.5") for _ in range(3)]
    backfill_run()
    custody_open_all(usdc="76.5")

    def credit() -> None:  # through the balance path, in legacy: the legacy store only
        balance_mutation_apply(
            user_id=users[1], direction="credit", amount="4.5", reference="late", reason="t"
        )

    session = mutation_during_the_evidence("cutover_custody_openings", credit)
    with pytest.raises(GateNotMet, match="backfill: needs every legacy balance") as refused:
        phase_advance(to="shadow", actor=CLI, reason="backfill verified")
    session.join()
    evidence = refused.value.evidence
    before = {c["name"]: c["ok"] for c in evidence["before_fence"]["checks"]}
    assert before["backfill"] is True  # the evidence's snapshot did not see the credit
    fenced = {c["name"]: c for c in evidence["checks"]}
    assert not fenced["backfill"]["ok"]
    assert fenced["backfill"]["actual"].startswith("1 of ")
    assert fenced["ledger_verify"]["ok"]  # the mirror posting, verified since the snapshot
    assert phase() == "legacy"
    backfill_run()
    audit = phase_advance(to="shadow", actor=CLI, reason="backfill verified")
    assert phase() == "shadow" and audit.evidence["fence_ms"] >= 0
    assert audit.evidence["before_fence"]["passed"] and audit.evidence["passed"]


def test_a_drift_during_the_cutover_proofs_evidence_refuses_the_cutover():
    """A write that bypasses the balance path (the legacy system's own), committed while the
    equality proof's evidence is computed: the final proof under the fence refuses, even
    forced."""
    user = legacy_user("100")
    backfill_run()
    phase_set("strict", read_percent=100)

    def drift() -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE balances SET buying_power = buying_power + 0.01 WHERE user_id = %s",
                [user],
            )

    session = mutation_during_the_evidence("cutover_strict_failures", drift)
    with pytest.raises(GateNotMet, match="cutover refused: 1 of 1 users written since") as refused:
        phase_advance(to="cutover", actor=CLI, force=True, reason="drill")
    session.join()
    evidence = refused.value.evidence
    assert evidence["before_fence"]["proof"]["ok"] is True
    assert evidence["proof"]["ok"] is False and str(user) in evidence["proof"]["actual"]
    assert phase() == "strict"


def test_a_row_deleted_after_the_evidence_moves_the_totals_the_final_proof_compares():
    users = [legacy_user("10"), legacy_user("20")]
    backfill_run()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        since = snapshot_now()
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM balances WHERE user_id = %s", [users[0]])
    proof = equality_proof(since=since)
    assert not proof.ok and "legacy total 20" in proof.actual and "ledger total 30" in proof.actual


def test_ledger_verify_since_a_snapshot_checks_what_was_posted_after_it():
    legacy_user("10")
    backfill_run()
    since = snapshot_now()
    legacy_user("5")
    backfill_run()
    checks = ledger_integrity_checks(since)
    assert all(check.ok for check in checks)
    with connection.cursor() as cursor:  # a tampered new entry (the rules switched off)
        cursor.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_immutable")
        cursor.execute(
            "UPDATE ledger_entries SET amount = amount + 1 WHERE id = (SELECT max(id) FROM "
            "ledger_entries)"
        )
        cursor.execute("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_immutable")
    failed = {check.name: check.problems for check in ledger_integrity_checks(since)}
    assert failed["balanced"] and failed["hash_chains"]

"""The phase machine: legal transitions, gates with evidence, force, rollback, kill switch,
permissions and the audit trail."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.db import DatabaseError, connection

from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.exceptions import (
    GateNotMet,
    OperatorNotPermitted,
    ReasonRequired,
    TransitionRefused,
)
from cutover.models import LegacyBalance, PhaseAudit, PhaseState
from cutover.phase_machine import kill_switch_set, phase_advance, phase_rollback
from cutover.reconciliation import reconciliation_run
from ledger.models import Account
from tests.cutover.factories import custody_open_all, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)
CLI = Actor("cli:test")


@pytest.fixture(autouse=True)
def short_gates(settings):
    settings.CUTOVER_SHADOW_MIN_DURATION = timedelta(0)
    settings.CUTOVER_READ_SWITCH_MIN_DURATION = timedelta(0)
    settings.CUTOVER_STRICT_MIN_DURATION = timedelta(0)
    with connection.cursor() as cursor:  # DDL outlives the flush between tests
        cursor.execute("COMMENT ON TABLE balances IS NULL")


def state() -> PhaseState:
    return PhaseState.objects.get(pk=1)


def audits() -> list[tuple[str, str, str]]:
    return list(
        PhaseAudit.objects.exclude(action="seed")
        .order_by("id")
        .values_list("action", "from_phase", "to_phase")
    )


def table_comment() -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT obj_description('balances'::regclass, 'pg_class')")
        return cursor.fetchone()[0]


def test_first_state_is_seeded_from_the_environment_and_audited():
    assert state().phase == "legacy"
    seed = PhaseAudit.objects.get(action="seed")
    assert seed.actor == "environment" and seed.to_phase == "legacy"


def test_illegal_transition_is_refused_and_nothing_changes():
    with pytest.raises(TransitionRefused, match="legacy -> strict is not a legal transition"):
        phase_advance(to="strict", actor=CLI)
    assert state().phase == "legacy" and audits() == []


def test_shadow_gate_needs_the_backfill_then_passes_with_evidence():
    users = [legacy_user("25.5") for _ in range(3)]
    with pytest.raises(
        GateNotMet, match="backfill: needs every legacy balance in the ledger, is 3"
    ):
        phase_advance(to="shadow", actor=CLI)
    assert state().phase == "legacy"
    result = backfill_run(chunk_size=2)
    assert result.postings == 3 and result.amount == Decimal("76.5")
    custody_open_all(usdc="76.5")
    audit = phase_advance(to="shadow", actor=CLI, reason="backfill verified")
    assert state().phase == "shadow"
    assert audit.action == "advance" and audit.reason == "backfill verified"
    checks = {c["name"]: c for c in audit.evidence["checks"]}
    assert checks["backfill"]["ok"] and checks["ledger_verify"]["ok"]
    assert checks["custody_usdc"]["ok"] and checks["custody_usd"]["ok"]
    assert all(Account.objects.get(user_id=u).balance == Decimal("25.5") for u in users)


def test_force_needs_a_reason_and_is_audited_as_forced():
    legacy_user("10")
    with pytest.raises(ReasonRequired):
        phase_advance(to="shadow", actor=CLI, force=True)
    audit = phase_advance(to="shadow", actor=CLI, force=True, reason="drill: backfill later")
    assert audit.action == "force"
    assert audit.evidence["passed"] is False
    assert state().phase == "shadow"


def test_read_switch_gate_needs_reconciliation_and_ledger_writes():
    phase_set("shadow")
    with pytest.raises(GateNotMet) as refused:
        phase_advance(to="read_switch", actor=CLI)
    failed = {c["name"] for c in refused.value.evidence["checks"] if not c["ok"]}
    assert failed == {"reconciliation", "ledger_write_success"}
    user = legacy_user("0")
    balance_credit(user_id=user, amount="5", reference="r1", reason="test")
    reconciliation_run(triggered_by="test")
    audit = phase_advance(to="read_switch", actor=CLI, read_percent=1)
    assert state().phase == "read_switch" and state().read_percent == 1
    assert audit.evidence["read_percent"] == 1


def test_open_discrepancy_blocks_the_gate():
    phase_set("shadow")
    user = legacy_user("0")
    balance_credit(user_id=user, amount="5", reference="r1", reason="test")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE balances SET buying_power = 6 WHERE user_id = %s", [user])
    result = reconciliation_run(triggered_by="test")
    assert result.differences == 1 and result.new_discrepancies == 1
    with pytest.raises(GateNotMet, match="open_discrepancies: needs 0, is 1"):
        phase_advance(to="read_switch", actor=CLI)


def test_read_percentage_only_grows_and_strict_needs_all_reads():
    phase_set("read_switch", read_percent=10)
    legacy_user("0")
    reconciliation_run(triggered_by="test")
    with pytest.raises(TransitionRefused, match="can only grow"):
        phase_advance(to="read_switch", actor=CLI, read_percent=5)
    with pytest.raises(GateNotMet, match="read_percent: needs 100, is 10"):
        phase_advance(to="strict", actor=CLI)
    for percent in (50, 100):
        phase_advance(to="read_switch", actor=CLI, read_percent=percent, reason="step")
    assert state().read_percent == 100
    audit = phase_advance(to="strict", actor=CLI)
    names = {c["name"] for c in audit.evidence["checks"]}
    assert {"read_p99", "read_percent", "reconciliation"} <= names
    assert [a[0] for a in audits()] == ["read_percent", "read_percent", "advance"]


def test_cutover_proves_equality_and_deprecates_the_legacy_table():
    phase_set("strict", read_percent=100)
    user = legacy_user("0")
    balance_credit(user_id=user, amount="12", reference="r1", reason="test")
    reconciliation_run(triggered_by="test")
    audit = phase_advance(to="cutover", actor=CLI, reason="72 h clean")
    assert audit.evidence["proof"]["ok"] is True
    assert "1 users" in audit.evidence["proof"]["actual"]
    assert table_comment().startswith("DEPRECATED")
    balance_credit(user_id=user, amount="3", reference="r2", reason="test")
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("12")  # not written


def test_cutover_is_refused_when_the_stores_differ_even_forced():
    phase_set("strict", read_percent=100)
    user = legacy_user("0")
    balance_credit(user_id=user, amount="12", reference="r1", reason="test")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE balances SET buying_power = 11 WHERE user_id = %s", [user])
    with pytest.raises(GateNotMet, match="cutover refused: 1 users differ"):
        phase_advance(to="cutover", actor=CLI, force=True, reason="try")
    assert state().phase == "strict" and table_comment() is None


def test_rollback_from_cutover_rebuilds_legacy_from_the_ledger():
    phase_set("cutover", read_percent=100)
    user = legacy_user("0")
    balance_credit(user_id=user, amount="20", reference="r1", reason="test")
    balance_debit(user_id=user, amount="5", reference="r2", reason="test")
    assert LegacyBalance.objects.get(user_id=user).buying_power == 0
    with pytest.raises(ReasonRequired):
        phase_rollback(actor=CLI, reason="")
    audit = phase_rollback(actor=CLI, reason="incident 42")
    assert state().phase == "legacy"
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("15")
    assert audit.evidence["legacy_rows_rebuilt"] == 1
    assert table_comment() is None
    with pytest.raises(TransitionRefused, match="already in legacy"):
        phase_rollback(actor=CLI, reason="again")


@pytest.mark.parametrize("phase", ["shadow", "read_switch", "strict"])
def test_rollback_from_a_dual_write_phase_is_one_step(phase):
    phase_set(phase, read_percent=100 if phase != "shadow" else 0)
    audit = phase_rollback(actor=CLI, reason="drill")
    assert (audit.action, audit.from_phase, audit.to_phase) == ("rollback", phase, "legacy")
    assert state().phase == "legacy" and state().read_percent == 0


def test_kill_switch_is_audited_and_needs_a_reason():
    with pytest.raises(ReasonRequired):
        kill_switch_set(engaged=True, actor=CLI, reason=" ")
    kill_switch_set(engaged=True, actor=CLI, reason="incident")
    assert state().kill_switch
    with pytest.raises(TransitionRefused, match="already on"):
        kill_switch_set(engaged=True, actor=CLI, reason="again")
    kill_switch_set(engaged=False, actor=CLI, reason="resolved")
    assert [a[0] for a in audits()] == ["kill_switch_on", "kill_switch_off"]


def test_operator_needs_the_permission():
    user = User.objects.create_user("viewer", password="a-long-password-1")
    with pytest.raises(OperatorNotPermitted, match=r"cutover\.rollback_phase"):
        phase_rollback(actor=Actor.for_user(user), reason="x")
    user.user_permissions.add(Permission.objects.get(codename="operate_kill_switch"))
    user = User.objects.get(pk=user.pk)  # permissions are cached per instance
    kill_switch_set(engaged=True, actor=Actor.for_user(user), reason="incident")
    assert PhaseAudit.objects.filter(action="kill_switch_on").get().actor == "admin:viewer"


def test_audit_trail_is_append_only():
    kill_switch_set(engaged=True, actor=CLI, reason="incident")
    for statement in (
        "UPDATE cutover_phase_audit SET reason = 'x'",
        "DELETE FROM cutover_phase_audit",
    ):
        with pytest.raises(DatabaseError, match="append-only"), connection.cursor() as cursor:
            cursor.execute(statement)
    assert PhaseAudit.objects.filter(reason="incident").count() == 1


@pytest.mark.django_db(transaction=True)
def test_operator_audit_is_append_only_and_written_with_the_action():
    from django.db import transaction as db_transaction

    from cutover.models import OperatorAudit
    from cutover.operator_audit import operator_action_record

    with pytest.raises(RuntimeError):
        operator_action_record(actor="cli:x", action="a", target="t", before={}, after={})
    with db_transaction.atomic():
        row = operator_action_record(
            actor="cli:ops",
            action="threshold.set",
            target="threshold:USDC",
            before={"minimum": "1"},
            after={"minimum": "2"},
            reason="why",
        )
    with pytest.raises(Exception, match="append-only"), db_transaction.atomic():
        OperatorAudit.objects.filter(pk=row.pk).update(reason="rewritten")
    with pytest.raises(Exception, match="append-only"), db_transaction.atomic():
        OperatorAudit.objects.filter(pk=row.pk).delete()
    assert OperatorAudit.objects.get(pk=row.pk).reason == "why"

"""Working a discrepancy (cutover.discrepancies): triage states, known-difference rules that the
gates and reconciliation honour until they expire, and the repair requested by one operator and
approved by another, after which the next reconciliation finds the user equal. Outcomes are
read from the database; the rules PostgreSQL holds are tried with raw SQL too."""

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.db import DatabaseError, IntegrityError, connection, connections, transaction
from django.utils import timezone

from cutover.actors import Actor
from cutover.discrepancies import (
    discrepancy_investigate,
    discrepancy_known_difference_mark,
    discrepancy_repair_approve,
    discrepancy_repair_request,
)
from cutover.exceptions import (
    AppendOnlyRecord,
    KillSwitchEngaged,
    NotApplicable,
    OperatorNotPermitted,
    ReasonRequired,
    RepairLapsed,
    SecondPersonRequired,
    TriageRefused,
    cutover_error_from,
)
from cutover.gates import gate_evaluate
from cutover.models import (
    Discrepancy,
    DiscrepancyRepair,
    KnownDifference,
    LegacyBalance,
    OperatorAudit,
    PhaseState,
)
from cutover.phases import Phase
from cutover.reconciliation import reconciliation_run
from cutover.selectors import known_difference_count, open_discrepancy_count, phase_state
from ledger.models import Account, Transaction
from ledger.selectors import ledger_integrity_checks
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

# Reconciliation sets its own isolation level and ledger_balance_set commits: every test here
# runs in real transactions.
pytestmark = pytest.mark.django_db(transaction=True)


def operator(name: str, *codenames: str) -> Actor:
    user = User.objects.create_user(name, password="a-long-password-1", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return Actor.for_user(User.objects.get(pk=user.pk))  # fresh: no cached permissions


def drifted(legacy: str = "10", ledger: str = "9", currency: str = "USDC") -> Discrepancy:
    """A user whose stores differ, in shadow, found by a reconciliation."""
    phase_set("shadow")
    user = legacy_user(legacy, currency)
    ledger_balance_set(user, ledger, currency)
    reconciliation_run(triggered_by="test")
    return Discrepancy.objects.get(user_id=user)


def balances(user_id, currency: str = "USDC") -> tuple[Decimal, Decimal]:
    legacy = LegacyBalance.objects.get(user_id=user_id).buying_power
    ledger = Account.objects.get(user_id=user_id, currency_id=currency).balance
    return legacy, ledger


def gate_check(name: str):
    (check,) = [c for c in gate_evaluate(phase_state(), Phase.READ_SWITCH).checks if c.name == name]
    return check


def audits(discrepancy: Discrepancy) -> list[tuple[str, str]]:
    rows = OperatorAudit.objects.filter(target=f"discrepancy:{discrepancy.pk}").order_by("id")
    return list(rows.values_list("action", "actor"))


def test_a_known_difference_stops_counting_against_the_gate_until_the_difference_moves():
    discrepancy = drifted()
    triage = operator("tess", "triage_discrepancy")
    assert open_discrepancy_count() == 1 and not gate_check("open_discrepancies").ok

    discrepancy_investigate(discrepancy_id=discrepancy.pk, actor=triage, note="ticket 12")
    discrepancy_investigate(discrepancy_id=discrepancy.pk, actor=triage, note="ticket 12")
    discrepancy.refresh_from_db()
    assert discrepancy.status == "investigating" and open_discrepancy_count() == 1

    rule = discrepancy_known_difference_mark(
        discrepancy_id=discrepancy.pk,
        actor=triage,
        reason="a fee the legacy system never charged",
        expires_at=timezone.now() + timedelta(days=7),
    )
    again = discrepancy_known_difference_mark(  # a double submit: the same rule
        discrepancy_id=discrepancy.pk,
        actor=triage,
        reason="a fee the legacy system never charged",
        expires_at=timezone.now() + timedelta(days=7),
    )
    assert again.pk == rule.pk and KnownDifference.objects.count() == 1
    assert (rule.user_id, rule.currency, rule.difference) == (
        discrepancy.user_id,
        "USDC",
        Decimal("1"),
    )
    discrepancy.refresh_from_db()
    assert (discrepancy.status, discrepancy.known_difference_id) == ("known_difference", rule.pk)
    assert (open_discrepancy_count(), known_difference_count()) == (0, 1)
    check = gate_check("open_discrepancies")
    assert check.ok and check.actual == "0 (1 known differences not counted)"

    run = reconciliation_run(triggered_by="test")  # the same difference: still known, clean
    assert (run.differences, run.known_differences, run.clean) == (1, 1, True)
    assert gate_check("reconciliation").ok
    discrepancy.refresh_from_db()
    assert discrepancy.status == "known_difference" and discrepancy.occurrences == 2

    with connection.cursor() as cursor:  # the difference moves: it is no longer the known one
        cursor.execute(
            "UPDATE balances SET buying_power = 10.5 WHERE user_id = %s", [discrepancy.user_id]
        )
    run = reconciliation_run(triggered_by="test")
    assert (run.differences, run.known_differences, run.clean) == (1, 0, False)
    discrepancy.refresh_from_db()
    assert (discrepancy.status, discrepancy.known_difference_id) == ("open", None)
    assert discrepancy.difference == Decimal("1.5") and open_discrepancy_count() == 1
    assert audits(discrepancy) == [
        ("discrepancy.investigate", "admin:tess"),
        ("discrepancy.known_difference", "admin:tess"),
    ]
    audit = OperatorAudit.objects.get(action="discrepancy.known_difference")
    assert audit.reason == "a fee the legacy system never charged"
    assert audit.before == {"status": "investigating", "known_difference": None}
    assert audit.after["difference"] == "1.000000" and audit.after["known_difference"] == rule.pk


def test_an_expired_known_difference_counts_again_and_reconciliation_reopens_it():
    discrepancy = drifted()
    now = timezone.now()
    expired = KnownDifference.objects.create(
        user_id=discrepancy.user_id,
        currency="USDC",
        difference=discrepancy.difference,
        reason="accepted for a day",
        created_by="admin:tess",
        created_at=now - timedelta(days=2),
        expires_at=now - timedelta(days=1),
    )
    Discrepancy.objects.filter(pk=discrepancy.pk).update(
        status="known_difference", known_difference=expired
    )
    assert (open_discrepancy_count(), known_difference_count()) == (1, 0)
    assert not gate_check("open_discrepancies").ok
    run = reconciliation_run(triggered_by="test")
    assert (run.known_differences, run.clean) == (0, False)
    discrepancy.refresh_from_db()
    assert (discrepancy.status, discrepancy.known_difference_id) == ("open", None)


def test_an_active_rule_matches_a_new_discrepancy_of_the_same_user_and_difference():
    """A difference that was resolved and comes back the same, while its rule runs, is known."""
    discrepancy = drifted()
    discrepancy_known_difference_mark(
        discrepancy_id=discrepancy.pk,
        actor=operator("tess", "triage_discrepancy"),
        reason="expected",
        expires_at=timezone.now() + timedelta(days=1),
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE balances SET buying_power = 9 WHERE user_id = %s", [discrepancy.user_id]
        )
    assert reconciliation_run(triggered_by="test").resolved == 1
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE balances SET buying_power = 10 WHERE user_id = %s", [discrepancy.user_id]
        )
    run = reconciliation_run(triggered_by="test")
    assert (run.new_discrepancies, run.known_differences, run.clean) == (1, 1, True)
    again = Discrepancy.objects.get(user_id=discrepancy.user_id, status="known_difference")
    assert again.pk != discrepancy.pk and open_discrepancy_count() == 0


def test_ledger_repair_needs_a_second_operator_and_the_next_reconciliation_finds_the_user_equal():
    discrepancy = drifted(legacy="1234.5", ledger="1200")
    requester = operator("rita", "request_discrepancy_repair", "approve_discrepancy_repair")
    approver = operator("alex", "approve_discrepancy_repair")
    repair = discrepancy_repair_request(
        discrepancy_id=discrepancy.pk, actor=requester, side="ledger", reason="shadow write lost"
    )
    assert (repair.status, repair.difference) == ("requested", Decimal("34.5"))
    assert (repair.legacy_balance, repair.ledger_balance) == (Decimal("1234.5"), Decimal("1200"))

    with pytest.raises(SecondPersonRequired, match="another operator approves it"):
        discrepancy_repair_approve(repair_id=repair.pk, actor=requester)
    with pytest.raises(OperatorNotPermitted, match="approve_discrepancy_repair"):
        discrepancy_repair_approve(repair_id=repair.pk, actor=operator("vic", "view_discrepancy"))
    assert balances(discrepancy.user_id) == (Decimal("1234.5"), Decimal("1200"))

    applied = discrepancy_repair_approve(repair_id=repair.pk, actor=approver)
    assert (applied.status, applied.approved_by) == ("applied", "admin:alex")
    assert (applied.legacy_after, applied.ledger_after) == (Decimal("1234.5"), Decimal("1234.5"))
    assert balances(discrepancy.user_id) == (Decimal("1234.5"), Decimal("1234.5"))
    posting = Transaction.objects.get(namespace="repair")
    assert posting.pk == applied.ledger_transaction_id
    assert posting.reference_id == f"discrepancy:{discrepancy.pk}:repair:{repair.pk}"
    legs = {(e.account.code or "user", e.side, e.amount) for e in posting.entries.all()}
    assert legs == {
        ("opening_balance_equity_usdc", "debit", Decimal("34.5")),
        ("user", "credit", Decimal("34.5")),
    }
    discrepancy.refresh_from_db()
    assert (discrepancy.status, discrepancy.resolved_by) == ("repaired", "admin:alex")
    assert "requested by admin:rita, approved by admin:alex" in discrepancy.resolution_note

    run = reconciliation_run(triggered_by="test")
    assert (run.differences, run.new_discrepancies, run.clean) == (0, 0, True)
    assert list(Discrepancy.objects.values_list("status", flat=True)) == ["repaired"]
    assert all(check.ok for check in ledger_integrity_checks())
    assert audits(discrepancy) == [
        ("discrepancy.repair_request", "admin:rita"),
        ("discrepancy.repair", "admin:alex"),
    ]
    audit = OperatorAudit.objects.get(action="discrepancy.repair")
    assert audit.reason == "shadow write lost"
    assert audit.before["ledger_balance"] == "1200.000000"
    assert audit.after["ledger_balance"] == "1234.500000"
    assert audit.after["ledger_transaction_id"] == posting.pk


def test_legacy_repair_sets_the_legacy_store_to_the_ledger_and_ends_the_known_difference():
    discrepancy = drifted(legacy="9", ledger="10.25", currency="USD")
    rule = discrepancy_known_difference_mark(
        discrepancy_id=discrepancy.pk,
        actor=operator("tess", "triage_discrepancy"),
        reason="while support looks",
        expires_at=timezone.now() + timedelta(days=3),
    )
    repair = discrepancy_repair_request(
        discrepancy_id=discrepancy.pk,
        actor=operator("rita", "request_discrepancy_repair"),
        side="legacy",
        reason="legacy missed a credit",
    )
    discrepancy_repair_approve(
        repair_id=repair.pk, actor=operator("alex", "approve_discrepancy_repair")
    )
    assert balances(discrepancy.user_id, "USD") == (Decimal("10.25"), Decimal("10.25"))
    assert not Transaction.objects.filter(namespace="repair").exists()
    rule.refresh_from_db()
    assert rule.expires_at <= timezone.now()  # ended: a future drift of 1.25 counts
    assert reconciliation_run(triggered_by="test").clean
    discrepancy.refresh_from_db()
    assert discrepancy.status == "repaired"


def test_a_repair_whose_difference_moved_lapses_and_posts_nothing():
    discrepancy = drifted()
    repair = discrepancy_repair_request(
        discrepancy_id=discrepancy.pk,
        actor=operator("rita", "request_discrepancy_repair"),
        side="ledger",
        reason="r",
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE balances SET buying_power = 12 WHERE user_id = %s", [discrepancy.user_id]
        )
    with pytest.raises(
        RepairLapsed, match=r"now differ by 3\.000000 .*, not the 1\.000000 requested"
    ):
        discrepancy_repair_approve(
            repair_id=repair.pk, actor=operator("alex", "approve_discrepancy_repair")
        )
    repair.refresh_from_db()
    assert repair.status == "lapsed" and "request it again" in repair.lapsed_why
    assert balances(discrepancy.user_id) == (Decimal("12"), Decimal("9"))
    assert not Transaction.objects.filter(namespace="repair").exists()
    assert audits(discrepancy)[-1] == ("discrepancy.repair_lapse", "admin:alex")
    with pytest.raises(RepairLapsed, match="lapsed"):  # asked again: still lapsed, once
        discrepancy_repair_approve(
            repair_id=repair.pk, actor=operator("bo", "approve_discrepancy_repair")
        )
    assert OperatorAudit.objects.filter(action="discrepancy.repair_lapse").count() == 1


def test_requests_are_idempotent_and_a_newer_one_replaces_the_waiting_one():
    discrepancy = drifted()
    rita = operator("rita", "request_discrepancy_repair")
    first = discrepancy_repair_request(
        discrepancy_id=discrepancy.pk, actor=rita, side="ledger", reason="r"
    )
    again = discrepancy_repair_request(
        discrepancy_id=discrepancy.pk, actor=rita, side="ledger", reason="r"
    )
    assert again.pk == first.pk and DiscrepancyRepair.objects.count() == 1
    newer = discrepancy_repair_request(
        discrepancy_id=discrepancy.pk,
        actor=operator("sam", "request_discrepancy_repair"),
        side="legacy",
        reason="no: legacy is wrong",
    )
    first.refresh_from_db()
    assert (
        first.status == "lapsed" and first.lapsed_why == "replaced by a newer request of admin:sam"
    )
    alex = operator("alex", "approve_discrepancy_repair")
    with pytest.raises(RepairLapsed, match="replaced by a newer request"):
        discrepancy_repair_approve(repair_id=first.pk, actor=alex)
    discrepancy_repair_approve(repair_id=newer.pk, actor=alex)
    assert balances(discrepancy.user_id) == (Decimal("9"), Decimal("9"))


def test_refusals_change_nothing():
    discrepancy = drifted()
    rita = operator("rita", "request_discrepancy_repair")
    with pytest.raises(OperatorNotPermitted, match="triage_discrepancy"):
        discrepancy_investigate(discrepancy_id=discrepancy.pk, actor=rita, note="n")
    tess = operator("tess", "triage_discrepancy")
    with pytest.raises(OperatorNotPermitted, match="request_discrepancy_repair"):
        discrepancy_repair_request(
            discrepancy_id=discrepancy.pk,
            actor=tess,
            side="ledger",
            reason="r",
        )
    with pytest.raises(ReasonRequired):
        discrepancy_repair_request(
            discrepancy_id=discrepancy.pk, actor=rita, side="ledger", reason=" "
        )
    with pytest.raises(TriageRefused, match="side: the store to correct is legacy or ledger"):
        discrepancy_repair_request(
            discrepancy_id=discrepancy.pk, actor=rita, side="both", reason="r"
        )
    with pytest.raises(TriageRefused, match="expires_at"):
        discrepancy_known_difference_mark(
            discrepancy_id=discrepancy.pk,
            actor=tess,
            reason="r",
            expires_at=timezone.now() - timedelta(seconds=1),
        )
    repair = discrepancy_repair_request(
        discrepancy_id=discrepancy.pk, actor=rita, side="ledger", reason="r"
    )
    alex = operator("alex", "approve_discrepancy_repair")
    PhaseState.objects.update(kill_switch=True, kill_switch_reason="incident")
    with pytest.raises(KillSwitchEngaged):
        discrepancy_repair_approve(repair_id=repair.pk, actor=alex)
    phase_set("legacy")
    with pytest.raises(NotApplicable, match="the phase is legacy"):
        discrepancy_repair_approve(repair_id=repair.pk, actor=alex)
    with pytest.raises(NotApplicable):
        discrepancy_repair_request(
            discrepancy_id=discrepancy.pk, actor=rita, side="legacy", reason="r"
        )
    repair.refresh_from_db()
    assert repair.status == "requested"
    assert balances(discrepancy.user_id) == (Decimal("10"), Decimal("9"))
    assert [action for action, _ in audits(discrepancy)] == ["discrepancy.repair_request"]


def test_stores_that_agree_have_nothing_to_repair():
    discrepancy = drifted()
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE balances SET buying_power = 9 WHERE user_id = %s", [discrepancy.user_id]
        )
    with pytest.raises(TriageRefused, match="the stores agree now"):
        discrepancy_repair_request(
            discrepancy_id=discrepancy.pk,
            actor=operator("rita", "request_discrepancy_repair"),
            side="ledger",
            reason="r",
        )
    assert not DiscrepancyRepair.objects.exists()


def refused_by_postgresql(sql: str, params: list) -> Exception:
    with pytest.raises(DatabaseError) as refused, transaction.atomic(), connection.cursor() as c:
        c.execute(sql, params)
    return cutover_error_from(refused.value) or refused.value


def test_postgresql_holds_the_triage_and_repair_rules():
    discrepancy = drifted()
    repair = discrepancy_repair_request(
        discrepancy_id=discrepancy.pk,
        actor=operator("rita", "request_discrepancy_repair"),
        side="ledger",
        reason="r",
    )
    # The same person cannot approve their own repair, even in raw SQL.
    refused = refused_by_postgresql(
        "UPDATE cutover_discrepancy_repairs SET status = 'applied', approved_by = requested_by,"
        " decided_at = now() WHERE id = %s",
        [repair.pk],
    )
    assert isinstance(refused, IntegrityError)
    assert "cutover_repairs_chk_second_person" in str(refused)
    # Repaired only by an applied repair; no way back from an ended discrepancy.
    refused = refused_by_postgresql(
        "UPDATE cutover_discrepancies SET status = 'repaired' WHERE id = %s", [discrepancy.pk]
    )
    assert isinstance(refused, TriageRefused) and "applied, approved repair" in str(refused)
    Discrepancy.objects.filter(pk=discrepancy.pk).update(status="investigating")
    refused = refused_by_postgresql(
        "UPDATE cutover_discrepancies SET status = 'open' WHERE id = %s", [discrepancy.pk]
    )
    assert isinstance(refused, TriageRefused) and "from investigating to open" in str(refused)
    discrepancy_repair_approve(
        repair_id=repair.pk, actor=operator("alex", "approve_discrepancy_repair")
    )
    refused = refused_by_postgresql(
        "UPDATE cutover_discrepancies SET detail = 'x' WHERE id = %s", [discrepancy.pk]
    )
    assert isinstance(refused, TriageRefused) and "never changes again" in str(refused)
    refused = refused_by_postgresql(
        "UPDATE cutover_discrepancy_repairs SET reason = 'other' WHERE id = %s", [repair.pk]
    )
    assert isinstance(refused, TriageRefused) and "decided once" in str(refused)
    refused = refused_by_postgresql(
        "DELETE FROM cutover_discrepancy_repairs WHERE id = %s", [repair.pk]
    )
    assert isinstance(refused, AppendOnlyRecord)


def test_a_known_difference_rule_only_ends_earlier():
    discrepancy = drifted()
    rule = discrepancy_known_difference_mark(
        discrepancy_id=discrepancy.pk,
        actor=operator("tess", "triage_discrepancy"),
        reason="expected",
        expires_at=timezone.now() + timedelta(days=1),
    )
    refused = refused_by_postgresql(
        "UPDATE cutover_known_differences SET expires_at = expires_at + interval '1 day'"
        " WHERE id = %s",
        [rule.pk],
    )
    assert isinstance(refused, TriageRefused) and "can only end earlier" in str(refused)
    refused = refused_by_postgresql(
        "UPDATE cutover_known_differences SET difference = 2 WHERE id = %s", [rule.pk]
    )
    assert isinstance(refused, TriageRefused)
    refused = refused_by_postgresql(
        "DELETE FROM cutover_known_differences WHERE id = %s", [rule.pk]
    )
    assert isinstance(refused, AppendOnlyRecord)
    discrepancy_investigate(
        discrepancy_id=discrepancy.pk, actor=operator("ivo", "triage_discrepancy"), note="no"
    )
    rule.refresh_from_db()
    discrepancy.refresh_from_db()
    assert discrepancy.status == "investigating" and rule.expires_at <= timezone.now()
    assert open_discrepancy_count() == 1


def test_two_approvals_at_once_apply_the_repair_once():
    discrepancy = drifted(legacy="50", ledger="20")
    repair = discrepancy_repair_request(
        discrepancy_id=discrepancy.pk,
        actor=operator("rita", "request_discrepancy_repair"),
        side="ledger",
        reason="r",
    )
    approvers = [operator(name, "approve_discrepancy_repair") for name in ("alex", "bo")]
    start = threading.Barrier(len(approvers))
    outcomes: list = []

    def approve(actor: Actor) -> None:
        try:
            start.wait()
            outcomes.append(discrepancy_repair_approve(repair_id=repair.pk, actor=actor).status)
        except Exception as exc:  # reported below, whatever it is
            outcomes.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=approve, args=(actor,)) for actor in approvers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == ["applied", "applied"]
    assert balances(discrepancy.user_id) == (Decimal("50"), Decimal("50"))
    assert Transaction.objects.filter(namespace="repair").count() == 1
    assert OperatorAudit.objects.filter(action="discrepancy.repair").count() == 1
    assert reconciliation_run(triggered_by="test").clean

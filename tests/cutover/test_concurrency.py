"""The balance path under concurrency, duplicate delivery, phase flips and the kill switch: real
processes, real connections (the backfill's, killed mid-chunk too: test_backfill.py)."""

import multiprocessing
import random
import time
from decimal import Decimal
from pathlib import Path

import pytest
from django.db import connection, connections
from django.db.models import Sum

from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.exceptions import KillSwitchEngaged, StrictLedgerFailure
from cutover.models import BalanceMutation, Discrepancy, LegacyBalance, PhaseAudit
from cutover.phase_machine import kill_switch_set, phase_advance, phase_rollback
from cutover.reconciliation import reconciliation_run
from ledger.exceptions import InsufficientFunds
from ledger.models import Account, Transaction
from ledger.selectors import ledger_integrity_checks
from rehearsal.runtime import processes_run
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent
FORK = multiprocessing.get_context("fork")


def mutate_worker(worker: int, users: list, operations: int, start_at: float) -> dict:
    """Random credits and debits; some references are delivered twice."""
    rng = random.Random(worker)
    applied = {
        "credited": Decimal(0),
        "debited": Decimal(0),
        "refused": 0,
        "killed": 0,
        "strict_failed": 0,
    }
    sent = []
    time.sleep(max(0.0, start_at - time.time()))
    for index in range(operations):
        if sent and rng.random() < 0.05:
            reference, user, credit, amount = rng.choice(sent)
        else:
            reference = f"{worker}-{index}"
            user, credit = rng.choice(users), rng.random() < 0.5
            amount = Decimal(rng.randint(1, 3000)) / 100
        mutate = balance_credit if credit else balance_debit
        try:
            result = mutate(user_id=user, amount=amount, reference=reference, reason="test")
        except InsufficientFunds:
            applied["refused"] += 1
            continue
        except KillSwitchEngaged:
            applied["killed"] += 1
            continue
        except StrictLedgerFailure:  # rolled back whole, recorded
            applied["strict_failed"] += 1
            continue
        if result.created:
            sent.append((reference, user, credit, amount))
            applied["credited" if credit else "debited"] += amount
    connection.close()
    return applied


def users_with_balances(count: int, amount: str = "100") -> list:
    users = [legacy_user(amount) for _ in range(count)]
    for user in users:
        ledger_balance_set(user, amount)
    return users


def totals(users) -> tuple[Decimal, Decimal]:
    legacy = LegacyBalance.objects.filter(user_id__in=users).aggregate(t=Sum("buying_power"))["t"]
    ledger = Account.objects.filter(user_id__in=users, account_type="usdc_balance").aggregate(
        t=Sum("balance")
    )["t"]
    return legacy, ledger


def run_workers(users, processes=16, operations=120) -> dict:
    connections.close_all()
    start_at = time.time() + 1.0
    results = processes_run(
        mutate_worker, [(w, users, operations, start_at) for w in range(processes)]
    )
    return {key: sum(r[key] for r in results) for key in results[0]}


@pytest.mark.parametrize("phase", ["legacy", "shadow", "read_switch", "strict", "cutover"])
def test_bank_through_the_balance_path(phase):
    phase_set(phase, read_percent=100 if phase not in {"legacy", "shadow"} else 0)
    users = users_with_balances(24)
    outcome = run_workers(users)
    expected = Decimal(100 * 24) + outcome["credited"] - outcome["debited"]
    legacy, ledger = totals(users)
    assert legacy == (expected if phase != "cutover" else Decimal(2400))
    assert ledger == (expected if phase != "legacy" else Decimal(2400))
    assert outcome["strict_failed"] == 0
    assert not Discrepancy.objects.exists()
    ledger_postings = Transaction.objects.filter(namespace="balance").count()
    assert ledger_postings == BalanceMutation.objects.filter(ledger_status="posted").count()
    assert all(check.ok for check in ledger_integrity_checks())
    if phase in {"legacy", "cutover"}:
        return
    for account in Account.objects.filter(user_id__in=users, account_type="usdc_balance"):
        assert LegacyBalance.objects.get(user_id=account.user_id).buying_power == account.balance
    run = reconciliation_run(triggered_by="test")
    assert run.clean and run.users_checked == 24


def test_reconciliation_finds_a_drift_injected_under_traffic():
    phase_set("shadow")
    users = users_with_balances(24)
    victim = users[0]
    with connection.cursor() as cursor:  # a write that bypasses the balance path
        cursor.execute(
            "UPDATE balances SET buying_power = buying_power + 0.01 WHERE user_id = %s", [victim]
        )
    run_workers(users, processes=8, operations=60)
    run = reconciliation_run(triggered_by="test")
    assert run.differences == 1
    discrepancy = Discrepancy.objects.get(user_id=victim, status="open")
    assert discrepancy.difference == Decimal("0.01")


def flipper(start_at: float) -> list[str]:
    """Walks the phases forward and back while the workers mutate."""
    time.sleep(max(0.0, start_at - time.time() + 0.2))
    actor, done = Actor("cli:flipper"), []
    for target in ["shadow", "read_switch", "strict"]:
        phase_advance(
            to=target, actor=actor, force=True, reason="flip under load", read_percent=100
        )
        done.append(target)
        time.sleep(0.15)
    phase_rollback(actor=actor, reason="rollback under load")
    done.append("legacy")
    connection.close()
    return done


def kill_switch_engager(start_at: float) -> float:
    time.sleep(max(0.0, start_at - time.time() + 0.3))
    kill_switch_set(engaged=True, actor=Actor("cli:test"), reason="incident")
    flipped = time.time()
    connection.close()
    return flipped


ROLES = {"flip": flipper, "kill": kill_switch_engager, "mutate": mutate_worker}


def role(name: str, *args):
    return ROLES[name](*args)


def test_phase_flips_under_load_lose_and_duplicate_nothing():
    users = users_with_balances(16)
    backfill_run()
    connections.close_all()
    start_at = time.time() + 1.0
    mutators = [("mutate", w, users, 150, start_at) for w in range(15)]
    results = processes_run(role, [("flip", start_at), *mutators])
    assert results[0] == ["shadow", "read_switch", "strict", "legacy"]
    credited = sum(r["credited"] for r in results[1:])
    debited = sum(r["debited"] for r in results[1:])
    legacy, _ = totals(users)
    assert legacy == Decimal(1600) + credited - debited  # legacy written in every phase here
    assert BalanceMutation.objects.values("reference").distinct().count() == (
        BalanceMutation.objects.count()
    )
    flips = PhaseAudit.objects.filter(actor="cli:flipper").order_by("id")
    assert [a.to_phase for a in flips] == ["shadow", "read_switch", "strict", "legacy"]
    assert {a.action for a in flips[:3]} <= {"advance", "force"}
    assert flips[3].action == "rollback"
    # Every mutation whose ledger write was posted reached the ledger exactly once.
    posted = BalanceMutation.objects.filter(ledger_status="posted")
    assert Transaction.objects.filter(namespace="balance").count() == posted.count()
    assert not BalanceMutation.objects.filter(phase="legacy").exclude(ledger_status="not_written")


def test_kill_switch_mid_traffic_stops_new_mutations_and_leaves_nothing_half_done():
    phase_set("shadow")
    users = users_with_balances(8)
    connections.close_all()
    start_at = time.time() + 1.0

    mutators = [("mutate", w, users, 400, start_at) for w in range(8)]
    results = processes_run(role, [("kill", start_at), *mutators])
    flipped_at = results[0]
    assert sum(r["killed"] for r in results[1:]) > 0
    assert not BalanceMutation.objects.filter(
        created_at__gt=PhaseAudit.objects.get(action="kill_switch_on").at
    ).exists()
    assert flipped_at > start_at
    legacy, ledger = totals(users)
    assert legacy == ledger  # every mutation whole: both stores or neither
    assert not Discrepancy.objects.exists()


def deliver(user, reference: str, start_at: float) -> bool:
    time.sleep(max(0.0, start_at - time.time()))
    result = balance_credit(user_id=user, amount="7.25", reference=reference, reason="test")
    connection.close()
    return result.created


@pytest.mark.parametrize("phase", ["legacy", "shadow", "strict", "cutover"])
def test_same_mutation_delivered_ten_times_concurrently_applies_once(phase):
    phase_set(phase, read_percent=100)
    user = users_with_balances(1)[0]
    connections.close_all()
    start_at = time.time() + 1.0
    created = processes_run(deliver, [(user, "dup-1", start_at)] * 10)
    assert created.count(True) == 1
    assert BalanceMutation.objects.filter(reference="dup-1").count() == 1
    legacy, ledger = totals([user])
    assert legacy == Decimal("107.25" if phase != "cutover" else "100")
    assert ledger == Decimal("107.25" if phase != "legacy" else "100")

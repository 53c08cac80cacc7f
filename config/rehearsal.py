"""The rehearsal: synthetic users and traffic driven through the one posting path from several
processes, then every invariant checked. Later phases of the product extend it to the rollout."""

import multiprocessing
import random
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from django.db import connection
from django.db.models import Min, Sum

from config.runtime import latency_summary, processes_run
from ledger.exceptions import InsufficientFunds
from ledger.models import Account
from ledger.selectors import ledger_integrity_checks, system_account
from ledger.services import Leg, account_open, opening_balance_post, transaction_post

CURRENCY = "USDC"
USER_ACCOUNT_TYPE = "usdc_balance"
CENT = Decimal("0.01")

# Shared with forked workers: how many operations all of them have finished.
_progress = None


@dataclass
class WorkerReport:
    postings: int = 0
    replays: int = 0
    refused_overdrafts: int = 0
    credited: Decimal = Decimal(0)
    debited: Decimal = Decimal(0)
    latencies_ms: list[float] = field(default_factory=list)


def _amount(rng: random.Random, upto: int) -> Decimal:
    return Decimal(rng.randint(1, upto * 100)) * CENT


def traffic_worker(namespace: str, worker: int, account_ids: list[int], operations: int, seed: int):
    """Random transfers, credits and debits among the run's users; about one in twenty is a
    duplicate delivery of an earlier posting, which must come back as a replay."""
    rng = random.Random(seed * 1000 + worker)
    accounts = Account.objects.in_bulk(account_ids)
    deposits = system_account(code="deposits_clearing_usdc")
    withdrawals = system_account(code="withdrawals_clearing_usdc")
    report = WorkerReport()
    sent: list[tuple[str, str, list[Leg]]] = []
    for index in range(operations):
        if sent and rng.random() < 0.05:
            reference, kind, legs = rng.choice(sent)
        else:
            reference = f"w{worker}-{index}"
            roll = rng.random()
            user, other = (accounts[pk] for pk in rng.sample(account_ids, 2))
            if roll < 0.5:
                amount = _amount(rng, 300)
                kind, legs = "transfer", [Leg.debit(user, amount), Leg.credit(other, amount)]
            elif roll < 0.75:
                amount = _amount(rng, 200)
                kind, legs = "credit", [Leg.debit(deposits, amount), Leg.credit(user, amount)]
            else:
                amount = _amount(rng, 150)
                kind, legs = "debit", [Leg.debit(user, amount), Leg.credit(withdrawals, amount)]
        started = time.perf_counter()
        try:
            result = transaction_post(
                namespace=namespace, reference_id=reference, kind=kind, legs=legs
            )
        except InsufficientFunds:
            report.refused_overdrafts += 1
        else:
            report.latencies_ms.append((time.perf_counter() - started) * 1000)
            if result.created:
                report.postings += 1
                sent.append((reference, kind, legs))
                if kind == "credit":
                    report.credited += legs[0].amount
                elif kind == "debit":
                    report.debited += legs[0].amount
            else:
                report.replays += 1
        with _progress.get_lock():
            _progress.value += 1
    connection.close()
    return report


def users_open(
    namespace: str, users: int, rng: random.Random, on_user=None
) -> tuple[list[int], Decimal]:
    """N synthetic users, each with an account and an opening balance posted against
    opening-balance equity. Returns their account ids and the opening total."""
    account_ids, total = [], Decimal(0)
    for index in range(users):
        account = account_open(
            # New users every run: a rehearsal never reuses an earlier run's accounts.
            user_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/user/{index}"),
            account_type=USER_ACCOUNT_TYPE,
            currency=CURRENCY,
        )
        amount = _amount(rng, 1000)
        opening_balance_post(namespace=namespace, account=account, amount=amount)
        account_ids.append(account.pk)
        total += amount
        if on_user:
            on_user(index + 1)
    return account_ids, total


def traffic_run(
    namespace, account_ids, workers, operations, seed, on_tick=None
) -> tuple[WorkerReport, float]:
    global _progress
    _progress = multiprocessing.get_context("fork").Value("q", 0)
    per_worker = [
        operations // workers + (1 if w < operations % workers else 0) for w in range(workers)
    ]
    started = time.perf_counter()
    reports = processes_run(
        traffic_worker,
        [(namespace, w, account_ids, per_worker[w], seed) for w in range(workers)],
        on_tick=(lambda: on_tick(_progress.value)) if on_tick else None,
    )
    seconds = time.perf_counter() - started
    total = WorkerReport()
    for report in reports:
        total.postings += report.postings
        total.replays += report.replays
        total.refused_overdrafts += report.refused_overdrafts
        total.credited += report.credited
        total.debited += report.debited
        total.latencies_ms += report.latencies_ms
    return total, seconds


def invariants_check(
    account_ids: list[int], opening_total: Decimal, report: WorkerReport
) -> list[dict]:
    """The ledger's own checks plus conservation of the run's money."""
    checks = [
        {
            "name": c.name,
            "description": c.description,
            "ok": c.ok,
            "detail": c.problems[:5],
            "checked": c.checked,
        }
        for c in ledger_integrity_checks()
    ]
    users = Account.objects.filter(pk__in=account_ids).aggregate(
        total=Sum("balance"), low=Min("balance")
    )
    expected = opening_total + report.credited - report.debited
    checks.append(
        {
            "name": "conservation",
            "description": "users' balances = opening balances + credits - debits, exactly",
            "ok": users["total"] == expected,
            "detail": [f"ledger {users['total']}, expected {expected}"],
            "checked": len(account_ids),
        }
    )
    checks.append(
        {
            "name": "no_negative_user_balance",
            "description": "no user balance is below zero",
            "ok": users["low"] >= 0,
            "detail": [f"lowest user balance {users['low']}"],
            "checked": len(account_ids),
        }
    )
    return checks


def latency_figures(report: WorkerReport, seconds: float) -> dict:
    return {
        "postings_per_second": round(report.postings / seconds, 1) if seconds else 0.0,
        **latency_summary(report.latencies_ms),
    }

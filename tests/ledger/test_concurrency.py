"""Concurrency, duplicate delivery and crash variants of the posting path, with real processes
and real connections to PostgreSQL."""

import multiprocessing
import os
import random
import signal
import time
from decimal import Decimal

import pytest
from django.db import OperationalError, connection, connections, transaction

from ledger.exceptions import InsufficientFunds
from ledger.models import Account, Transaction
from ledger.selectors import account_balance, ledger_integrity_checks
from ledger.services import Leg, transaction_apply, transaction_post
from rehearsal.runtime import processes_run
from tests.ledger.factories import UserAccountFactory, fund

pytestmark = pytest.mark.django_db(transaction=True)
FORK = multiprocessing.get_context("fork")


def post_same(reference: str, source_id: int, target_id: int) -> tuple[int, bool]:
    source, target = Account.objects.get(pk=source_id), Account.objects.get(pk=target_id)
    result = transaction_post(
        namespace="dup",
        reference_id=reference,
        kind="transfer",
        legs=[Leg.debit(source, "7.5"), Leg.credit(target, "7.5")],
    )
    connection.close()
    return result.transaction_id, result.created


def test_same_posting_ten_times_concurrently_gives_one_transaction():
    source, target = UserAccountFactory(), UserAccountFactory()
    fund(source, "100")
    results = processes_run(post_same, [("once", source.pk, target.pk)] * 10)
    assert sum(created for _, created in results) == 1
    assert len({transaction_id for transaction_id, _ in results}) == 1
    assert Transaction.objects.filter(namespace="dup").count() == 1
    assert account_balance(account_id=source.pk) == Decimal("92.5")
    assert account_balance(account_id=target.pk) == Decimal("7.5")


def bank_worker(worker: int, hot: list[int], cold: list[int], transfers: int) -> dict:
    rng = random.Random(worker)
    accounts = Account.objects.in_bulk(hot + cold)
    created = replays = refused = 0
    sent = []
    for index in range(transfers):
        if sent and rng.random() < 0.03:
            reference, legs = rng.choice(sent)  # a duplicate delivery
        else:
            pool = hot if rng.random() < 0.5 else hot + cold
            source, target = rng.sample(pool, 2)
            amount = Decimal(rng.randint(1, 5000)) / 100
            reference = f"{worker}-{index}"
            legs = [Leg.debit(accounts[source], amount), Leg.credit(accounts[target], amount)]
        try:
            result = transaction_post(
                namespace="bank", reference_id=reference, kind="transfer", legs=legs
            )
        except InsufficientFunds:
            refused += 1
            continue
        if result.created:
            created += 1
            sent.append((reference, legs))
        else:
            replays += 1
    connection.close()
    return {"created": created, "replays": replays, "refused": refused}


def bank_reader(ids: list[int], expected: Decimal, stop, out) -> None:
    """Full reads while the transfers run: each read is one snapshot and must be exact."""
    reads = bad = 0
    with connection.cursor() as cursor:
        while not stop.is_set():
            cursor.execute(
                "SELECT sum(balance), min(balance) FROM ledger_accounts WHERE id = ANY(%s)", [ids]
            )
            total, low = cursor.fetchone()
            reads += 1
            bad += total != expected or low < 0
    connection.close()
    out.put((reads, bad))


@pytest.mark.slow
def test_bank_sixteen_processes_with_concurrent_full_reads():
    hot = [UserAccountFactory().pk for _ in range(8)]
    cold = [UserAccountFactory().pk for _ in range(64)]
    for account in Account.objects.filter(pk__in=hot + cold):
        fund(account, "1000")
    expected = Decimal(1000 * 72)
    connections.close_all()
    stop, out = FORK.Event(), FORK.Queue()
    reader = FORK.Process(target=bank_reader, args=(hot + cold, expected, stop, out))
    reader.start()
    try:
        results = processes_run(bank_worker, [(w, hot, cold, 1000) for w in range(16)])
    finally:
        stop.set()
    reads, bad_reads = out.get(timeout=60)
    reader.join(timeout=60)

    assert reads > 0 and bad_reads == 0
    balances = Account.objects.filter(pk__in=hot + cold)
    assert sum(a.balance for a in balances) == expected
    assert min(a.balance for a in balances) >= 0
    created = sum(r["created"] for r in results)
    assert Transaction.objects.filter(namespace="bank").count() == created
    assert sum(r["replays"] for r in results) > 0
    assert created + sum(r["refused"] + r["replays"] for r in results) == 16 * 1000
    assert all(check.ok for check in ledger_integrity_checks())


def crash_child(reference: str, source_id: int, target_id: int, commit: bool, ready) -> None:
    """Posts, tells the parent where it is, and waits to be killed (kill -9)."""
    source, target = Account.objects.get(pk=source_id), Account.objects.get(pk=target_id)
    legs = [Leg.debit(source, "25"), Leg.credit(target, "25")]
    if commit:
        transaction_post(namespace="crash", reference_id=reference, kind="transfer", legs=legs)
        ready.set()
        time.sleep(120)
    with transaction.atomic():
        transaction_apply(namespace="crash", reference_id=reference, kind="transfer", legs=legs)
        ready.set()  # applied, locks held, not committed
        time.sleep(120)


@pytest.mark.parametrize(
    "commit", [False, True], ids=["killed-before-commit", "killed-after-commit"]
)
def test_posting_killed_mid_flight_loses_and_duplicates_nothing(commit):
    source, target = UserAccountFactory(), UserAccountFactory()
    fund(source, "100")
    connections.close_all()
    ready = FORK.Event()
    child = FORK.Process(target=crash_child, args=("k1", source.pk, target.pk, commit, ready))
    child.start()
    assert ready.wait(timeout=60)
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL

    committed = Transaction.objects.filter(namespace="crash").count()
    assert committed == (1 if commit else 0)
    # The client retries after the crash: exactly one posting either way.
    result = transaction_post(
        namespace="crash",
        reference_id="k1",
        kind="transfer",
        legs=[Leg.debit(source, "25"), Leg.credit(target, "25")],
    )
    assert result.created is (not commit)
    assert Transaction.objects.filter(namespace="crash").count() == 1
    assert account_balance(account_id=source.pk) == Decimal("75")
    assert account_balance(account_id=target.pk) == Decimal("25")
    assert all(check.ok for check in ledger_integrity_checks())


def serializable_worker(
    worker: int, source_id: int, target_id: int, attempts: int, start_at: float
) -> dict:
    from django.conf import settings
    from prometheus_client import REGISTRY

    settings.LEDGER_POSTING_MAX_ATTEMPTS = attempts
    source, target = Account.objects.get(pk=source_id), Account.objects.get(pk=target_id)
    posted = failed = 0
    time.sleep(max(0.0, start_at - time.time()))  # all workers collide from the first posting
    for index in range(60):
        try:
            transaction_post(
                namespace="ser",
                reference_id=f"{worker}-{index}",
                kind="transfer",
                legs=[Leg.debit(source, "1"), Leg.credit(target, "1")],
            )
            posted += 1
        except OperationalError as exc:
            assert exc.__cause__.sqlstate == "40001"
            failed += 1
    connection.close()
    retried = REGISTRY.get_sample_value("ledger_transaction_retried_total", {"sqlstate": "40001"})
    return {"posted": posted, "failed": failed, "retried": retried or 0}


@pytest.fixture
def serializable_database():
    """Every new connection to the test database runs SERIALIZABLE, where concurrent postings
    on one account fail with serialization errors (40001) that the posting path must retry."""
    name = connection.settings_dict["NAME"]
    with connection.cursor() as cursor:
        cursor.execute(f'ALTER DATABASE "{name}" SET default_transaction_isolation = serializable')
    connections.close_all()
    yield
    with connection.cursor() as cursor:
        cursor.execute(f'ALTER DATABASE "{name}" RESET default_transaction_isolation')
    connections.close_all()


@pytest.mark.parametrize("attempts", [50, 1])
def test_serialization_failures_are_retried_a_bounded_number_of_times(
    serializable_database, attempts
):
    source, target = UserAccountFactory(), UserAccountFactory()
    fund(source, "1000")
    connections.close_all()
    start_at = time.time() + 1.0
    results = processes_run(
        serializable_worker, [(w, source.pk, target.pk, attempts, start_at) for w in range(6)]
    )
    posted = sum(r["posted"] for r in results)
    if attempts == 50:
        assert posted == 6 * 60
        assert sum(r["retried"] for r in results) > 0
    else:
        assert sum(r["retried"] for r in results) == 0
        assert sum(r["failed"] for r in results) > 0  # surfaced, not retried
    assert Transaction.objects.filter(namespace="ser").count() == posted
    assert account_balance(account_id=target.pk) == Decimal(posted)
    assert account_balance(account_id=source.pk) == Decimal(1000 - posted)
    assert all(check.ok for check in ledger_integrity_checks())

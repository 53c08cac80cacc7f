"""Reconciliation: set-based, single leader, run by a real Celery worker over Redis."""

import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from django.db import connection

from cutover.exceptions import NotApplicable, ReconciliationBusy
from cutover.locks import RECONCILE_LOCK
from cutover.models import Discrepancy, ReconciliationRun
from cutover.reconciliation import reconciliation_run
from cutover.tasks import reconciliation_task
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent


def other_connection() -> psycopg.Connection:
    db = connection.settings_dict
    return psycopg.connect(
        host=db["HOST"],
        port=db["PORT"] or None,
        user=db["USER"],
        password=db["PASSWORD"] or None,
        dbname=db["NAME"],
        autocommit=True,
    )


def test_finds_records_and_resolves():
    phase_set("shadow")
    agree = legacy_user("10")
    ledger_balance_set(agree, "10")
    drift = legacy_user("10")
    ledger_balance_set(drift, "9.99")
    unbackfilled = legacy_user("3")
    first = reconciliation_run(triggered_by="test")
    assert (first.users_checked, first.differences, first.new_discrepancies) == (3, 2, 2)
    assert first.legacy_total == Decimal("23") and first.ledger_total == Decimal("19.99")
    assert Discrepancy.objects.get(user_id=drift).difference == Decimal("0.01")
    assert Discrepancy.objects.get(user_id=unbackfilled).ledger_balance is None
    second = reconciliation_run(triggered_by="test")
    assert (second.differences, second.new_discrepancies) == (2, 0)
    assert Discrepancy.objects.get(user_id=drift).occurrences == 2
    with connection.cursor() as cursor:
        cursor.execute("UPDATE balances SET buying_power = 9.99 WHERE user_id = %s", [drift])
    third = reconciliation_run(triggered_by="test")
    assert (third.differences, third.resolved) == (1, 1)
    resolved = Discrepancy.objects.get(user_id=drift)
    assert resolved.status == "resolved" and resolved.resolved_by == "reconciliation"
    assert ReconciliationRun.objects.count() == 3


@pytest.mark.parametrize("phase", ["legacy", "cutover"])
def test_not_applicable_outside_dual_write(phase):
    phase_set(phase)
    with pytest.raises(NotApplicable):
        reconciliation_run(triggered_by="test")
    assert not ReconciliationRun.objects.exists()


def test_one_leader_at_a_time():
    phase_set("shadow")
    with other_connection() as other:  # another worker holds the leader lock
        other.execute("SELECT pg_advisory_lock(%s)", [RECONCILE_LOCK])
        with pytest.raises(ReconciliationBusy):
            reconciliation_run(triggered_by="test")
        assert reconciliation_task() == {
            "skipped": "another reconciliation or a discrepancy repair is running"
        }
        other.execute("SELECT pg_advisory_unlock(%s)", [RECONCILE_LOCK])  # not on disconnect:
        # the server may end the session a moment after the client has gone
    assert reconciliation_run(triggered_by="test").clean


def test_periodic_task_runs_in_a_real_celery_worker():
    phase_set("shadow")
    drift = legacy_user("1")
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/15",
    }
    queue = f"test-{os.getpid()}"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-Q",
            queue,
            "-c",
            "1",
            "--pool",
            "solo",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        from config.celery import app

        app.conf.broker_url = env["CELERY_BROKER_URL"]
        reconciliation_task.apply_async(queue=queue)
        deadline = time.time() + 60
        while time.time() < deadline and not ReconciliationRun.objects.exists():
            time.sleep(0.1)
        run = ReconciliationRun.objects.get()
        assert run.triggered_by == "celery" and run.differences == 1
        assert Discrepancy.objects.get(user_id=drift).source == "reconciliation"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)


def test_a_concurrent_write_to_a_discrepancy_makes_the_run_start_again():
    """A mutation updates a user's open discrepancy after the reconciliation's snapshot was
    taken (the other connection commits between the snapshot and the write): the run is
    refused by PostgreSQL (40001) and repeated, and ends with the current values."""
    phase_set("shadow")
    user = legacy_user("10")
    ledger_balance_set(user, "9")
    reconciliation_run(triggered_by="test")  # opens the discrepancy
    with other_connection() as other:
        other.autocommit = False
        other.execute("UPDATE cutover_discrepancies SET detail = 'touched' WHERE status = 'open'")
        # Commit from a timer while the reconciliation holds its snapshot and waits on the row.
        threading.Timer(0.5, other.commit).start()
        result = reconciliation_run(triggered_by="test")
    assert result.differences == 1
    discrepancy = Discrepancy.objects.get(user_id=user, status="open")
    assert discrepancy.occurrences >= 2

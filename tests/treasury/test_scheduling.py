"""The settlement cycle under contention and on Celery beat: two schedulers and three workers
racing never run two cycles at once nor open two jobs for a buffer; a real worker with its beat
(django-celery-beat's database scheduler) brings a low buffer back to target on its own."""

import contextlib
import itertools
import random
import time
from datetime import timedelta
from decimal import Decimal

import pytest
import redis
from django.db import connection
from django.db.models import Count

from ledger.exceptions import InsufficientFunds
from ledger.models import Account
from ledger.selectors import ledger_integrity_checks
from ledger.services import Leg, transaction_post
from rehearsal.runtime import processes_run
from tests.celery import WORKER_WITH_BEAT, celery_running, wait_for
from tests.treasury.factories import (
    KEY,
    RECIPIENTS,
    SECRET,
    buffers,
    celery_environment,
    fund,
)
from treasury.cycle import settlement_cycle_run
from treasury.models import OPEN_STATUSES, ConversionJob, SettlementCycle
from treasury.monitor import monitor_run
from treasury.sandbox import DueSandbox
from treasury.submission import jobs_submit

pytestmark = pytest.mark.django_db(transaction=True)
BROKER = "redis://127.0.0.1:6379/13"


def racer(role: str, index: int, rounds: int) -> dict:
    """A scheduler runs cycles; a worker submits and monitors, and spends USDC from the buffer
    (as withdrawals would) so that cycles keep finding it low; every round notes how many jobs
    are open per buffer."""
    rng = random.Random(f"{role}-{index}")
    seen = {"cycles": 0, "skipped": 0, "max_open": 0}
    buffer = Account.objects.get(code="usdc_buffer")
    equity = Account.objects.get(code="opening_balance_equity_usdc")
    for round_ in range(rounds):
        if role == "scheduler":
            result = settlement_cycle_run(triggered_by=f"scheduler-{index}")
            seen["skipped" if result.skipped else "cycles"] += 1
        else:
            jobs_submit()
            monitor_run()
            with contextlib.suppress(InsufficientFunds):  # the buffer may be low already
                transaction_post(
                    namespace="race",
                    reference_id=f"spend-{index}-{round_}",
                    kind="spend",
                    legs=[Leg.debit(equity, "3000"), Leg.credit(buffer, "3000")],
                )
        open_per_buffer = (
            ConversionJob.objects.filter(status__in=OPEN_STATUSES)
            .values("buffer_currency")
            .annotate(n=Count("id"))
            .values_list("n", flat=True)
        )
        seen["max_open"] = max([seen["max_open"], *open_per_buffer])
        time.sleep(rng.random() * 0.01)
    connection.close()
    return seen


def test_two_schedulers_and_three_workers_race_for_sixty_cycles(settings):
    settings.DUE_API_KEY, settings.DUE_API_SECRET = KEY, SECRET
    settings.DUE_RECIPIENTS = RECIPIENTS
    settings.TREASURY_SUBMIT_BACKOFF = timedelta(0)
    fund("usdc_buffer", "4000")
    fund("fiat_buffer", "450000")
    with DueSandbox(api_key=KEY, api_secret=SECRET, settle="completed") as sandbox:
        settings.DUE_API_BASE_URL = sandbox.base_url
        roles = [("scheduler", n, 30) for n in range(2)] + [("worker", n, 30) for n in range(3)]
        results = processes_run(racer, roles)
    cycles = list(SettlementCycle.objects.order_by("started_at"))
    assert sum(r["cycles"] for r in results) == len(cycles)
    assert sum(r["cycles"] + r["skipped"] for r in results[:2]) == 60
    for earlier, later in itertools.pairwise(cycles):
        assert earlier.finished_at <= later.started_at  # never two at a time
    assert max(r["max_open"] for r in results) <= 1  # never two open jobs for a buffer
    jobs = ConversionJob.objects.all()
    assert jobs.count() >= 2 and jobs.filter(status="completed").exists()
    assert len(sandbox.conversions) == jobs.exclude(provider_reference=None).count()
    assert all(check.ok for check in ledger_integrity_checks())


def test_celery_beat_brings_a_low_buffer_back_to_target(settings):
    fund("usdc_buffer", "1000")
    fund("fiat_buffer", "60000")
    redis.Redis.from_url(BROKER).flushdb()
    with DueSandbox(api_key=KEY, api_secret=SECRET, settle="completed") as sandbox:
        environment = celery_environment(sandbox, BROKER)
        with celery_running(WORKER_WITH_BEAT, environment=environment):
            wait_for(lambda: buffers()["USDC"] == Decimal("20000"), seconds=90)
    assert buffers() == {"USDC": Decimal("20000"), "USD": Decimal("41000")}
    job = ConversionJob.objects.get()
    assert job.status == "completed" and job.created_by == "celery"
    assert SettlementCycle.objects.filter(triggered_by="celery").exists()

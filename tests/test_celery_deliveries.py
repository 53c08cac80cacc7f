"""Celery's delivery caveats (README, "Celery's delivery caveats"), with real workers over Redis:
Redis' visibility timeout exceeds what any task may take; every task's message delivered twice,
one after the other and two copies at once, has one effect; a message that raises is recorded
failed and not delivered again; a message whose process is SIGKILLed at every start is given up
after TASK_DELIVERY_MAX_ATTEMPTS starts, recorded dead for an operator (admin, metric, ALERT
log) and never put back again."""

import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import boto3
import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from aws.selectors import MINUTE, minute_start
from config.celery import app
from cutover.deliveries import SUCCEEDED_KEPT
from cutover.locks import TASK_DELIVERY_LOCK
from cutover.models import (
    BackfillPosting,
    BackfillRun,
    CustodyDiscrepancy,
    Discrepancy,
    ReconciliationRun,
    TaskDelivery,
)
from ledger.models import Transaction
from onchain.models import DepositAddress, Withdrawal
from onchain.sandbox import CircleSandbox
from tests.aws.test_publish import job, published_through
from tests.celery import QUIET, celery_running, wait_for
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.cutover.test_reconciliation import other_connection
from tests.onchain.factories import balances, buffer_fund, withdraw
from tests.test_metrics import sample
from tests.treasury.factories import KEY, RECIPIENT_ENVIRONMENT, RECIPIENTS, SECRET, fund
from treasury.cycle import settlement_cycle_run
from treasury.models import ConversionJob, SettlementCycle
from treasury.sandbox import DueSandbox
from treasury.submission import jobs_submit

ROOT = Path(__file__).resolve().parent.parent
BROKER = "redis://127.0.0.1:6379/10"
QUEUE = f"deliveries-{uuid.uuid4().hex[:8]}"


def project_tasks() -> dict:
    app.loader.import_default_modules()
    return {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}


# The configuration ---------------------------------------------------------------------------


SENT_BY_TASKS = {"cutover.reconcile_chunks"}
# Sent on demand, never on a schedule: a backfill's leader (by an operator or the bench) and its
# helpers (by the leader, or by `cutover backfill --helpers N`), with no countdown.
SENT_ON_DEMAND = {"cutover.backfill", "cutover.backfill_ranges"}


def test_visibility_timeout_exceeds_every_task_time_limit_plus_its_countdown():
    """Redis hands a message not acknowledged within the visibility timeout to another worker:
    the task would run twice at once. No task may take that long from its delivery to its
    acknowledgement: its hard time limit, behind the tasks a worker process reserved before it
    (the prefetch), plus its longest countdown (a beat entry's, or a Celery retry's)."""
    tasks = project_tasks()
    beat = settings.CELERY_BEAT_SCHEDULE.values()
    # Each task is scheduled, or sent only by a scheduled one (a reconciliation's helpers, by
    # its leader, with no countdown), or on demand (a backfill's).
    assert {entry["task"] for entry in beat} == set(tasks) - SENT_BY_TASKS - SENT_ON_DEMAND
    prefetch = settings.CELERY_WORKER_PREFETCH_MULTIPLIER
    longest = {}
    for name, task in tasks.items():
        assert task.time_limit and task.soft_time_limit, name
        assert task.soft_time_limit < task.time_limit, name
        countdowns = [e.get("options", {}).get("countdown", 0) for e in beat if e["task"] == name]
        if task.max_retries != 0:  # a Celery retry waits, its message held by the worker
            countdowns.append(task.retry_backoff_max if task.retry_backoff else 0)
            countdowns.append(task.default_retry_delay)
        longest[name] = prefetch * task.time_limit + max(countdowns, default=0)
    visibility = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    assert visibility > max(longest.values()), longest
    # A finished message delivered again within the visibility timeout still finds its row.
    assert SUCCEEDED_KEPT.total_seconds() > visibility + max(longest.values())
    assert settings.CELERY_BROKER_URL.startswith("redis")  # where the timeout applies


def test_the_readme_states_each_task_s_delivery_choices():
    """The README's table is what the tasks are: one row per task, its acknowledgement and its
    time limits."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Celery's delivery caveats", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w.]+)` \| ([^|]+) \| (\d+) / (\d+) s \|", section, re.MULTILINE)
    documented = {name: (choice.strip(), int(soft), int(hard)) for name, choice, soft, hard in rows}
    tasks = project_tasks()
    assert set(documented) == set(tasks)
    for name, task in tasks.items():
        choice = (
            "acks_late + reject_on_worker_lost"
            if task.acks_late and task.reject_on_worker_lost
            else "acks_late"
            if task.acks_late
            else "acks early"
        )
        assert documented[name] == (choice, task.soft_time_limit, task.time_limit), name


# A worker shared by the module, and the providers it speaks to --------------------------------


@dataclass
class Providers:
    circle: CircleSandbox
    due: DueSandbox
    aws: dict[str, str]


@pytest.fixture(scope="module")
def providers(moto_server):
    aws = {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with (
        CircleSandbox(settle=None) as circle,
        DueSandbox(api_key=KEY, api_secret=SECRET, settle=None) as due,
    ):
        yield Providers(circle=circle, due=due, aws=aws)


@pytest.fixture(scope="module")
def worker(django_db_setup, providers):
    """Two worker processes (prefork, as deployed), on a queue of this module's own."""
    environment = {
        **providers.aws,
        "CELERY_BROKER_URL": BROKER,
        "ENABLE_ONCHAIN_ENGINE": "true",
        "ENABLE_TREASURY_SCHEDULER": "true",
        "CIRCLE_API_BASE_URL": providers.circle.base_url,
        "CIRCLE_API_KEY": "sandbox-key",
        "DUE_API_BASE_URL": providers.due.base_url,
        "DUE_API_KEY": KEY,
        "DUE_API_SECRET": SECRET,
        **RECIPIENT_ENVIRONMENT,
    }
    with celery_running(("worker", "-Q", QUEUE, "-c", "2", *QUIET), environment=environment):
        yield providers


def send(task: str, task_id: str, copies: int = 1, queue: str = QUEUE, **options) -> None:
    with app.connection_for_write(BROKER) as connection:
        for _ in range(copies):
            app.send_task(task, task_id=task_id, queue=queue, connection=connection, **options)


def delivery(task_id: str) -> TaskDelivery | None:
    return TaskDelivery.objects.filter(task_id=task_id).first()


def queue_empty(queue: str = QUEUE) -> bool:
    """Nothing waits in the queue and nothing taken from it is held unacknowledged."""
    broker = redis.Redis.from_url(BROKER)
    return broker.llen(queue) == 0 and all(
        f'"{queue}"' not in message.decode() for message in broker.hvals("unacked")
    )


def delivered_in_sequence(task: str) -> TaskDelivery:
    """A message runs to its end; then it comes again (its acknowledgement lost with a worker,
    or the visibility timeout passed)."""
    task_id = str(uuid.uuid4())
    send(task, task_id)
    assert wait_for(lambda: (delivery(task_id) or TaskDelivery()).status == "succeeded"), task
    send(task, task_id)
    assert wait_for(lambda: delivery(task_id).duplicates == 1), task
    assert wait_for(queue_empty)
    return delivery(task_id)


def delivered_at_once(task: str) -> TaskDelivery:
    """Two copies of a message in the worker's two processes at the same time: the test holds
    the message's lock, as a copy running elsewhere would, until both copies wait for it."""
    task_id = str(uuid.uuid4())
    with other_connection() as holder:
        holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", [TASK_DELIVERY_LOCK, task_id])
        send(task, task_id, copies=2)
        waiting = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND classid = %s::oid AND objsubid = 2"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        assert wait_for(lambda: holder.execute(waiting, [TASK_DELIVERY_LOCK]).fetchone()[0] == 2)
        holder.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", [TASK_DELIVERY_LOCK, task_id])
    assert wait_for(lambda: (delivery(task_id) or TaskDelivery()).duplicates == 1), task
    assert wait_for(queue_empty)
    return delivery(task_id)


def ran_once(found: TaskDelivery) -> bool:
    return (found.status, found.attempts, found.duplicates) == ("succeeded", 1, 1)


# Each task delivered twice, one after the other and at once: one effect ----------------------

# The worker reads what the test committed.
on_the_worker = pytest.mark.django_db(transaction=True)


@on_the_worker
def test_reconciliation_delivered_twice_runs_once(worker):
    phase_set("shadow")
    drifted = legacy_user("10")
    ledger_balance_set(drifted, "9")
    assert ran_once(delivered_in_sequence("cutover.reconcile"))
    assert (ReconciliationRun.objects.count(), Discrepancy.objects.count()) == (1, 1)
    assert ran_once(delivered_at_once("cutover.reconcile"))
    assert (ReconciliationRun.objects.count(), Discrepancy.objects.count()) == (2, 1)


@on_the_worker
def test_backfill_delivered_twice_runs_once(worker):
    users = [legacy_user("10") for _ in range(5)]
    assert ran_once(delivered_in_sequence("cutover.backfill"))
    assert sorted(BackfillPosting.objects.values_list("user_id", flat=True)) == sorted(users)
    assert ran_once(delivered_at_once("cutover.backfill"))
    assert BackfillPosting.objects.count() == 5  # each difference posted once
    assert BackfillRun.objects.filter(finished_at__isnull=True).count() == 0


@on_the_worker
def test_custody_reconciliation_delivered_twice_runs_once(worker):
    worker.circle.wallet_balance = Decimal("10")  # the ledger's USDC buffer holds 0
    worker.due.balances["USD"] = Decimal(0)
    assert ran_once(delivered_in_sequence("custody.reconcile"))
    found = CustodyDiscrepancy.objects.get()
    assert (found.currency, found.difference, found.occurrences) == ("USDC", -10, 1)
    assert ran_once(delivered_at_once("custody.reconcile"))
    assert CustodyDiscrepancy.objects.get().occurrences == 2  # one sighting per message


@on_the_worker
def test_metrics_publication_delivered_twice_sends_each_minute_once(worker, aws_environment):
    start = minute_start(timezone.now()) - 10 * MINUTE
    published_through(start)
    job("failed", start + 2 * MINUTE)
    cloudwatch = boto3.client(
        "cloudwatch",
        endpoint_url=aws_environment["AWS_ENDPOINT_URL"],
        region_name=aws_environment["AWS_DEFAULT_REGION"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )

    def failed_jobs_sent() -> dict:
        points = cloudwatch.get_metric_statistics(
            Namespace="StackService",
            MetricName="conversion_jobs_failed",
            StartTime=start - timedelta(hours=1),
            EndTime=timezone.now() + timedelta(minutes=5),
            Period=60,
            Statistics=["Sum", "SampleCount"],
        )["Datapoints"]
        assert points and all(point["SampleCount"] == 1 for point in points)  # each minute once
        return {point["Timestamp"]: point["Sum"] for point in points if point["Sum"]}

    assert ran_once(delivered_in_sequence("aws.metrics_publish"))
    assert failed_jobs_sent() == {start + 2 * MINUTE: 1}
    assert ran_once(delivered_at_once("aws.metrics_publish"))
    assert failed_jobs_sent() == {start + 2 * MINUTE: 1}


@on_the_worker
def test_withdrawal_sending_delivered_twice_sends_each_withdrawal_once(worker):
    phase_set("shadow")
    buffer_fund("1000")
    user = legacy_user("100")
    ledger_balance_set(user, "100")
    sends_before = worker.circle.create_calls
    first = withdraw(user, amount="30")
    assert ran_once(delivered_in_sequence("onchain.withdrawals_send"))
    second = withdraw(user, amount="20")
    assert ran_once(delivered_at_once("onchain.withdrawals_send"))
    assert worker.circle.create_calls - sends_before == 2  # one POST /v1/transfers each
    assert {str(first.idempotency_key), str(second.idempotency_key)} <= set(worker.circle.by_key)
    assert set(Withdrawal.objects.values_list("status", "attempts")) == {("submitted", 1)}


@on_the_worker
def test_deposit_poll_delivered_twice_credits_each_deposit_once(worker):
    phase_set("shadow")
    buffer_fund("1000")
    user = legacy_user("100")
    ledger_balance_set(user, "100")
    address = f"poll-{uuid.uuid4().hex}"
    DepositAddress.objects.create(address=address, chain="ETH", user_id=user)
    worker.circle.deposit(address=address, amount="12.5", notify=False)
    assert ran_once(delivered_in_sequence("onchain.transfers_poll"))
    assert balances(user) == (Decimal("112.5"), Decimal("112.5"))
    worker.circle.deposit(address=address, amount="7.5", notify=False)
    assert ran_once(delivered_at_once("onchain.transfers_poll"))
    assert balances(user) == (Decimal("120"), Decimal("120"))


@on_the_worker
def test_settlement_cycle_delivered_twice_opens_one_job(worker):
    fund("usdc_buffer", "1000")  # below its 5,000 minimum
    fund("fiat_buffer", "60000")
    created_before = worker.due.create_calls
    assert ran_once(delivered_in_sequence("treasury.settlement_cycle"))
    assert (SettlementCycle.objects.count(), ConversionJob.objects.count()) == (1, 1)
    assert ran_once(delivered_at_once("treasury.settlement_cycle"))
    assert (SettlementCycle.objects.count(), ConversionJob.objects.count()) == (2, 1)
    assert ConversionJob.objects.get().status == "submitted"
    assert worker.due.create_calls - created_before == 1


@on_the_worker
def test_treasury_monitor_delivered_twice_posts_a_completion_once(worker, settings):
    settings.DUE_API_BASE_URL, settings.DUE_API_KEY, settings.DUE_API_SECRET = (
        worker.due.base_url,
        KEY,
        SECRET,
    )
    settings.DUE_RECIPIENTS = RECIPIENTS
    fund("usdc_buffer", "1000")
    fund("fiat_buffer", "60000")
    settlement_cycle_run(triggered_by="test")
    jobs_submit()
    conversion = ConversionJob.objects.get()
    worker.due.finish(conversion.provider_reference, "completed")
    assert ran_once(delivered_in_sequence("treasury.monitor"))
    assert ran_once(delivered_at_once("treasury.monitor"))
    conversion.refresh_from_db()
    assert conversion.status == "completed"
    reference = f"conversion:{conversion.idempotency_key}"
    assert Transaction.objects.filter(reference_id=reference).count() == 1


@on_the_worker
def test_a_message_that_raises_is_recorded_failed_and_not_delivered_again(worker):
    """A message the task cannot take (an argument it has no parameter for, as from another
    version): Celery acknowledges a task that raised, the failure is on its row."""
    task_id = str(uuid.uuid4())
    send("cutover.reconcile", task_id, args=("unexpected",))
    assert wait_for(lambda: (delivery(task_id) or TaskDelivery()).status == "failed")
    assert wait_for(queue_empty)
    failed = delivery(task_id)
    assert failed.attempts == 1 and "TypeError" in failed.error
    assert not ReconciliationRun.objects.exists()


@on_the_worker
def test_a_task_past_its_hard_time_limit_is_killed_recorded_failed_and_not_delivered_again(
    worker,
):
    """Circle answers slowly (4 s a transfer) and the message's own limits are 1 s soft, 3 s
    hard: the soft limit's exception fails the first send (the outbox records it and goes on),
    the hard one kills the process mid-way through the second. The message is acknowledged
    and its row says why; both withdrawals are still held, to be sent by a later pass under
    their own keys."""
    phase_set("shadow")
    buffer_fund("1000")
    user = legacy_user("100")
    ledger_balance_set(user, "100")
    withdraw(user, amount="30")
    withdraw(user, amount="20")
    task_id = str(uuid.uuid4())
    worker.circle.delay = 4
    try:
        send("onchain.withdrawals_send", task_id, soft_time_limit=1, time_limit=3)
        assert wait_for(lambda: (delivery(task_id) or TaskDelivery()).status == "failed")
    finally:
        worker.circle.delay = 0
    assert wait_for(queue_empty)
    killed = delivery(task_id)
    assert killed.attempts == 1 and "hard time limit: TimeLimitExceeded(3" in killed.error
    assert set(Withdrawal.objects.values_list("status", flat=True)) == {"pending"}


# A message whose process dies at every start ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_message_killing_its_process_at_every_start_is_given_up_and_shown(
    tmp_path, client, settings
):
    """reject_on_worker_lost puts back the message of a process that died, which would loop
    forever on a message that kills it each time. Its process is SIGKILLed at every start
    (LEDGER_FAULT_POINT): after TASK_DELIVERY_MAX_ATTEMPTS starts the next delivery records it
    dead and acknowledges it, without running it: shown in the admin, counted in the metric,
    logged as an ALERT; the queue holds nothing any more."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    log = tmp_path / "worker.log"
    phase_set("shadow")
    task_id = str(uuid.uuid4())
    environment = {
        "CELERY_BROKER_URL": BROKER,
        "LEDGER_FAULT_POINT": "task:cutover.reconcile",
        "TASK_DELIVERY_MAX_ATTEMPTS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    queue = f"{QUEUE}-poison"
    command = ("worker", "-Q", queue, "-c", "1", *QUIET)
    with log.open("w") as output, celery_running(command, environment=environment, log=output):
        send("cutover.reconcile", task_id, queue=queue)
        assert wait_for(lambda: (delivery(task_id) or TaskDelivery()).status == "dead", 90)
        assert wait_for(lambda: queue_empty(queue))
    dead = delivery(task_id)
    assert (dead.task_name, dead.attempts) == ("cutover.reconcile", 2)
    assert "died every time" in dead.error
    assert not ReconciliationRun.objects.exists()  # its work never ran
    assert f"ALERT celery: task cutover.reconcile[{task_id}]" in log.read_text()

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    assert sample(generate_latest(registry).decode(), "celery_task_deliveries_dead_total") == 1

    client.force_login(User.objects.create_superuser("ops", password="x"))
    listing = client.get("/admin/cutover/taskdelivery/", {"status__exact": "dead"})
    assert listing.status_code == 200 and task_id in listing.content.decode()

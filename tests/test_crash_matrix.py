"""kill -9 at every fault point (issue 15, item 3; README, "Fault points"). Each point's money
flow runs in a real process (gunicorn for the HTTP points, a Celery worker for the task points,
manage.py for the command points) with the point armed until it has SIGKILLed its process
CRASH_MATRIX_KILLS times; then without it, while the clients retry: the same Idempotency-Key,
the same Circle notification, the next beat run, the operator's command again. Then no
acknowledged operation is lost, none is applied twice, no answer was a 5xx, every withdrawal
and conversion job is final, and the ledger verifies (tests/crash.py: the driver)."""

import json
import random
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import pytest
from django.db.models import Count, F, Sum

from config.celery import app
from cutover.actors import Actor
from cutover.balance_path import balance_credit, balance_debit
from cutover.models import (
    BalanceMutation,
    Discrepancy,
    LegacyBalance,
    OperatorAudit,
    PhaseAudit,
    ReconciliationRun,
    TaskDelivery,
)
from cutover.operators import api_client_issue
from cutover.phase_machine import kill_switch_set
from cutover.selectors import backfill_pending, phase_state
from gateway.models import IdempotencyRecord, IdempotencyStatus
from ledger.exceptions import InsufficientFunds
from ledger.models import Account, Transaction
from ledger.services import Leg, opening_balance_post, transaction_post
from onchain.models import CircleNotification, DepositAddress, Withdrawal
from onchain.sandbox import CircleSandbox
from tests.celery import wait_for
from tests.crash import (
    KILLS,
    ROOT,
    Call,
    Flow,
    celery_worker,
    crash_round,
    gunicorn_running,
    manage,
    workers_killed,
)
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import buffer_fund, withdraw
from tests.treasury.factories import (
    KEY,
    RECIPIENT_ENVIRONMENT,
    SECRET,
    buffers,
    fund,
    job_make,
    job_told,
    job_transfer,
)
from treasury.models import ConversionJob, SettlementCycle
from treasury.sandbox import DueSandbox

BROKER = "redis://127.0.0.1:6379/10"
OPERATOR = Actor("cli:test")


def users_holding(count: int, amount: str) -> list[uuid.UUID]:
    """Users with `amount` USDC in both stores (as after the backfill)."""
    users = [legacy_user(amount) for _ in range(count)]
    for user in users:
        ledger_balance_set(user, amount)
    return users


def both_stores(user: uuid.UUID) -> tuple[Decimal, Decimal]:
    legacy = LegacyBalance.objects.get(user_id=user).buying_power
    ledger = Account.objects.get(user_id=user, account_type="usdc_balance").balance
    return legacy, ledger


# HTTP: gunicorn, clients that retry ----------------------------------------------------------


class HttpFlow(Flow):
    """Clients of gunicorn: each step sends `clients` new operations and resends every one
    without its final answer yet, `clients` at a time."""

    clients = 4
    after = 3
    final_statuses: tuple[int, ...] = ()

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.rng = random.Random(15)
        self.calls: list[Call] = []
        self.fault_log: Path | None = None

    def server_environment(self) -> dict[str, str]:
        return {}

    def new_call(self) -> Call:
        raise NotImplementedError

    @contextmanager
    def serving(self, environment: dict[str, str]) -> Iterator[None]:
        log = self.tmp_path / f"gunicorn-{'armed' if environment else 'clean'}.log"
        if environment:
            self.fault_log = log
        with gunicorn_running({**self.server_environment(), **environment}, log) as port:
            self.port = port
            yield

    def kills(self) -> int:
        return workers_killed(self.fault_log)

    def final(self, call: Call) -> tuple[int, dict] | None:
        return next((a for a in call.answers if a[0] in self.final_statuses), None)

    def _send(self, calls: list[Call]) -> None:
        with ThreadPoolExecutor(self.clients) as pool:
            list(pool.map(lambda call: call.send(self.port), calls))

    def step(self) -> None:
        waiting = [call for call in self.calls if self.final(call) is None]
        new = [self.new_call() for _ in range(self.clients)]
        self.calls += new
        self._send(waiting + new)

    def settle(self) -> None:
        """Resend until every operation has its final answer (a key still held by a killed
        request answers 409 until IDEMPOTENCY_LOCK_TIMEOUT); then once more each: the same
        answer again."""

        def unanswered() -> list[Call]:
            return [call for call in self.calls if self.final(call) is None]

        deadline = time.monotonic() + 120
        while waiting := unanswered():
            assert time.monotonic() < deadline, [(c.path, c.answers[-3:]) for c in waiting]
            self._send(waiting)
            time.sleep(0.2)
        self._send(self.calls)

    def violations(self) -> list[str]:
        found = [  # a 5xx above all
            f"{call.path} {call.headers.get('Idempotency-Key', '')}: {status} {body}"
            for call in self.calls
            for status, body in call.answers
            if status not in (*self.final_statuses, 409)
        ]
        for user, expected in self.expected_balances().items():
            if both_stores(user) != (expected, expected):
                found.append(f"user {user}: {both_stores(user)}, acknowledged {expected}")
        return found

    def expected_balances(self) -> dict[uuid.UUID, Decimal]:
        raise NotImplementedError


class BalanceMutations(HttpFlow):
    """The balance API's POST: random credits and debits of a few users in shadow, each under
    an Idempotency-Key of its own, resent with that key until answered."""

    final_statuses = (201, 422)  # applied; refused for want of funds (nothing applied)
    opening = Decimal(100)

    def prepare(self) -> None:
        phase_set("shadow")
        self.users = users_holding(6, str(self.opening))
        _, self.token = api_client_issue(
            name="crash-matrix",
            scopes=["read", "credit", "debit"],
            actor=OPERATOR,
            reason="the crash matrix's client",
        )

    def server_environment(self) -> dict[str, str]:
        # A key held by a killed request is taken over this soon by its retry.
        return {"IDEMPOTENCY_LOCK_TIMEOUT": "1s"}

    def new_call(self) -> Call:
        user = self.rng.choice(self.users)
        credit = self.rng.random() < 0.6
        amount = Decimal(self.rng.randint(1, 4000)) / 100
        body = {
            "direction": "credit" if credit else "debit",
            "amount": str(amount),
            "currency": "USDC",
            "reason": "crash matrix",
        }
        return Call(
            path=f"/api/v1/users/{user}/balance-mutations",
            headers={
                "Authorization": f"Bearer {self.token}",
                "Idempotency-Key": uuid.uuid4().hex,
                "Content-Type": "application/json",
            },
            body=json.dumps(body).encode(),
            user=user,
            effect=amount if credit else -amount,
        )

    def expected_balances(self) -> dict[uuid.UUID, Decimal]:
        expected = dict.fromkeys(self.users, self.opening)
        for call in self.calls:
            if self.final(call)[0] == 201:
                expected[call.user] += call.effect
        return expected

    def violations(self) -> list[str]:
        found = super().violations()
        found += [
            f"key {call.headers['Idempotency-Key']} answered differently: {call.answers}"
            for call in self.calls
            if len({json.dumps(a, sort_keys=True) for a in call.answers if a[0] != 409}) > 1
        ]
        applied = sum(self.final(call)[0] == 201 for call in self.calls)
        journal = BalanceMutation.objects.filter(reference__startswith="api:").count()
        if journal != applied:
            found.append(f"{applied} mutations acknowledged, {journal} in the journal")
        held = IdempotencyRecord.objects.exclude(status=IdempotencyStatus.COMPLETED).count()
        if held:
            found.append(f"{held} Idempotency-Keys still in flight")
        return found


class BalanceMutationsAcrossTheKillSwitch(BalanceMutations):
    """The balance API's POSTs killed after their mutation committed; their retries first
    arrive while an operator holds the kill switch (each takes its key over, is refused 503
    and must keep the key: found from outside, a refusal forgot the key and the next retry
    applied the debit a second time), then after its release."""

    def settle(self) -> None:
        kill_switch_set(engaged=True, actor=OPERATOR, reason="crash matrix: the switch")
        time.sleep(1.2)  # past IDEMPOTENCY_LOCK_TIMEOUT: each retry takes its key over
        waiting = [call for call in self.calls if self.final(call) is None]
        answered = [len(call.answers) for call in waiting]
        self._send(waiting)
        # (Kept apart: the flow's checks want every other answer final and the same per key.)
        self.paused = [
            call.answers.pop()
            for call, n in zip(waiting, answered, strict=True)
            if len(call.answers) > n
        ]
        kill_switch_set(engaged=False, actor=OPERATOR, reason="crash matrix: released")
        super().settle()

    def violations(self) -> list[str]:
        found = super().violations()
        found += [f"under the kill switch: {a}" for a in self.paused if a[0] not in (503, 409)]
        if not any(status == 503 for status, _ in self.paused):
            found.append("no retry reached the service while the kill switch was on")
        return found


class CircleDeposits(HttpFlow):
    """Circle's webhook: signed notifications of deposits to a few users' addresses, each
    redelivered (the same notification, body and signature) until answered 200."""

    final_statuses = (200,)
    opening = Decimal(100)

    def __init__(self, tmp_path: Path, circle: CircleSandbox):
        super().__init__(tmp_path)
        self.circle = circle

    def prepare(self) -> None:
        phase_set("shadow")
        self.users = users_holding(6, str(self.opening))
        self.addresses = {}
        for index, user in enumerate(self.users):
            address = f"0x{uuid.uuid4().hex[:8]}{index:032x}"
            DepositAddress.objects.create(address=address, chain="ETH", user_id=user)
            self.addresses[user] = address

    def server_environment(self) -> dict[str, str]:
        return {
            "CIRCLE_API_BASE_URL": self.circle.base_url,
            "CIRCLE_API_KEY": "sandbox-key",
            "CIRCLE_WALLET_ID": self.circle.wallet_id,
        }

    def new_call(self) -> Call:
        user = self.rng.choice(self.users)
        amount = Decimal(self.rng.randint(1, 5000)) / 100
        body = CircleSandbox.transfer_notification(
            transfer_id=str(uuid.uuid4()),
            address=self.addresses[user],
            amount=str(amount),
            wallet_id=self.circle.wallet_id,
        )
        headers = {
            "Content-Type": "application/json",
            "X-Circle-Signature": self.circle.sign(body),
            "X-Circle-Key-Id": self.circle.key_id,
        }
        return Call("/webhooks/circle/transfers", headers, body, user, amount)

    def expected_balances(self) -> dict[uuid.UUID, Decimal]:
        expected = dict.fromkeys(self.users, self.opening)
        for call in self.calls:
            expected[call.user] += call.effect
        return expected

    def violations(self) -> list[str]:
        found = super().violations()
        found += [
            f"notification {body.get('notificationId')} answered {body}"
            for call in self.calls
            for status, body in call.answers
            if status == 200 and body.get("status") != "processed"
        ]
        stored = CircleNotification.objects.filter(status="processed").count()
        if stored != len(self.calls):
            found.append(f"{len(self.calls)} notifications sent, {stored} processed")
        return found


class DueWebhooks(HttpFlow):
    """Due's webhook killed right after the completion it asked Due for was committed, before
    its 200: a job per buffer whose transfer Due has processed, its event delivered (each
    delivery a new event, as Due's redeliveries and renotifications are) until answered 200.
    Each completion is posted once."""

    final_statuses = (200,)

    def __init__(self, tmp_path: Path, due: DueSandbox):
        super().__init__(tmp_path)
        self.due = due

    def prepare(self) -> None:
        fund("usdc_buffer", "1000")
        fund("fiat_buffer", "60000")
        self.jobs = [
            job_make(reference=f"tf_{uuid.uuid4().hex[:20]}", source=source, amount=amount)
            for source, amount in (("USD", "19000"), ("USDC", "500"))
        ]
        with self.due.lock:
            for job in self.jobs:
                self.due.conversions[job.provider_reference] = job_transfer(
                    job, transfer_id=job.provider_reference, status="payment_processed"
                )

    def server_environment(self) -> dict[str, str]:
        return {
            "DUE_API_BASE_URL": self.due.base_url,
            "DUE_API_KEY": KEY,
            "DUE_API_SECRET": SECRET,
            "DUE_WEBHOOK_PUBLIC_KEY": self.due.public_key_pem,
        }

    def new_call(self) -> Call:
        job = self.rng.choice(self.jobs)
        body = self.due.event(self.due.conversions[job.provider_reference])
        headers = {"Content-Type": "application/json", "X-Webhook-Signature": self.due.sign(body)}
        return Call("/webhooks/due/conversions", headers, body, uuid.uuid4(), Decimal(0))

    def expected_balances(self) -> dict[uuid.UUID, Decimal]:
        return {}

    def violations(self) -> list[str]:
        found = super().violations()
        found += [
            f"answered {body}"
            for call in self.calls
            for status, body in call.answers
            if status == 200 and body != {"status": "completed"}
        ]
        for job in self.jobs:
            job.refresh_from_db()
            postings = Transaction.objects.filter(reference_id=f"conversion:{job.idempotency_key}")
            if (job.status, postings.count()) != ("completed", 1):
                found.append(f"job {job.pk} {job.status}, posted {postings.count()} times")
        return found


class CircleRenotifications(CircleDeposits):
    """Circle's webhook killed in a plain deposit's one-statement path, right after
    onchain_deposit_notification_accept committed: each transfer notified twice, under two
    notification ids (Circle renotifies a transfer under a new id; the two sent together),
    each notification redelivered until answered 200. Each transfer is credited once, once in
    each store and once in the ledger."""

    def __init__(self, tmp_path: Path, circle: CircleSandbox):
        super().__init__(tmp_path, circle)
        self.renotifications: list[Call] = []
        self.transfers: list[str] = []

    def new_call(self) -> Call:
        if self.renotifications:
            return self.renotifications.pop()
        first = super().new_call()
        transfer = json.loads(first.body)["notification"]
        self.transfers.append(transfer["id"])
        body = CircleSandbox.notification("custody.transfer", transfer)  # a new notificationId
        headers = {**first.headers, "X-Circle-Signature": self.circle.sign(body)}
        # The same transfer: its amount counted once, on the first notification.
        self.renotifications.append(Call(first.path, headers, body, first.user, Decimal(0)))
        return first

    def violations(self) -> list[str]:
        found = super().violations()
        expected = Counter(f"circle:transfer:{transfer}" for transfer in self.transfers)
        mutations = BalanceMutation.objects.filter(reference__startswith="circle:transfer:")
        postings = Transaction.objects.filter(reference_id__startswith="circle:transfer:")
        for name, counted in (
            ("balance mutations", Counter(mutations.values_list("reference", flat=True))),
            ("ledger postings", Counter(postings.values_list("reference_id", flat=True))),
        ):
            if counted != expected:
                found.append(f"{name} per transfer {dict(counted)}, one each expected")
        return found


# Celery: a worker of the flow's own, fed the messages beat would send ------------------------


class CeleryFlow(Flow):
    """One prefork worker process (as deployed, with one child) on a queue of its own, sent
    each task's message as beat sends it; a killed child's message comes back
    (reject_on_worker_lost) to the child that replaces it. TASK_DELIVERY_MAX_ATTEMPTS is out
    of the way: the matrix kills a message's process more often than it is allowed to die for
    real (its giving up is tests/test_celery_deliveries.py's)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.rng = random.Random(15)
        self.queue = f"crash-{uuid.uuid4().hex[:8]}"
        self.problems: list[str] = []

    def worker_environment(self) -> dict[str, str]:
        return {}

    @contextmanager
    def serving(self, environment: dict[str, str]) -> Iterator[None]:
        log = self.tmp_path / f"worker-{'armed' if environment else 'clean'}.log"
        env = {
            "CELERY_BROKER_URL": BROKER,
            "TASK_DELIVERY_MAX_ATTEMPTS": "1000000",
            **self.worker_environment(),
            **environment,
        }
        with celery_worker(self.queue, env, log):
            yield

    def beat(self, task: str) -> None:
        """What beat sends every interval: a new message; waits until it ran to an end."""
        task_id = str(uuid.uuid4())
        with app.connection_for_write(BROKER) as connection:
            app.send_task(task, task_id=task_id, queue=self.queue, connection=connection)

        def ended() -> bool:
            delivery = TaskDelivery.objects.filter(task_id=task_id).first()
            return delivery is not None and delivery.status != "running"

        assert wait_for(ended, 120, every=0.05), f"{task} {task_id} did not end"
        delivery = TaskDelivery.objects.get(task_id=task_id)
        if delivery.status != "succeeded":
            self.problems.append(f"{task} {task_id} {delivery.status}: {delivery.error[:500]}")

    def kills(self) -> int:
        """Starts of a message that did not end: each one's process was killed (every message
        sent has ended when this is asked)."""
        counted = TaskDelivery.objects.aggregate(starts=Sum("attempts"), messages=Count("pk"))
        return (counted["starts"] or 0) - counted["messages"]

    def violations(self) -> list[str]:
        return list(self.problems)


class WithdrawalSends(CeleryFlow):
    """Withdrawals held in shadow and sent to Circle by `onchain.withdrawals_send`; after the
    restart, Circle completes them and `onchain.transfers_poll` settles them."""

    opening = Decimal(1000)

    def __init__(self, tmp_path: Path, circle: CircleSandbox):
        super().__init__(tmp_path)
        self.circle = circle

    def prepare(self) -> None:
        phase_set("shadow")
        buffer_fund("1000000")
        self.users = users_holding(4, str(self.opening))
        self.transfers_before = len(self.circle.transfers)

    def worker_environment(self) -> dict[str, str]:
        return {
            "ENABLE_ONCHAIN_ENGINE": "true",
            "CIRCLE_API_BASE_URL": self.circle.base_url,
            "CIRCLE_API_KEY": "sandbox-key",
        }

    def step(self) -> None:
        for _ in range(3):
            amount = Decimal(self.rng.randint(1, 1000)) / 100
            withdraw(self.rng.choice(self.users), amount=str(amount))
        self.beat("onchain.withdrawals_send")

    def settle(self) -> None:
        for _ in range(10):
            if not Withdrawal.objects.filter(status="pending").exists():
                break
            self.beat("onchain.withdrawals_send")
        for transfer_id in Withdrawal.objects.filter(status="submitted").values_list(
            "circle_transfer_id", flat=True
        ):
            self.circle.transfer_finish(transfer_id, "complete", notify=False)
        self.beat("onchain.transfers_poll")

    def violations(self) -> list[str]:
        found = super().violations()
        withdrawals = list(Withdrawal.objects.all())
        found += [
            f"withdrawal {w.pk} is {w.status}" for w in withdrawals if w.status != "completed"
        ]
        found += [
            f"withdrawal {w.pk} recorded transfer {w.circle_transfer_id}, Circle made "
            f"{self.circle.by_key.get(str(w.idempotency_key), ('none',))[0]} for its key"
            for w in withdrawals
            if self.circle.by_key.get(str(w.idempotency_key), ("",))[0] != w.circle_transfer_id
        ]
        made = len(self.circle.transfers) - self.transfers_before
        if made != len(withdrawals):
            found.append(f"{len(withdrawals)} withdrawals, {made} transfers made at Circle")
        sent = {user: Decimal(0) for user in self.users}
        for w in withdrawals:
            sent[w.user_id] += w.amount
        found += [
            f"user {user}: {both_stores(user)} after withdrawing {amount} of {self.opening}"
            for user, amount in sent.items()
            if both_stores(user) != (self.opening - amount,) * 2
        ]
        return found


class SettlementCycles(CeleryFlow):
    """The USDC buffer pushed below its minimum before each `treasury.settlement_cycle` (a
    conversion job from the fiat buffer, submitted to Due) and `treasury.monitor` (Due
    completes the conversion when asked: the job posts)."""

    def __init__(self, tmp_path: Path, due: DueSandbox):
        super().__init__(tmp_path)
        self.due = due

    def prepare(self) -> None:
        fund("usdc_buffer", "20000")  # at target: 5,000 / 20,000 / 100,000
        fund("fiat_buffer", "300000")  # 10,000 / 50,000 / 500,000
        self.conversions_before = len(self.due.conversions)

    def worker_environment(self) -> dict[str, str]:
        return {
            "ENABLE_TREASURY_SCHEDULER": "true",
            "DUE_API_BASE_URL": self.due.base_url,
            "DUE_API_KEY": KEY,
            "DUE_API_SECRET": SECRET,
            **RECIPIENT_ENVIRONMENT,
        }

    def step(self) -> None:
        spent = Decimal(self.rng.randint(15_100, 16_000))
        self._move("usdc_buffer", -spent)  # paid out: below the minimum
        self._move("fiat_buffer", spent)  # and as much paid in at the bank
        self.beat("treasury.settlement_cycle")
        self.beat("treasury.monitor")

    @staticmethod
    def _move(code: str, amount: Decimal) -> None:
        account = Account.objects.get(code=code)
        equity = Account.objects.get(code=f"opening_balance_equity_{account.currency_id.lower()}")
        legs = [Leg.debit(account, amount), Leg.credit(equity, amount)]
        if amount < 0:
            legs = [Leg.credit(account, -amount), Leg.debit(equity, -amount)]
        transaction_post(
            namespace="test", reference_id=f"move:{uuid.uuid4()}", kind="adjustment", legs=legs
        )

    def settle(self) -> None:
        for _ in range(5):
            if not ConversionJob.objects.exclude(status="completed").exists():
                break
            self.beat("treasury.settlement_cycle")
            self.beat("treasury.monitor")

    def violations(self) -> list[str]:
        found = super().violations()
        jobs = list(ConversionJob.objects.all())
        found += [f"job {job.pk} is {job.status}" for job in jobs if job.status != "completed"]
        for job in jobs:
            if job.provider_reference not in self.due.conversions:
                found.append(f"job {job.pk} recorded {job.provider_reference}, not Due's")
            postings = Transaction.objects.filter(reference_id=f"conversion:{job.idempotency_key}")
            if postings.count() != 1:
                found.append(f"job {job.pk} posted {postings.count()} times")
        made = len(self.due.conversions) - self.conversions_before
        if made != len(jobs):
            found.append(f"{len(jobs)} jobs, {made} conversions made at Due")
        created = SettlementCycle.objects.aggregate(jobs=Sum("jobs_created"))["jobs"]
        if created != len(jobs):
            found.append(f"cycles recorded {created} jobs created, {len(jobs)} exist")
        return found


class Reconciliations(CeleryFlow):
    """`cutover.reconcile` in shadow while drifts appear (the ledger moved alone) and earlier
    ones mend (the legacy side catches up), among mutations through the balance path."""

    def prepare(self) -> None:
        phase_set("shadow")
        self.users = users_holding(12, "100")
        self.drifted: set[uuid.UUID] = set()

    def step(self) -> None:
        steady = [user for user in self.users if user not in self.drifted]
        if steady:
            user = self.rng.choice(steady)
            account = Account.objects.get(user_id=user, account_type="usdc_balance")
            opening_balance_post(
                namespace="test-drift",
                account=account,
                amount=Decimal(1),
                reference_id=str(uuid.uuid4()),
            )
            self.drifted.add(user)
        if len(self.drifted) > 3:
            user = self.drifted.pop()
            LegacyBalance.objects.filter(user_id=user).update(buying_power=F("buying_power") + 1)
        balance_credit(
            user_id=self.rng.choice(self.users),
            amount=Decimal("2.50"),
            reference=str(uuid.uuid4()),
            reason="crash matrix",
        )
        self.beat("cutover.reconcile")

    def settle(self) -> None:
        self.beat("cutover.reconcile")

    def violations(self) -> list[str]:
        found = super().violations()
        unresolved = set(
            Discrepancy.objects.filter(
                status__in=["open", "investigating", "known_difference"]
            ).values_list("user_id", flat=True)
        )
        if unresolved != self.drifted:
            found.append(f"unresolved discrepancies for {unresolved}, drifted {self.drifted}")
        runs = ReconciliationRun.objects.count()
        messages = TaskDelivery.objects.filter(task_name="cutover.reconcile").count()
        if runs != messages:
            found.append(f"{messages} reconciliation messages, {runs} runs recorded")
        partial = ReconciliationRun.objects.exclude(users_checked=len(self.users)).count()
        if partial:
            found.append(f"{partial} runs checked another number of users")
        return found


# Commands: one manage.py process per run -----------------------------------------------------


class CommandFlow(Flow):
    """An operator's command: each step runs it once (armed, it dies; a run that finished
    before the point's passage is not a kill); after the restart, once more without the
    point."""

    def __init__(self, tmp_path: Path):
        self.rng = random.Random(15)
        self.died = 0
        self.problems: list[str] = []

    @contextmanager
    def serving(self, environment: dict[str, str]) -> Iterator[None]:
        self.environment = environment
        yield

    def run(self, *args: str) -> bool:
        """The command once; True when the fault point killed it."""
        result = manage(*args, environment=self.environment)
        if result.returncode == -signal.SIGKILL:
            self.died += 1
            return True
        if result.returncode != 0:
            self.problems.append(f"{' '.join(args)} exited {result.returncode}: {result.stderr}")
        return False

    def kills(self) -> int:
        return self.died

    def violations(self) -> list[str]:
        return list(self.problems)


class Backfills(CommandFlow):
    """`cutover backfill` in legacy while users arrive and legacy balances move, killed in
    the middle of a chunk (at a passage drawn anew for each run), resumed by the next run."""

    chunk = 2

    def prepare(self) -> None:
        self.users = [legacy_user(str(self.rng.randint(1, 500))) for _ in range(12)]

    def step(self) -> None:
        self.users += [legacy_user(str(self.rng.randint(1, 500))) for _ in range(2 * self.chunk)]
        for user in self.rng.sample(self.users, 2):
            balance_credit(
                user_id=user, amount=Decimal("1.25"), reference=str(uuid.uuid4()), reason="crash"
            )
        if self.environment:
            self.environment["LEDGER_FAULT_AFTER"] = str(self.rng.randint(1, 3))
        self.run("cutover", "backfill", "--chunk-size", str(self.chunk))

    def settle(self) -> None:
        self.run("cutover", "backfill", "--chunk-size", str(self.chunk))

    def violations(self) -> list[str]:
        found = super().violations()
        found += [
            f"user {user}: legacy {legacy}, ledger {ledger}"
            for user in self.users
            if (legacy := LegacyBalance.objects.get(user_id=user).buying_power)
            != (ledger := self._ledger(user))
        ]
        if backfill_pending():
            found.append(f"{backfill_pending()} users still to backfill")
        return found

    @staticmethod
    def _ledger(user: uuid.UUID) -> Decimal | None:
        return (
            Account.objects.filter(user_id=user, account_type="usdc_balance")
            .values_list("balance", flat=True)
            .first()
        )


class Rollbacks(CommandFlow):
    """`cutover rollback` from cutover (the legacy store rebuilt from the ledger in the flip's
    transaction) while mutations reach the ledger alone between the runs; killed after the
    rebuild, run again by the operator."""

    after = 1
    opening = Decimal(100)

    def prepare(self) -> None:
        self.users = users_holding(10, str(self.opening))
        phase_set("cutover")
        self.expected = dict.fromkeys(self.users, self.opening)

    def step(self) -> None:
        for user in self.rng.sample(self.users, 3):
            amount = Decimal(self.rng.randint(1, 2000)) / 100
            credit = self.rng.random() < 0.6
            try:
                (balance_credit if credit else balance_debit)(
                    user_id=user, amount=amount, reference=str(uuid.uuid4()), reason="crash"
                )
            except InsufficientFunds:
                continue
            self.expected[user] += amount if credit else -amount
        if self.run("cutover", "rollback", "--reason", "crash matrix"):
            # Nothing half done: still in cutover, the legacy store as it was left.
            if phase_state().phase != "cutover":
                self.problems.append(f"a killed rollback left the phase {phase_state().phase}")
            stale = LegacyBalance.objects.exclude(buying_power=self.opening).count()
            if stale:
                self.problems.append(f"a killed rollback left {stale} legacy rows rebuilt")

    def settle(self) -> None:
        self.run("cutover", "rollback", "--reason", "crash matrix")

    def violations(self) -> list[str]:
        found = super().violations()
        if phase_state().phase != "legacy":
            found.append(f"the phase is {phase_state().phase} after the rollback")
        found += [
            f"user {user}: {both_stores(user)}, acknowledged {amount}"
            for user, amount in self.expected.items()
            if both_stores(user) != (amount, amount)
        ]
        rollbacks = PhaseAudit.objects.filter(action="rollback").count()
        if rollbacks != 1:
            found.append(f"{rollbacks} rollbacks audited")
        return found


class JobActions(CommandFlow):
    """An operator's command on conversion jobs Due has told a final word of (`action`, asked
    of Due by the command), killed after its posting and before its commit; the operator runs
    it again. Each job ends `done` with one posting of `kind`, audited once; the buffers moved
    by what each job's Due answer says (`moved`)."""

    after = 1
    action = kind = done = ""

    def __init__(self, tmp_path: Path, due: DueSandbox):
        super().__init__(tmp_path)
        self.due = due

    @contextmanager
    def serving(self, environment: dict[str, str]) -> Iterator[None]:
        with super().serving(
            {
                **environment,
                "DUE_API_BASE_URL": self.due.base_url,
                "DUE_API_KEY": KEY,
                "DUE_API_SECRET": SECRET,
                **RECIPIENT_ENVIRONMENT,
            }
        ):
            yield

    def prepare(self) -> None:
        fund("usdc_buffer", "100000")
        fund("fiat_buffer", "100000")
        self.before = buffers()
        self.jobs: list[ConversionJob] = []

    def job_told(self, job: ConversionJob) -> ConversionJob:
        raise NotImplementedError

    def moved(self, job: ConversionJob) -> dict[str, Decimal]:
        raise NotImplementedError

    def step(self) -> None:
        amount = str(self.rng.randint(100, 500))
        job = job_make(reference=f"tf_{uuid.uuid4().hex[:20]}", amount=amount)
        self.jobs.append(self.job_told(job))
        was = job.status
        if self.run("treasury", self.action, str(job.pk), "--reason", "crash matrix"):
            job.refresh_from_db()
            if job.status != was:
                self.problems.append(f"a killed {self.action} left job {job.pk} {job.status}")

    def settle(self) -> None:
        for job in self.jobs:
            job.refresh_from_db()
            if job.status != self.done:
                self.run("treasury", self.action, str(job.pk), "--reason", "crash matrix")

    def violations(self) -> list[str]:
        found = super().violations()
        ids = [job.pk for job in self.jobs]
        ended = ConversionJob.objects.filter(pk__in=ids, status=self.done).count()
        if ended != len(ids):
            found.append(f"{ended} of {len(ids)} jobs {self.done}")
        postings = Transaction.objects.filter(kind=self.kind).count()
        if postings != len(ids):
            found.append(f"{postings} {self.kind} postings for {len(ids)} jobs")
        audits = OperatorAudit.objects.filter(action=f"job.{self.action}").count()
        if audits != len(ids):
            found.append(f"{audits} audits of job.{self.action} for {len(ids)} jobs")
        expected = dict(self.before)
        for job in self.jobs:
            for currency, change in self.moved(job).items():
                expected[currency] += change
        if buffers() != expected:
            found.append(f"buffers {buffers()}, expected {expected}")
        return found


class Reversals(JobActions):
    """`treasury reverse` of completed conversions Due refunded."""

    action, kind, done = "reverse", "conversion_reversal", "reversed"

    def job_told(self, job: ConversionJob) -> ConversionJob:
        return job_told(
            self.due, job, [("completed", "payment_processed"), ("failed", "refund_processed")]
        )

    def moved(self, job: ConversionJob) -> dict[str, Decimal]:
        return {}  # converted, then reversed


class Resolutions(JobActions):
    """`treasury resolve` of disputed conversions (Due kept a 2 % fee, over the 1 % the
    treasury posts unasked) that Due processed: each booked as Due made it."""

    action, kind, done = "resolve", "conversion", "completed"

    def job_told(self, job: ConversionJob) -> ConversionJob:
        paid = str(job.source_amount * Decimal("0.98"))
        destination = {**job_transfer(job, transfer_id=job.provider_reference)["destination"]}
        return job_told(
            self.due,
            job,
            [("completed", "payment_processed")],
            destination={**destination, "amount": paid},
        )

    def moved(self, job: ConversionJob) -> dict[str, Decimal]:
        return {"USD": -job.source_amount, "USDC": job.source_amount * Decimal("0.98")}


# The matrix ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def circle():
    with CircleSandbox(settle=None) as sandbox:
        yield sandbox


@pytest.fixture
def due():
    """A Due of each flow's own: a transfer another flow's (flushed) job made would be one a job
    of this flow looks for and finds (one of its amount and currencies, held by no job)."""
    with DueSandbox(api_key=KEY, api_secret=SECRET, settle="completed") as sandbox:
        yield sandbox


# point -> its flow, and the sandbox the flow speaks to
MATRIX = {
    "api:mutation-applied": (BalanceMutations, None),
    "webhook:circle-committed": (CircleDeposits, "circle"),
    "webhook:deposit-accepted": (CircleRenotifications, "circle"),
    "outbox:claimed": (WithdrawalSends, "circle"),
    "withdrawal:circle-answered": (WithdrawalSends, "circle"),
    "conversion:due-answered": (SettlementCycles, "due"),
    "webhook:due-settled": (DueWebhooks, "due"),
    "cycle:committed": (SettlementCycles, "due"),
    "reconcile:recorded": (Reconciliations, None),
    "backfill:chunk-posted": (Backfills, None),
    "rollback:legacy-rebuilt": (Rollbacks, None),
    "treasury:reversal-posted": (Reversals, "due"),
    "treasury:resolution-booked": (Resolutions, "due"),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(300 + 30 * KILLS)
@pytest.mark.parametrize("point", MATRIX)
def test_killed_at_the_point_loses_and_duplicates_nothing(
    point, request, tmp_path, record_property
):
    flow_class, sandbox = MATRIX[point]
    flow = flow_class(tmp_path, *([request.getfixturevalue(sandbox)] if sandbox else []))
    result = crash_round(flow, point, KILLS, seconds=120 + 20 * KILLS)
    record_property("kills", result.kills)
    record_property("steps", result.steps)
    assert result.kills >= KILLS
    assert result.violations == []


def test_the_readme_names_every_fault_point_and_the_matrix_kills_at_each():
    """Every fault_point("...") in the code is in the README's table of fault points, and the
    crash matrix has a flow for it."""
    in_code = set()
    for source in ROOT.glob("*/**/*.py"):
        if ".venv" in source.parts or "tests" in source.parts:
            continue
        in_code |= set(re.findall(r'fault_point\("([^"]+)"\)', source.read_text()))
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Fault points\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE))
    assert in_code == documented == set(MATRIX)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(300 + 30 * KILLS)
def test_killed_mutations_retried_under_the_kill_switch_apply_once(tmp_path):
    flow = BalanceMutationsAcrossTheKillSwitch(tmp_path)
    result = crash_round(flow, "api:mutation-applied", KILLS, seconds=120 + 20 * KILLS)
    assert result.kills >= KILLS
    assert result.violations == []

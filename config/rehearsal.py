"""The rehearsal: a whole rollout on synthetic users and live traffic, in a scratch database.

legacy users with balances in USDC (and about one in ten in USD) -> custody opened from what the
synthetic custodians report over their APIs (Circle's wallet: the users' USDC; Due: the company's
fiat) -> a withdrawal of pre-shadow money sent at Circle while still in legacy -> backfill under
traffic (legacy mutations mirrored against equity) -> shadow (that withdrawal completes; an
injected drift that reconciliation must catch and the gate must block on) -> read_switch
1/10/50/100 % -> strict -> cutover -> the treasury round (a conversion whose submit answer was
lost) -> rollback drill from cutover in two currencies (rehearsed first, then run) -> custody
reconciled against the providers; every gate's evidence and every invariant in the report. One
Circle sandbox and one Due sandbox serve the whole run over real HTTP (signed webhooks to this
project's endpoint, redeliveries, a poll, a parked deposit, a refusal, a failure).
"""

import multiprocessing
import random
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection
from django.utils import timezone

from config.custody import custody_open_from_providers, custody_reconcile_from_providers
from config.runtime import http_server, latency_summary, processes_run
from cutover.actors import Actor
from cutover.exceptions import (
    GateNotMet,
    KillSwitchEngaged,
    MutationConflict,
    StrictLedgerFailure,
)
from cutover.models import BalanceMutation
from cutover.phases import Phase
from cutover.selectors import (
    balance_get,
    open_discrepancy_count,
    phase_state,
    store_differences,
)
from cutover.services import (
    backfill_run,
    balance_credit,
    balance_debit,
    phase_advance,
    phase_rollback,
    phase_rollback_rehearse,
    reconciliation_run,
)
from ledger.exceptions import InsufficientFunds
from ledger.models import Transaction
from ledger.selectors import ledger_integrity_checks, system_account
from onchain.models import CircleNotification, DepositAddress, Withdrawal
from onchain.sandbox import CircleSandbox
from onchain.services import (
    notification_replay,
    transfers_poll,
    withdrawal_request,
    withdrawals_send,
)
from treasury.models import BufferThreshold, ConversionJob
from treasury.sandbox import DueSandbox
from treasury.services import jobs_submit, monitor_run, settlement_cycle_run

CENT = Decimal("0.01")
ACTOR = Actor("rehearsal")
CURRENCIES = ("USDC", "USD")
# One legacy user in ten holds USD (the second of every ten, so that even two users have both).
USD_EVERY = 10
# Gates wait 48-72 h in production; the rehearsal shows the same gates with seconds.
REHEARSAL_MIN_DURATION = timedelta(seconds=1)
# A conversion's submit is retried twice, at once, instead of five times over minutes.
REHEARSAL_SUBMIT_ATTEMPTS = 2
# The company's fiat at Due in the rehearsal's synthetic custody (enough to refill USDC).
REHEARSAL_FIAT_CUSTODY = Decimal("200000.00")
PRE_SHADOW_WITHDRAWAL = Decimal("250.00")

_progress = None  # shared with forked workers: operations finished

USER_TOTALS_SQL = """
    SELECT currency, 'legacy', sum(buying_power) FROM balances GROUP BY currency
    UNION ALL
    SELECT currency, 'ledger', sum(balance) FROM ledger_accounts
     WHERE user_id IS NOT NULL AND account_type = lower(currency) || '_balance'
     GROUP BY currency
"""


def user_totals() -> dict[str, dict[str, Decimal]]:
    """Per currency, the users' total in each store: {"USDC": {"legacy": .., "ledger": ..}}."""
    totals = {currency: {"legacy": Decimal(0), "ledger": Decimal(0)} for currency in CURRENCIES}
    with connection.cursor() as cursor:
        cursor.execute(USER_TOTALS_SQL)
        for currency, store, total in cursor.fetchall():
            totals.setdefault(currency, {"legacy": Decimal(0), "ledger": Decimal(0)})[store] = total
    return totals


@dataclass
class Traffic:
    operations: int = 0
    applied: int = 0
    replays: int = 0
    refused_overdrafts: int = 0
    refused_other: int = 0
    credited: dict[str, Decimal] = field(default_factory=dict)  # per currency
    debited: dict[str, Decimal] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, other: "Traffic") -> None:
        for name in ("operations", "applied", "replays", "refused_overdrafts", "refused_other"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.credited, other.credited), (self.debited, other.debited)):
            for currency, amount in theirs.items():
                mine[currency] = mine.get(currency, Decimal(0)) + amount
        self.latencies_ms += other.latencies_ms


def traffic_worker(stage: str, worker: int, users: list, operations: int, seed: int):
    """Random credits and debits through the balance path, each user in its own currency; one
    in twenty is a duplicate delivery of an earlier mutation, which must be applied once."""
    rng = random.Random(f"{seed}-{stage}-{worker}")
    traffic, sent = Traffic(), []
    for index in range(operations):
        if sent and rng.random() < 0.05:
            reference, user, currency, credit, amount = rng.choice(sent)
        else:
            reference = f"{stage}-{worker}-{index}"
            (user, currency), credit = rng.choice(users), rng.random() < 0.55
            amount = Decimal(rng.randint(1, 20000)) * CENT
        started = time.perf_counter()
        try:
            mutate = balance_credit if credit else balance_debit
            result = mutate(
                user_id=user,
                amount=amount,
                currency=currency,
                reference=reference,
                reason="rehearsal",
            )
        except InsufficientFunds:
            traffic.refused_overdrafts += 1
        except (KillSwitchEngaged, StrictLedgerFailure):
            traffic.refused_other += 1
        else:
            traffic.latencies_ms.append((time.perf_counter() - started) * 1000)
            if result.created:
                traffic.applied += 1
                sent.append((reference, user, currency, credit, amount))
                moved = traffic.credited if credit else traffic.debited
                moved[currency] = moved.get(currency, Decimal(0)) + amount
            else:
                traffic.replays += 1
        traffic.operations += 1
        with _progress.get_lock():
            _progress.value += 1
    connection.close()
    return traffic


def backfill_worker(chunk_size: int):
    result = backfill_run(chunk_size=chunk_size)
    connection.close()
    return result


def _role(name: str, *args):
    return {"traffic": traffic_worker, "backfill": backfill_worker}[name](*args)


@dataclass
class Stage:
    name: str
    phase: str
    traffic: Traffic
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        t = self.traffic
        return {
            "stage": self.name,
            "phase": self.phase,
            "operations": t.operations,
            "applied": t.applied,
            "replays": t.replays,
            "refused_overdrafts": t.refused_overdrafts,
            "refused_other": t.refused_other,
            "mutations_per_second": round(t.applied / self.seconds, 1) if self.seconds else 0.0,
            **latency_summary(t.latencies_ms),
            "notes": self.notes,
        }


class Rehearsal:
    def __init__(self, *, users: int, workers: int, operations: int, seed: int, on_progress):
        self.users, self.workers, self.operations, self.seed = users, workers, operations, seed
        self.on_progress = on_progress  # (stage name, done, total) -> None
        self.stages: list[Stage] = []
        self.gates: list[dict] = []
        self.total = Traffic()
        self.opening: dict[str, Decimal] = {currency: Decimal(0) for currency in CURRENCIES}
        self.user_ids: list[uuid.UUID] = []
        self.currency_of: dict[uuid.UUID, str] = {}
        self.usdc_users: list[uuid.UUID] = []
        self.onchain: list[dict] = []
        self.treasury: dict = {}
        self.onchain_net = Decimal(0)  # USDC deposits credited minus withdrawals completed
        self.custody: dict = {}
        self.custody_reconciled: list[dict] = []
        self.pre_shadow: dict = {}
        self.rollback: dict = {}
        self.circle: CircleSandbox | None = None
        self.due: DueSandbox | None = None

    # The run -------------------------------------------------------------------------------

    def run(self) -> dict:
        """The whole rollout against one Circle sandbox and one Due sandbox, with the settings
        pointed at them (and at the rehearsal's short gates) for the run only."""
        key, secret = secrets.token_hex(8), secrets.token_hex(16)  # this run's sandbox only
        overrides = {
            "CUTOVER_SHADOW_MIN_DURATION": REHEARSAL_MIN_DURATION,
            "CUTOVER_READ_SWITCH_MIN_DURATION": REHEARSAL_MIN_DURATION,
            "CUTOVER_STRICT_MIN_DURATION": REHEARSAL_MIN_DURATION,
            "TREASURY_SUBMIT_MAX_ATTEMPTS": REHEARSAL_SUBMIT_ATTEMPTS,
            "TREASURY_SUBMIT_BACKOFF": timedelta(0),
            "CIRCLE_API_KEY": "rehearsal",
            "DUE_API_KEY": key,
            "DUE_API_SECRET": secret,
        }
        token = f"?token={settings.CIRCLE_WEBHOOK_SECRET}" if settings.CIRCLE_WEBHOOK_SECRET else ""
        saved = {
            name: getattr(settings, name)
            for name in [*overrides, "CIRCLE_API_BASE_URL", "DUE_API_BASE_URL"]
        }
        try:
            with (
                http_server() as base_url,
                CircleSandbox(subscriber=f"{base_url}/webhooks/circle/transfers{token}") as circle,
                DueSandbox(api_key=key, api_secret=secret, settle="completed") as due,
            ):
                for name, value in overrides.items():
                    setattr(settings, name, value)
                settings.CIRCLE_API_BASE_URL, settings.DUE_API_BASE_URL = (
                    circle.base_url,
                    due.base_url,
                )
                self.circle, self.due = circle, due
                return self._rollout()
        finally:
            for name, value in saved.items():
                setattr(settings, name, value)

    def _rollout(self) -> dict:
        if phase_state().phase != Phase.LEGACY:
            phase_rollback(actor=ACTOR, reason="the rehearsal starts from legacy")
        self._legacy_users()
        self._custody_open()
        self._pre_shadow_withdrawal_send()
        self._traffic("legacy", with_backfill=True)
        backfill_run()  # catch up with what the legacy traffic changed meanwhile
        self._advance(Phase.SHADOW, "backfill verified")
        self._pre_shadow_withdrawal_complete()
        self._traffic("shadow")
        self._onchain()
        self._drift_drill()
        for percent in (1, 10, 50, 100):
            if percent == 1:
                self._advance(Phase.READ_SWITCH, "shadow clean", read_percent=1)
            else:
                self._advance(
                    Phase.READ_SWITCH, f"raise reads to {percent} %", read_percent=percent
                )
            self._traffic(f"read_switch {percent}%", share=4)
        self._reconcile("read_switch")
        self._advance(Phase.STRICT, "read_switch clean at 100 %")
        self._traffic("strict")
        self._reconcile("strict")
        self._advance(Phase.CUTOVER, "strict clean")
        self._traffic("cutover")
        self._onchain()
        self._treasury_round()
        self._rollback_drill()
        self._custody_reconcile()
        return self._report()

    def _legacy_users(self) -> None:
        """N users in the legacy store only, as the old system has them: one in ten in USD,
        the others in USDC. Circle's wallet holds exactly the users' USDC; Due holds the
        company's fiat."""
        rng = random.Random(self.seed)
        rows = [
            (
                uuid.UUID(int=rng.getrandbits(128), version=4),
                Decimal(rng.randint(0, 200000)) * CENT,
                "USD" if index % USD_EVERY == 1 else "USDC",
            )
            for index in range(self.users)
        ]
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO balances (user_id, buying_power, currency) VALUES (%s, %s, %s)", rows
            )
        self.user_ids = [user for user, _, _ in rows]
        self.currency_of = {user: currency for user, _, currency in rows}
        self.usdc_users = [user for user, _, currency in rows if currency == "USDC"]
        for _, amount, currency in rows:
            self.opening[currency] += amount
        with self.circle.lock:
            self.circle.wallet_balance = self.opening["USDC"]
        with self.due.lock:
            self.due.balances["USD"] = REHEARSAL_FIAT_CUSTODY

    def _custody_open(self) -> None:
        """Book both buffers at what the custodians report over their APIs, before any
        traffic. From here on every legacy mutation is mirrored in the ledger, so the buffers
        stay right through the rollout."""
        for opening in custody_open_from_providers(
            actor=ACTOR, reason="the rehearsal's custody, as Circle and Due report it"
        ):
            self.custody[opening.currency] = str(opening.reported)

    def _custody_reconcile(self) -> None:
        """At the end: every buffer against what its custodian reports now."""
        self.custody_reconciled = [
            {
                "currency": c.currency,
                "source": c.source,
                "ledger": str(c.ledger_balance),
                "reported": str(c.reported),
                "difference": str(c.difference),
                "agrees": c.agrees,
            }
            for c in custody_reconcile_from_providers()
        ]

    # Pre-shadow money ----------------------------------------------------------------------

    def _pre_shadow_withdrawal_send(self) -> None:
        """Still in legacy, custody open: a USDC user withdraws money booked before shadow; the
        withdrawal is sent (Circle accepts the transfer) but completes on chain only after the
        advance to shadow."""
        pending = system_account(code="withdrawals_pending_usdc").balance
        user = max(self.usdc_users, key=lambda u: balance_get(user_id=u).amount)
        amount = min(PRE_SHADOW_WITHDRAWAL, balance_get(user_id=user).amount)
        withdrawal = withdrawal_request(
            user_id=user, amount=amount, address=f"0x{user.hex}", chain="ETH"
        )
        withdrawals_send(limit=1)
        withdrawal.refresh_from_db()
        self.pre_shadow = {
            "withdrawal": str(withdrawal.idempotency_key),
            "amount": str(withdrawal.amount),
            "requested_in": phase_state().phase,
            "hold_in_ledger": withdrawal.hold_in_ledger,
            "status_in_legacy": withdrawal.status,
            "pending_before": str(pending),
            "pending_held": str(system_account(code="withdrawals_pending_usdc").balance),
        }

    def _pre_shadow_withdrawal_complete(self) -> None:
        """In shadow, the pre-shadow withdrawal's transfer completes on chain; Circle's webhook
        posts the completion (pending hold -> USDC buffer)."""
        withdrawal = Withdrawal.objects.get(idempotency_key=self.pre_shadow["withdrawal"])
        buffer_before = system_account(code="usdc_buffer").balance
        self.circle.transfer_finish(withdrawal.circle_transfer_id, "complete")
        withdrawal.refresh_from_db()
        if withdrawal.status == "completed":
            self.onchain_net -= withdrawal.amount
        unsettled = CircleNotification.objects.filter(
            transfer_id=withdrawal.circle_transfer_id, status__in=["parked", "failed"]
        ).count()
        self.pre_shadow.update(
            completed_in=phase_state().phase,
            status=withdrawal.status,
            pending_after=str(system_account(code="withdrawals_pending_usdc").balance),
            buffer_before=str(buffer_before),
            buffer_after=str(system_account(code="usdc_buffer").balance),
            notifications_unsettled=unsettled,
        )

    # Traffic and gates ---------------------------------------------------------------------

    def _traffic(self, name: str, with_backfill: bool = False, share: int = 1) -> None:
        global _progress
        _progress = multiprocessing.get_context("fork").Value("q", 0)
        operations = max(self.workers, self.operations // share)
        per_worker = operations // self.workers
        users = [(user, self.currency_of[user]) for user in self.user_ids]
        jobs = [("traffic", name, w, users, per_worker, self.seed) for w in range(self.workers)]
        if with_backfill:
            jobs.append(("backfill", 50))
        started = time.perf_counter()
        results = processes_run(
            _role,
            jobs,
            on_tick=lambda: self.on_progress(name, _progress.value, per_worker * self.workers),
        )
        seconds = time.perf_counter() - started
        traffic = Traffic()
        for result in results[: self.workers]:
            traffic.add(result)
        self.total.add(traffic)
        stage = Stage(name, phase_state().phase, traffic, seconds)
        if with_backfill:
            stage.notes.append(
                f"backfill ran under this traffic: {results[-1].postings} opening postings"
            )
        self.stages.append(stage)

    def _advance(self, to: Phase, reason: str, read_percent: int = 1) -> None:
        before = phase_state()
        if before.phase != to:  # the gate's time in phase: wait it out, as an operator would
            ready_at = before.entered_at + REHEARSAL_MIN_DURATION
            time.sleep(max(0.0, (ready_at - timezone.now()).total_seconds()))
        audit = phase_advance(to=to, actor=ACTOR, reason=reason, read_percent=read_percent)
        self.gates.append(
            {
                "transition": f"{before.phase} -> {to.value}"
                + (f" ({read_percent} %)" if to == Phase.READ_SWITCH else ""),
                "result": audit.action,
                "evidence": audit.evidence,
            }
        )

    def _reconcile(self, label: str):
        result = reconciliation_run(triggered_by="rehearsal")
        self.stages[-1].notes.append(
            f"reconciliation after {label}: {result.users_checked} users, "
            f"{result.differences} differences, {result.seconds * 1000:.0f} ms"
        )
        return result

    def _drift_drill(self) -> None:
        """An out-of-band write to the legacy table: reconciliation must find it and the gate
        must refuse to move on until it is repaired."""
        victim = self.user_ids[len(self.user_ids) // 2]
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE balances SET buying_power = buying_power + 0.01 WHERE user_id = %s",
                [victim],
            )
        found = self._reconcile("injected drift")
        notes = self.stages[-1].notes
        notes.append(f"drift injected on user {victim}: {found.differences} difference found")
        try:
            phase_advance(to=Phase.READ_SWITCH, actor=ACTOR, reason="should be blocked")
        except GateNotMet as exc:
            self.gates.append(
                {
                    "transition": "shadow -> read_switch",
                    "result": "blocked",
                    "evidence": exc.evidence,
                }
            )
        else:
            raise AssertionError("the gate let a known discrepancy through")
        with connection.cursor() as cursor:  # the operator repairs the legacy row
            cursor.execute(
                "UPDATE balances SET buying_power = buying_power - 0.01 WHERE user_id = %s",
                [victim],
            )
        repaired = self._reconcile("repair")
        notes.append(f"repaired: {repaired.resolved} discrepancy resolved by reconciliation")
        self.drift_found = found.differences

    # On chain --------------------------------------------------------------------------------

    def _usdc_users_holding(self, rng, count: int, at_least: Decimal) -> list:
        """Up to `count` USDC users, in a random order, whose balance now is at least
        `at_least` (a withdrawal larger than the balance is refused, not rehearsed)."""
        chosen = []
        for user in rng.sample(self.usdc_users, len(self.usdc_users)):
            if len(chosen) == count:
                break
            if balance_get(user_id=user).amount >= at_least:
                chosen.append(user)
        return chosen

    def _onchain(self, deposits: int = 20, withdrawals: int = 10) -> None:
        """USDC withdrawals, then deposits, through the Circle sandbox in the current phase:
        the withdrawals come first and from users who deposit nothing here, so they spend money
        booked before this stage (in shadow: before shadow, backed by the custody opening)."""
        phase = phase_state().phase
        rng = random.Random(f"{self.seed}-onchain-{phase}")
        buffer_before = system_account(code="usdc_buffer").balance
        # a third of the USDC users at most withdraw, so that others are left to deposit
        withdrawers = self._usdc_users_holding(
            rng, min(withdrawals, max(1, len(self.usdc_users) // 3)), Decimal(10)
        )
        depositors = [u for u in self.usdc_users if u not in withdrawers]
        depositors = rng.sample(depositors, min(deposits, len(depositors)))
        summary = self._onchain_withdrawals(phase, rng, withdrawers)
        summary.update(self._onchain_deposits(phase, rng, depositors))
        summary["phase"] = phase
        summary["buffer_change"] = str(system_account(code="usdc_buffer").balance - buffer_before)
        self.onchain.append(summary)

    def _onchain_withdrawals(self, phase, rng, users) -> dict:
        sandbox = self.circle
        held = []
        for index, user in enumerate(users):
            amount = Decimal(rng.randint(100, 1000)) * CENT
            address = "0xbad-rehearsal" if index == 0 else f"0x{rng.getrandbits(160):040x}"
            held.append(
                withdrawal_request(user_id=user, amount=amount, address=address, chain="ETH")
            )
        sent = withdrawals_send(limit=len(held) + 1)
        withdrawn, failed_on_chain = Decimal(0), 0
        for index, withdrawal in enumerate(held):
            withdrawal.refresh_from_db()
            if withdrawal.status != "submitted":
                continue
            outcome = "failed" if index == 1 else "complete"  # one fails on chain
            sandbox.transfer_finish(withdrawal.circle_transfer_id, outcome)
            failed_on_chain += outcome == "failed"
        for withdrawal in held:
            withdrawal.refresh_from_db()
            if withdrawal.status == "completed":
                withdrawn += withdrawal.amount
        self.onchain_net -= withdrawn
        statuses = [w.status for w in Withdrawal.objects.filter(pk__in=[w.pk for w in held])]
        return {
            "withdrawals": len(held),
            "refused_by_circle": sent.failed,
            "failed_on_chain": failed_on_chain,
            "completed": statuses.count("completed"),
            "withdrawn": str(withdrawn),
            "withdrawals_settled": set(statuses) <= {"completed", "failed"},
        }

    def _onchain_deposits(self, phase, rng, users) -> dict:
        sandbox = self.circle
        deposited, transfers = Decimal(0), []
        for index, user in enumerate(users):
            address = f"0x{phase[:4]}{index:036x}"
            DepositAddress.objects.create(address=address, chain="ETH", user_id=user)
            amount = Decimal(rng.randint(1000, 50000)) * CENT
            # the last one's webhook never comes: the poll must find it
            transfer = sandbox.deposit(
                address=address, amount=str(amount), notify=index < len(users) - 1
            )
            transfers.append(transfer)
            deposited += amount
        redelivered = 0
        for transfer in transfers[: len(transfers) // 3]:  # Circle redelivers, or renotifies
            stored = CircleNotification.objects.filter(transfer_id=transfer["id"]).first()
            if stored is not None:
                sandbox.deliver(sandbox.subscriber, stored.body.encode())
            sandbox.deliver(
                sandbox.subscriber, CircleSandbox.notification("transfers.completed", transfer)
            )
            redelivered += 2
        parked_before = CircleNotification.objects.filter(status="parked").count()
        unknown = sandbox.deposit(address=f"0xnobody-{phase}", amount="12.34")
        parked = CircleNotification.objects.filter(status="parked").count() - parked_before
        polled = transfers_poll().deposits_credited
        # The operator's way with a deposit to an address we did not know: register the address
        # for its user, then replay the parked notification (credited once, like any deposit).
        resolved = Decimal(0)
        for row in CircleNotification.objects.filter(transfer_id=unknown["id"], status="parked"):
            DepositAddress.objects.get_or_create(
                address=f"0xnobody-{phase}",
                defaults={"chain": "ETH", "user_id": (users or self.usdc_users)[0]},
            )
            notification_replay(
                notification_id=row.notification_id,
                actor=ACTOR,
                reason="the deposit's address belongs to a known user",
            )
        if BalanceMutation.objects.filter(reference=f"circle:transfer:{unknown['id']}").exists():
            resolved = Decimal(unknown["amount"]["amount"])
        self.onchain_net += deposited + resolved
        return {
            "deposits": len(users),
            "deposited": str(deposited + resolved),
            "redeliveries": redelivered,
            "credited_by_poll": polled,
            "parked": parked,
            "parked_resolved": str(resolved),
            "credits_once": BalanceMutation.objects.filter(
                reference__in=[f"circle:transfer:{t['id']}" for t in [*transfers, unknown]]
            ).count()
            == len(transfers) + 1,
        }

    # Treasury ------------------------------------------------------------------------------

    def _due_pays_out_usdc(self, paid: set) -> None:
        """What the sandboxes cannot see by themselves: a completed USD -> USDC conversion's
        USDC leaves Due for our Circle wallet (Due's payout to the wallet's address)."""
        with self.due.lock:
            completed = [
                c
                for c in self.due.conversions.values()
                if c["status"] == "completed"
                and c["destination"]["currency"] == "USDC"
                and c["id"] not in paid
            ]
            for conversion in completed:
                amount = Decimal(conversion["destination"]["amount"])
                self.due.balances["USDC"] -= amount
                paid.add(conversion["id"])
                with self.circle.lock:
                    self.circle.wallet_balance += amount

    def _treasury_round(self) -> None:
        """Withdrawals drain the USDC buffer below its minimum; the settlement cycle converts
        fiat through the Due sandbox and the buffer is back at its target. The conversion's
        submit meets a lost answer: Due accepts it, the connection drops before the answer,
        and Due is unavailable until the job has spent its attempts and its look-up by key
        (timed_out, its source still reserved); once Due is back, the monitor finds the
        conversion by the job's key and books it, once."""
        threshold = BufferThreshold.objects.get(currency="USDC")
        circle, due = self.circle, self.due
        before = system_account(code="usdc_buffer").balance
        drained, held = Decimal(0), []
        richest = sorted(self.usdc_users, key=lambda u: balance_get(user_id=u).amount, reverse=True)
        for user in richest:  # the richest users withdraw until the buffer falls below minimum
            if before - drained < threshold.minimum:
                break
            amount = min(
                balance_get(user_id=user).amount, before - drained - threshold.minimum + CENT
            )
            if amount <= 0:
                break
            held.append(
                withdrawal_request(
                    user_id=user, amount=amount, address=f"0x{user.hex}", chain="ETH"
                )
            )
            drained += amount
        withdrawals_send(limit=len(held) + 1)  # one pass sends them all
        for withdrawal in held:
            withdrawal.refresh_from_db()
            circle.transfer_finish(withdrawal.circle_transfer_id, "complete")
        self.onchain_net -= drained
        low = system_account(code="usdc_buffer").balance
        cycle = settlement_cycle_run(triggered_by="rehearsal")
        due.lose_answers = 1  # the first creation is recorded, its answer never arrives
        due.on_created = lambda conversion: setattr(due, "unavailable", True)
        for _ in range(settings.TREASURY_SUBMIT_MAX_ATTEMPTS):
            jobs_submit()
        jobs = list(ConversionJob.objects.filter(pk__in=cycle.jobs_created).order_by("pk"))
        lost = jobs[0] if jobs else None
        before_monitor = lost.status if lost else ""
        due.unavailable, due.on_created = False, None
        monitor_run()
        paid: set = set()
        self._due_pays_out_usdc(paid)
        after = system_account(code="usdc_buffer").balance
        for job in jobs:
            job.refresh_from_db()
        lost_answer = {}
        if lost is not None:
            key = str(lost.idempotency_key)
            with due.lock:
                at_due = [c["id"] for c in due.conversions.values() if c["reference"] == key]
            lost_answer = {
                "job": lost.pk,
                "key": key,
                "status_before_monitor": before_monitor,
                "status": lost.status,
                "creations_sent": due.create_calls,
                "conversions_at_due": len(at_due),
                "postings": Transaction.objects.filter(
                    namespace="treasury", reference_id=f"conversion:{key}"
                ).count(),
            }
        self.treasury = {
            "buffer_before": str(before),
            "withdrawn": str(drained),
            "buffer_low": str(low),
            "minimum": str(threshold.minimum),
            "jobs": [
                f"{job.source_amount} {job.source_currency} -> {job.target_currency}: {job.status}"
                for job in jobs
            ],
            "buffer_after": str(after),
            "target": str(threshold.target),
            "restored": low < threshold.minimum and after == threshold.target,
            "lost_answer": lost_answer,
        }

    # The way back ----------------------------------------------------------------------------

    def _rollback_drill(self) -> None:
        """From cutover, with users in two currencies: a credit in a second currency is refused
        (one currency per user, in every phase); `cutover rollback --dry-run` proves the
        rollback from this state; then the rollback runs, and each currency's users hold in
        the rebuilt legacy store what they held in the ledger."""
        usdc_user = self.usdc_users[0]
        try:
            balance_credit(
                user_id=usdc_user,
                amount=Decimal("1.00"),
                currency="USD",
                reference="rehearsal-second-currency",
                reason="rehearsal",
            )
        except MutationConflict as exc:
            second_currency = f"refused: {exc}"
        else:
            second_currency = "accepted"
        ledger_before = {c: t["ledger"] for c, t in user_totals().items()}
        rehearsed = phase_rollback_rehearse()
        self.gates.append(
            {
                "transition": "cutover -> legacy (dry run)",
                "result": "rehearsed",
                "evidence": rehearsed,
            }
        )
        audit = phase_rollback(actor=ACTOR, reason="rollback drill")
        differing, _ = store_differences(limit=0)
        self.gates.append(
            {
                "transition": "cutover -> legacy (drill)",
                "result": audit.action,
                "evidence": audit.evidence,
            }
        )
        self.rollback_differences = differing
        after = user_totals()
        self.rollback = {
            "second_currency_credit": second_currency,
            "dry_run_proof": rehearsed.get("proof", {}).get("ok", False),
            "dry_run_rows": rehearsed.get("legacy_rows_rebuilt"),
            "rows_rebuilt": audit.evidence.get("legacy_rows_rebuilt"),
            "currencies": {
                currency: {
                    "users": sum(1 for c in self.currency_of.values() if c == currency),
                    "ledger_before": str(ledger_before.get(currency, Decimal(0))),
                    "legacy_after": str(after[currency]["legacy"]),
                    "ledger_after": str(after[currency]["ledger"]),
                }
                for currency in CURRENCIES
            },
        }

    # The report ------------------------------------------------------------------------------

    def _invariants(self) -> list[dict]:
        totals = user_totals()
        expected = {
            currency: self.opening[currency]
            + self.total.credited.get(currency, Decimal(0))
            - self.total.debited.get(currency, Decimal(0))
            + (self.onchain_net if currency == "USDC" else Decimal(0))
            for currency in CURRENCIES
        }
        checks = [
            {
                "name": c.name,
                "ok": c.ok,
                "detail": "; ".join(c.problems[:3]) or f"{c.checked} checked",
            }
            for c in ledger_integrity_checks()
        ]
        pre, lost, rollback = self.pre_shadow, self.treasury.get("lost_answer", {}), self.rollback
        usd = rollback["currencies"]["USD"]
        checks += [
            {
                "name": "drift_caught",
                "ok": self.drift_found == 1,
                "detail": f"{self.drift_found} difference found for 1 injected",
            },
            {
                "name": "conservation",
                "ok": all(
                    totals[c]["legacy"] == expected[c] == totals[c]["ledger"] for c in CURRENCIES
                ),
                "detail": "; ".join(
                    f"{c}: legacy {totals[c]['legacy']}, ledger {totals[c]['ledger']}, "
                    f"expected {expected[c]}"
                    for c in CURRENCIES
                ),
            },
            {
                "name": "rollback_rebuilt_legacy",
                "ok": self.rollback_differences == 0,
                "detail": f"{self.rollback_differences} users differ after the drill",
            },
            {
                "name": "rollback_kept_every_currency",
                "ok": usd["users"] > 0
                and rollback["dry_run_proof"] is True
                and rollback["dry_run_rows"] == rollback["rows_rebuilt"]
                and rollback["second_currency_credit"].startswith("refused")
                and all(
                    t["ledger_before"] == t["legacy_after"] == t["ledger_after"]
                    for t in rollback["currencies"].values()
                ),
                "detail": "; ".join(
                    f"{c} ({t['users']} users): ledger {t['ledger_before']} before, legacy "
                    f"{t['legacy_after']} and ledger {t['ledger_after']} after"
                    for c, t in rollback["currencies"].items()
                )
                + f"; dry run proved {rollback['dry_run_rows']} rows, the drill rebuilt "
                f"{rollback['rows_rebuilt']}; a USD credit to a USDC user in cutover "
                f"{rollback['second_currency_credit'].split(':')[0]}",
            },
            {
                "name": "pre_shadow_money_withdrawn",
                "ok": pre.get("requested_in") == "legacy"
                and pre.get("status_in_legacy") == "submitted"
                and pre.get("completed_in") == "shadow"
                and pre.get("status") == "completed"
                and pre.get("pending_after") == pre.get("pending_before")
                and Decimal(pre["buffer_before"]) - Decimal(pre["buffer_after"])
                == Decimal(pre["amount"])
                and pre.get("notifications_unsettled") == 0
                and not Withdrawal.objects.filter(status__in=["pending", "submitted"]).exists(),
                "detail": f"{pre.get('amount')} USDC requested and sent in "
                f"{pre.get('requested_in')}, {pre.get('status')} in {pre.get('completed_in')}; "
                f"withdrawals_pending_usdc {pre.get('pending_before')} -> "
                f"{pre.get('pending_held')} -> {pre.get('pending_after')}; usdc_buffer "
                f"{pre.get('buffer_before')} -> {pre.get('buffer_after')}; "
                f"{Withdrawal.objects.filter(status__in=['pending', 'submitted']).count()} "
                "withdrawals open at the end",
            },
            {
                "name": "onchain_exactly_once",
                "ok": all(
                    o["credits_once"] and o["withdrawals_settled"] and o["parked_resolved"] != "0"
                    for o in self.onchain
                ),
                "detail": "; ".join(
                    f"{o['phase']}: {o['withdrawals']} withdrawals of earlier money first "
                    f"({o['completed']} completed, {o['refused_by_circle']} refused, "
                    f"{o['failed_on_chain']} failed on chain), then {o['deposits']} deposits "
                    f"credited once ({o['redeliveries']} redeliveries, {o['credited_by_poll']} "
                    f"by the poll, {o['parked']} parked and resolved by the operator)"
                    for o in self.onchain
                ),
            },
            {
                "name": "treasury_restored_the_buffer",
                "ok": bool(self.treasury.get("restored")),
                "detail": f"USDC buffer {self.treasury.get('buffer_before')} -> "
                f"{self.treasury.get('buffer_low')} after withdrawals (minimum "
                f"{self.treasury.get('minimum')}) -> {self.treasury.get('buffer_after')} after "
                f"the cycle (target {self.treasury.get('target')})",
            },
            {
                "name": "conversion_with_lost_answer_booked_once",
                "ok": lost.get("status_before_monitor") == "timed_out"
                and lost.get("status") == "completed"
                and lost.get("conversions_at_due") == 1
                and lost.get("postings") == 1
                and bool(self.treasury.get("restored")),
                "detail": f"job {lost.get('job')}: {lost.get('status_before_monitor')} after "
                f"its submits ({lost.get('creations_sent')} creations sent: the first "
                "accepted and its answer lost, then Due unavailable), "
                f"{lost.get('status')} after the monitor's look-up by key; "
                f"{lost.get('conversions_at_due')} conversion at Due under its key, "
                f"{lost.get('postings')} posting treasury/conversion:{lost.get('key')}; "
                f"USDC buffer {self.treasury.get('buffer_after')} (target "
                f"{self.treasury.get('target')})",
            },
            {
                "name": "custody_agrees",
                "ok": len(self.custody_reconciled) == len(CURRENCIES)
                and all(r["agrees"] for r in self.custody_reconciled),
                "detail": "; ".join(
                    f"{r['currency']}: ledger {r['ledger']}, {r['source']} reports {r['reported']}"
                    for r in self.custody_reconciled
                ),
            },
            {
                "name": "no_open_discrepancies",
                "ok": open_discrepancy_count() == 0,
                "detail": f"{open_discrepancy_count()} open",
            },
        ]
        return checks

    def _report(self) -> dict:
        checks = self._invariants()
        return {
            "users": self.users,
            "users_by_currency": {
                c: sum(1 for held in self.currency_of.values() if held == c) for c in CURRENCIES
            },
            "workers": self.workers,
            "stages": [stage.as_dict() for stage in self.stages],
            "gates": self.gates,
            "all_traffic": {
                "operations": self.total.operations,
                "applied": self.total.applied,
                "replays": self.total.replays,
                **latency_summary(self.total.latencies_ms),
            },
            "custody_opened": self.custody,
            "custody_reconciled": self.custody_reconciled,
            "pre_shadow_withdrawal": self.pre_shadow,
            "onchain": self.onchain,
            "treasury": self.treasury,
            "rollback": self.rollback,
            "invariants": checks,
            "ok": all(check["ok"] for check in checks),
        }

"""The rehearsal: a whole rollout on synthetic users and live traffic, in a scratch database.

legacy users with balances -> custody opened (the buffers booked at what the synthetic
custodians hold: the users' USDC at Circle, the company's fiat at Due) -> backfill under traffic
(legacy mutations mirrored against equity) -> shadow (with one injected drift that
reconciliation must catch and the gate must block on) -> read_switch 1/10/50/100 % -> strict ->
cutover -> rollback drill; every gate's evidence and every invariant in the report. In shadow
and in cutover, USDC deposits and withdrawals go through the Circle sandbox over real HTTP
(signed webhooks to this project's endpoint, redeliveries, a poll, a refusal, a failure).
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

from config.runtime import http_server, latency_summary, processes_run
from cutover.actors import Actor
from cutover.exceptions import GateNotMet, KillSwitchEngaged, StrictLedgerFailure
from cutover.models import BalanceMutation
from cutover.phases import Phase
from cutover.selectors import (
    balance_get,
    open_discrepancy_count,
    phase_state,
    store_differences,
    store_totals,
)
from cutover.services import (
    backfill_run,
    balance_credit,
    balance_debit,
    custody_open,
    phase_advance,
    phase_rollback,
    reconciliation_run,
)
from ledger.exceptions import InsufficientFunds
from ledger.selectors import ledger_integrity_checks, system_account
from onchain.models import CircleNotification, DepositAddress, Withdrawal
from onchain.sandbox import CircleSandbox
from onchain.services import transfers_poll, withdrawal_request, withdrawals_send
from treasury.models import BufferThreshold, ConversionJob
from treasury.sandbox import DueSandbox
from treasury.services import jobs_submit, monitor_run, settlement_cycle_run

CENT = Decimal("0.01")
ACTOR = Actor("rehearsal")
# Gates wait 48-72 h in production; the rehearsal shows the same gates with seconds.
REHEARSAL_MIN_DURATION = timedelta(seconds=1)
# The company's fiat at Due in the rehearsal's synthetic custody (enough to refill USDC).
REHEARSAL_FIAT_CUSTODY = Decimal("200000.00")

_progress = None  # shared with forked workers: operations finished


@dataclass
class Traffic:
    operations: int = 0
    applied: int = 0
    replays: int = 0
    refused_overdrafts: int = 0
    refused_other: int = 0
    credited: Decimal = Decimal(0)
    debited: Decimal = Decimal(0)
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, other: "Traffic") -> None:
        for name in ("operations", "applied", "replays", "refused_overdrafts", "refused_other"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.credited += other.credited
        self.debited += other.debited
        self.latencies_ms += other.latencies_ms


def traffic_worker(stage: str, worker: int, user_ids: list, operations: int, seed: int):
    """Random credits and debits through the balance path; one in twenty is a duplicate
    delivery of an earlier mutation, which must be applied once."""
    rng = random.Random(f"{seed}-{stage}-{worker}")
    traffic, sent = Traffic(), []
    for index in range(operations):
        if sent and rng.random() < 0.05:
            reference, user, credit, amount = rng.choice(sent)
        else:
            reference = f"{stage}-{worker}-{index}"
            user, credit = rng.choice(user_ids), rng.random() < 0.55
            amount = Decimal(rng.randint(1, 20000)) * CENT
        started = time.perf_counter()
        try:
            mutate = balance_credit if credit else balance_debit
            result = mutate(user_id=user, amount=amount, reference=reference, reason="rehearsal")
        except InsufficientFunds:
            traffic.refused_overdrafts += 1
        except (KillSwitchEngaged, StrictLedgerFailure):
            traffic.refused_other += 1
        else:
            traffic.latencies_ms.append((time.perf_counter() - started) * 1000)
            if result.created:
                traffic.applied += 1
                sent.append((reference, user, credit, amount))
                if credit:
                    traffic.credited += amount
                else:
                    traffic.debited += amount
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
        self.opening_total = Decimal(0)
        self.user_ids: list[uuid.UUID] = []
        self.onchain: list[dict] = []
        self.treasury: dict = {}
        self.onchain_net = Decimal(0)  # deposits credited minus withdrawals completed
        self.custody: dict = {}

    def run(self) -> dict:
        for name in (
            "CUTOVER_SHADOW_MIN_DURATION",
            "CUTOVER_READ_SWITCH_MIN_DURATION",
            "CUTOVER_STRICT_MIN_DURATION",
        ):
            setattr(settings, name, REHEARSAL_MIN_DURATION)
        if phase_state().phase != Phase.LEGACY:
            phase_rollback(actor=ACTOR, reason="the rehearsal starts from legacy")
        self._legacy_users()
        self._custody_open()
        self._traffic("legacy", with_backfill=True)
        backfill_run()  # catch up with what the legacy traffic changed meanwhile
        self._advance(Phase.SHADOW, "backfill verified")
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
        self._treasury()
        self._rollback_drill()
        return self._report()

    def _legacy_users(self) -> None:
        """N users in the legacy store only, as the old system has them."""
        rng = random.Random(self.seed)
        rows = [
            (uuid.UUID(int=rng.getrandbits(128), version=4), Decimal(rng.randint(0, 200000)) * CENT)
            for _ in range(self.users)
        ]
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO balances (user_id, buying_power, currency) VALUES (%s, %s, 'USDC')",
                rows,
            )
        self.user_ids = [user for user, _ in rows]
        self.opening_total = sum((amount for _, amount in rows), Decimal(0))

    def _custody_open(self) -> None:
        """Book both buffers from what the synthetic custodians hold before any traffic: Circle
        holds exactly the users' USDC, Due the company's fiat. From here on every legacy
        mutation is mirrored in the ledger, so the buffers stay right through the rollout."""
        for currency, reported, source in (
            ("USDC", self.opening_total, "rehearsal-circle"),
            ("USD", REHEARSAL_FIAT_CUSTODY, "rehearsal-due"),
        ):
            opening = custody_open(
                currency=currency,
                reported=reported,
                source=source,
                actor=ACTOR,
                reason="the rehearsal's synthetic custody",
            )
            self.custody[currency] = str(opening.reported)

    def _traffic(self, name: str, with_backfill: bool = False, share: int = 1) -> None:
        global _progress
        _progress = multiprocessing.get_context("fork").Value("q", 0)
        operations = max(self.workers, self.operations // share)
        per_worker = operations // self.workers
        jobs = [
            ("traffic", name, w, self.user_ids, per_worker, self.seed) for w in range(self.workers)
        ]
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

    def _onchain(self, deposits: int = 20, withdrawals: int = 10) -> None:
        """USDC deposits and withdrawals through the Circle sandbox, in the current phase."""
        phase = phase_state().phase
        rng = random.Random(f"{self.seed}-onchain-{phase}")
        users = rng.sample(self.user_ids, min(deposits, len(self.user_ids)))
        token = f"?token={settings.CIRCLE_WEBHOOK_SECRET}" if settings.CIRCLE_WEBHOOK_SECRET else ""
        saved = settings.CIRCLE_API_BASE_URL, settings.CIRCLE_API_KEY
        buffer_before = system_account(code="usdc_buffer").balance
        with (
            http_server() as base_url,
            CircleSandbox(subscriber=f"{base_url}/webhooks/circle/transfers{token}") as sandbox,
        ):
            settings.CIRCLE_API_BASE_URL, settings.CIRCLE_API_KEY = sandbox.base_url, "rehearsal"
            try:
                summary = self._onchain_flows(phase, rng, users, withdrawals, sandbox)
            finally:
                settings.CIRCLE_API_BASE_URL, settings.CIRCLE_API_KEY = saved
        summary["buffer_change"] = str(system_account(code="usdc_buffer").balance - buffer_before)
        self.onchain.append(summary)

    def _onchain_flows(self, phase, rng, users, withdrawals, sandbox) -> dict:
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
        sandbox.deposit(address="0xnobody-" + phase, amount="12.34")  # parked for an operator
        parked = CircleNotification.objects.filter(status="parked").count() - parked_before
        polled = transfers_poll().deposits_credited
        held = []
        for index, user in enumerate(users[: min(withdrawals, len(users))]):
            amount = Decimal(rng.randint(100, 1000)) * CENT
            address = "0xbad-rehearsal" if index == 0 else f"0x{rng.getrandbits(160):040x}"
            held.append(
                withdrawal_request(user_id=user, amount=amount, address=address, chain="ETH")
            )
        sent = withdrawals_send()
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
        self.onchain_net += deposited - withdrawn
        statuses = [w.status for w in Withdrawal.objects.filter(pk__in=[w.pk for w in held])]
        return {
            "phase": phase,
            "deposits": len(users),
            "deposited": str(deposited),
            "redeliveries": redelivered,
            "credited_by_poll": polled,
            "parked": parked,
            "withdrawals": len(held),
            "refused_by_circle": sent.failed,
            "failed_on_chain": failed_on_chain,
            "completed": statuses.count("completed"),
            "withdrawn": str(withdrawn),
            "credits_once": BalanceMutation.objects.filter(
                reference__in=[f"circle:transfer:{t['id']}" for t in transfers]
            ).count()
            == len(transfers),
            "all_settled": set(statuses) <= {"completed", "failed"},
        }

    def _treasury(self) -> None:
        """Withdrawals drain the USDC buffer below its minimum; the settlement cycle converts
        fiat through the Due sandbox and the buffer is back at its target."""
        threshold = BufferThreshold.objects.get(currency="USDC")
        key, secret = secrets.token_hex(8), secrets.token_hex(16)  # this run's sandbox only
        names = ("CIRCLE_API_BASE_URL", "DUE_API_BASE_URL", "DUE_API_KEY", "DUE_API_SECRET")
        saved = {name: getattr(settings, name) for name in names}
        with (
            http_server() as base_url,
            CircleSandbox(subscriber=f"{base_url}/webhooks/circle/transfers") as circle,
            DueSandbox(api_key=key, api_secret=secret, settle="completed") as due,
        ):
            settings.CIRCLE_API_BASE_URL, settings.DUE_API_BASE_URL = circle.base_url, due.base_url
            settings.DUE_API_KEY, settings.DUE_API_SECRET = key, secret
            try:
                self.treasury = self._treasury_round(threshold, circle)
            finally:
                for name, value in saved.items():
                    setattr(settings, name, value)

    def _treasury_round(self, threshold, circle) -> dict:
        before = system_account(code="usdc_buffer").balance
        drained, held = Decimal(0), []
        richest = sorted(self.user_ids, key=lambda u: balance_get(user_id=u).amount, reverse=True)
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
        jobs_submit()
        monitor_run()
        after = system_account(code="usdc_buffer").balance
        return {
            "buffer_before": str(before),
            "withdrawn": str(drained),
            "buffer_low": str(low),
            "minimum": str(threshold.minimum),
            "jobs": [
                f"{job.source_amount} {job.source_currency} -> {job.target_currency}: {job.status}"
                for job in ConversionJob.objects.filter(pk__in=cycle.jobs_created)
            ],
            "buffer_after": str(after),
            "target": str(threshold.target),
            "restored": low < threshold.minimum and after == threshold.target,
        }

    def _rollback_drill(self) -> None:
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

    def _report(self) -> dict:
        totals = store_totals()
        expected = self.opening_total + self.total.credited - self.total.debited + self.onchain_net
        checks = [
            {
                "name": c.name,
                "ok": c.ok,
                "detail": "; ".join(c.problems[:3]) or f"{c.checked} checked",
            }
            for c in ledger_integrity_checks()
        ]
        checks += [
            {
                "name": "drift_caught",
                "ok": self.drift_found == 1,
                "detail": f"{self.drift_found} difference found for 1 injected",
            },
            {
                "name": "conservation",
                "ok": Decimal(totals["legacy_total"])
                == expected
                == Decimal(totals["ledger_total"]),
                "detail": f"legacy {totals['legacy_total']}, ledger {totals['ledger_total']}, "
                f"expected {expected}",
            },
            {
                "name": "rollback_rebuilt_legacy",
                "ok": self.rollback_differences == 0,
                "detail": f"{self.rollback_differences} users differ after the drill",
            },
            {
                "name": "onchain_exactly_once",
                "ok": all(o["credits_once"] and o["all_settled"] for o in self.onchain),
                "detail": "; ".join(
                    f"{o['phase']}: {o['deposits']} deposits credited once "
                    f"({o['redeliveries']} redeliveries, {o['credited_by_poll']} by the poll), "
                    f"{o['completed']}/{o['withdrawals']} withdrawals completed, "
                    f"{o['refused_by_circle']} refused, {o['failed_on_chain']} failed on chain"
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
                "name": "no_open_discrepancies",
                "ok": open_discrepancy_count() == 0,
                "detail": f"{open_discrepancy_count()} open",
            },
        ]
        return {
            "users": self.users,
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
            "onchain": self.onchain,
            "treasury": self.treasury,
            "invariants": checks,
            "ok": all(check["ok"] for check in checks),
        }

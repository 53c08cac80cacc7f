"""The rehearsal's drills beyond the balance path's traffic: on chain (withdrawals and deposits
through the Circle sandbox), the treasury round (through the Due sandbox) and the way back."""

import random
from decimal import Decimal

from django.conf import settings

from cutover.balance_path import balance_credit
from cutover.exceptions import (
    MutationConflict,
)
from cutover.models import BalanceMutation
from cutover.phase_machine import phase_rollback, phase_rollback_rehearse
from cutover.selectors import (
    balance_get,
    phase_state,
    store_differences,
)
from ledger.models import Transaction
from ledger.selectors import USDC_BUFFER, system_balance
from onchain.inbox import notification_replay
from onchain.models import CircleNotification, DepositAddress, Withdrawal
from onchain.polling import transfers_poll
from onchain.sandbox import CircleSandbox
from onchain.withdrawals import withdrawal_request, withdrawals_send
from rehearsal.scenario import ACTOR, CENT, CURRENCIES, user_totals
from treasury.cycle import settlement_cycle_run
from treasury.models import BufferThreshold, ConversionJob
from treasury.monitor import monitor_run
from treasury.sandbox import OUTCOMES
from treasury.submission import jobs_submit


class Drills:
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
        buffer_before = system_balance(code=USDC_BUFFER)
        # a third of the USDC users at most withdraw, so that others are left to deposit
        withdrawers = self._usdc_users_holding(
            rng, min(withdrawals, max(1, len(self.usdc_users) // 3)), Decimal(10)
        )
        depositors = [u for u in self.usdc_users if u not in withdrawers]
        depositors = rng.sample(depositors, min(deposits, len(depositors)))
        summary = self._onchain_withdrawals(phase, rng, withdrawers)
        summary.update(self._onchain_deposits(phase, rng, depositors))
        summary["phase"] = phase
        summary["buffer_change"] = str(system_balance(code=USDC_BUFFER) - buffer_before)
        self.onchain.append(summary)

    def _onchain_withdrawals(self, phase, rng, users) -> dict:
        sandbox = self.circle
        held = []
        for index, user in enumerate(users):
            amount = Decimal(rng.randint(100, 1000)) * CENT
            # (the first one to an address the sandbox's Circle refuses: 0xbad...)
            address = f"0xbad{0:037x}" if index == 0 else f"0x{rng.getrandbits(160):040x}"
            held.append(
                withdrawal_request(user_id=user, amount=amount, address=address, chain="ETH")
            )
        sent = withdrawals_send(limit=len(held) + 1, base_url=sandbox.base_url)
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
        polled = transfers_poll(base_url=sandbox.base_url).deposits_credited
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
                if c["status"] == OUTCOMES["completed"]
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
        before = system_balance(code=USDC_BUFFER)
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
                    user_id=user, amount=amount, address=f"0x{user.hex}{0:08x}", chain="ETH"
                )
            )
            drained += amount
        withdrawals_send(limit=len(held) + 1, base_url=circle.base_url)  # one pass sends them all
        for withdrawal in held:
            withdrawal.refresh_from_db()
            circle.transfer_finish(withdrawal.circle_transfer_id, "complete")
        self.onchain_net -= drained
        low = system_balance(code=USDC_BUFFER)
        cycle = settlement_cycle_run(triggered_by="rehearsal")
        due.lose_answers = 1  # the first creation is recorded, its answer never arrives
        due.on_created = lambda conversion: setattr(due, "unavailable", True)
        for _ in range(settings.TREASURY_SUBMIT_MAX_ATTEMPTS):
            jobs_submit(base_urls={"due": due.base_url})
        jobs = list(ConversionJob.objects.filter(pk__in=cycle.jobs_created).order_by("pk"))
        lost = jobs[0] if jobs else None
        before_monitor = lost.status if lost else ""
        due.unavailable, due.on_created = False, None
        monitor_run(base_urls={"due": due.base_url})
        paid: set = set()
        self._due_pays_out_usdc(paid)
        after = system_balance(code=USDC_BUFFER)
        for job in jobs:
            job.refresh_from_db()
        lost_answer = {}
        if lost is not None:
            key = str(lost.idempotency_key)
            with due.lock:
                at_due = [
                    t["id"]
                    for t in due.conversions.values()
                    if t["source"]["currency"] == lost.source_currency
                    and Decimal(t["source"]["amount"]) == lost.source_amount
                ]
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

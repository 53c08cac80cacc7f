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

import random
import secrets
import time
import uuid
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection
from django.utils import timezone

from custody.services import custody_open_from_providers, custody_reconcile_from_providers
from cutover.backfill import backfill_run
from cutover.exceptions import (
    GateNotMet,
)
from cutover.phase_machine import phase_advance, phase_rollback
from cutover.phases import Phase
from cutover.reconciliation import reconciliation_run
from cutover.selectors import (
    balance_get,
    phase_state,
)
from ledger.selectors import USDC_BUFFER, system_account, system_balance
from onchain.models import CircleNotification, Withdrawal
from onchain.sandbox import CircleSandbox
from onchain.withdrawals import withdrawal_request, withdrawals_send
from rehearsal.drills import Drills
from rehearsal.report import Report
from rehearsal.runtime import http_server
from rehearsal.scenario import (
    ACTOR,
    CENT,
    CURRENCIES,
    PRE_SHADOW_WITHDRAWAL,
    REHEARSAL_FIAT_CUSTODY,
    REHEARSAL_MIN_DURATION,
    REHEARSAL_SUBMIT_ATTEMPTS,
    USD_EVERY,
)
from rehearsal.traffic import Stage, Traffic, TrafficStages
from treasury.sandbox import DueSandbox


class Rehearsal(TrafficStages, Drills, Report):
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
        """The whole rollout against one Circle sandbox and one Due sandbox, whose base URLs the
        rehearsal passes to the services it calls; the settings hold the rehearsal's short
        gates and the sandboxes' credentials for the run only."""
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
            "DUE_RECIPIENTS": {"USD": "rcp_rehearsal_bank", "USDC": "wlt_rehearsal_wallet"},
        }
        token = f"?token={settings.CIRCLE_WEBHOOK_SECRET}" if settings.CIRCLE_WEBHOOK_SECRET else ""
        saved = {name: getattr(settings, name) for name in [*overrides, "CIRCLE_API_BASE_URL"]}
        try:
            with (
                http_server() as base_url,
                CircleSandbox(subscriber=f"{base_url}/webhooks/circle/transfers{token}") as circle,
                DueSandbox(api_key=key, api_secret=secret, settle="completed") as due,
            ):
                for name, value in overrides.items():
                    setattr(settings, name, value)
                # Circle's webhooks reach this project over HTTP, and the view fetches the
                # signing key from the settings' Circle: no caller of ours to pass it.
                settings.CIRCLE_API_BASE_URL = circle.base_url
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
            actor=ACTOR,
            reason="the rehearsal's custody, as Circle and Due report it",
            circle_base_url=self.circle.base_url,
            due_base_url=self.due.base_url,
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
            for c in custody_reconcile_from_providers(
                circle_base_url=self.circle.base_url, due_base_url=self.due.base_url
            )
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
            user_id=user, amount=amount, address=f"0x{user.hex}{0:08x}", chain="ETH"
        )
        withdrawals_send(limit=1, base_url=self.circle.base_url)
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
        buffer_before = system_balance(code=USDC_BUFFER)
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
            buffer_after=str(system_balance(code=USDC_BUFFER)),
            notifications_unsettled=unsettled,
        )

    # Gates ---------------------------------------------------------------------------------
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

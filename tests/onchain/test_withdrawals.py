"""Withdrawals against the Circle sandbox over real HTTP: the hold and the outbox row in one
transaction, the worker's sends (SKIP LOCKED, Idempotency-Key, backoff, dead state), completion
and reversal exactly once, a worker SIGKILLed after Circle accepted, and the polling fallback."""

import os
import signal
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.db import DatabaseError, connection, transaction

from cutover.actors import Actor
from cutover.exceptions import KillSwitchEngaged
from cutover.models import BalanceMutation
from cutover.operators import api_client_issue
from gateway.models import ApiClientSpend
from ledger.exceptions import InsufficientFunds
from onchain.models import CircleNotification, DepositAddress, Withdrawal
from onchain.polling import transfers_poll
from onchain.sandbox import CircleSandbox
from onchain.withdrawals import withdrawal_cancel, withdrawal_resend, withdrawals_send
from tests.cutover.factories import database_url, ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import (
    DESTINATION,
    balances,
    buffer_fund,
    integrity_ok,
    outbound,
    post_withdrawal,
    system,
    withdraw,
    withdrawal_transfer,
)

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent
PHASES = ["legacy", "shadow", "read_switch", "strict", "cutover"]


@pytest.mark.parametrize("phase", PHASES)
def test_withdrawal_holds_sends_and_completes_once(sandbox, user, phase):
    phase_set(phase, read_percent=100)
    withdrawal = withdraw(user)
    legacy, ledger = balances(user)
    assert legacy == (Decimal(100) if phase == "cutover" else Decimal(70))
    assert ledger == (Decimal(100) if phase == "legacy" else Decimal(70))
    assert system("withdrawals_pending_usdc") == (0 if phase == "legacy" else Decimal(30))
    assert withdrawal.hold_in_ledger is (phase != "legacy")

    assert withdrawals_send().submitted == 1
    withdrawal.refresh_from_db()
    assert withdrawal.status == "submitted" and withdrawal.attempts == 1
    [transfer] = outbound(sandbox)
    assert sandbox.by_key[str(withdrawal.idempotency_key)][0] == transfer["id"]
    assert transfer["destination"]["address"] == DESTINATION

    sandbox.transfer_finish(transfer["id"], "complete")  # the webhook, signed, over HTTP
    withdrawal.refresh_from_db()
    assert withdrawal.status == "completed"
    assert system("withdrawals_pending_usdc") == 0
    assert system("usdc_buffer") == (Decimal(1000) if phase == "legacy" else Decimal(970))
    # Circle redelivers; the poll looks too: nothing moves again.
    notification = CircleNotification.objects.get(transfer_id=transfer["id"])
    sandbox.deliver(sandbox.subscriber, notification.body.encode())
    transfers_poll()
    assert system("usdc_buffer") == (Decimal(1000) if phase == "legacy" else Decimal(970))
    assert balances(user) == (legacy, ledger)
    assert integrity_ok()


@pytest.mark.parametrize("phase", ["legacy", "shadow", "strict", "cutover"])
def test_failed_transfer_reverses_the_hold_exactly_once(sandbox, user, phase):
    phase_set(phase, read_percent=100)
    withdrawal = withdraw(user)
    withdrawals_send()
    [transfer] = outbound(sandbox)
    sandbox.transfer_finish(transfer["id"], "failed")
    body = CircleNotification.objects.get(transfer_id=transfer["id"]).body.encode()
    sandbox.deliver(sandbox.subscriber, body)  # redelivered
    other = CircleSandbox.notification("transfers.failed", sandbox.transfers[transfer["id"]])
    sandbox.deliver(sandbox.subscriber, other)  # the same event under another notification id
    transfers_poll()
    withdrawal.refresh_from_db()
    assert withdrawal.status == "failed"
    assert BalanceMutation.objects.filter(reference=withdrawal.reversal_reference).count() == 1
    legacy, ledger = balances(user)
    assert legacy == 100 and ledger == 100
    assert system("withdrawals_pending_usdc") == 0
    assert system("usdc_buffer") == 1000
    assert integrity_ok()


def test_a_hold_placed_in_legacy_and_reversed_in_shadow_leaves_pending_untouched(sandbox, user):
    phase_set("legacy")
    withdrawal = withdraw(user)
    withdrawals_send()
    phase_set("shadow")
    sandbox.transfer_finish(withdrawal_transfer(withdrawal), "failed")
    assert balances(user) == (Decimal(100), Decimal(130))  # the ledger never saw the hold
    assert system("withdrawals_pending_usdc") == 0  # reversed against opening balance equity
    assert integrity_ok()


def test_circle_refusal_is_final_and_reverses(sandbox, user):
    phase_set("shadow")
    withdrawal = withdraw(user, address="0xbad" + "0" * 37)  # the sandbox refuses 0xbad...
    report = withdrawals_send()
    assert report.failed == 1 and sandbox.create_calls == 1
    withdrawal.refresh_from_db()
    assert withdrawal.status == "failed" and "destination.address: " in withdrawal.last_error
    assert balances(user) == (Decimal(100), Decimal(100))
    assert withdrawals_send().submitted == 0 and sandbox.create_calls == 1  # never resent


def test_server_errors_back_off_exponentially_then_dead_then_resent(sandbox, user, settings):
    phase_set("shadow")
    settings.ONCHAIN_WITHDRAWAL_MAX_ATTEMPTS = 3
    settings.ONCHAIN_WITHDRAWAL_BACKOFF = timedelta(minutes=1)
    settings.ONCHAIN_WITHDRAWAL_BACKOFF_MAX = timedelta(minutes=90)
    withdrawal = withdraw(user)
    sandbox.fail_next = [503, 500, 429]
    assert withdrawals_send().retried == 1
    withdrawal.refresh_from_db()
    first_delay = withdrawal.next_attempt_at - withdrawal.updated_at
    assert timedelta(seconds=59) < first_delay < timedelta(seconds=61)
    assert withdrawals_send().retried == 0 and sandbox.create_calls == 1  # not yet due
    Withdrawal.objects.filter(pk=withdrawal.pk).update(next_attempt_at=withdrawal.updated_at)
    withdrawals_send()
    withdrawal.refresh_from_db()
    assert withdrawal.attempts == 2
    assert timedelta(seconds=119) < withdrawal.next_attempt_at - withdrawal.updated_at
    Withdrawal.objects.filter(pk=withdrawal.pk).update(next_attempt_at=withdrawal.updated_at)
    assert withdrawals_send().dead == 1
    withdrawal.refresh_from_db()
    assert (withdrawal.status, withdrawal.attempts, sandbox.create_calls) == ("dead", 3, 3)
    assert balances(user) == (Decimal(70), Decimal(70))  # still held: an operator decides

    withdrawal_resend(withdrawal_id=withdrawal.pk, actor=Actor.command_line())
    assert withdrawals_send().submitted == 1
    withdrawal.refresh_from_db()
    assert withdrawal.status == "submitted" and len(outbound(sandbox)) == 1


def test_operator_cancels_a_dead_withdrawal_and_the_hold_returns(sandbox, user, settings):
    phase_set("shadow")
    settings.ONCHAIN_WITHDRAWAL_MAX_ATTEMPTS = 1
    withdrawal = withdraw(user)
    sandbox.fail_next = [503]
    assert withdrawals_send().dead == 1
    withdrawal_cancel(
        withdrawal_id=withdrawal.pk, actor=Actor.command_line(), reason="confirmed absent at Circle"
    )
    withdrawal.refresh_from_db()
    assert withdrawal.status == "failed"
    assert balances(user) == (Decimal(100), Decimal(100))
    assert system("withdrawals_pending_usdc") == 0


def test_a_timed_out_send_is_resent_with_the_same_key_and_makes_one_transfer(sandbox, user):
    phase_set("shadow")
    withdrawal = withdraw(user)
    sandbox.delay = 3.0  # longer than CIRCLE_HTTP_TIMEOUT: Circle accepts, we never hear it
    assert withdrawals_send().retried == 1
    sandbox.delay = 0.0
    assert withdrawals_send().submitted == 1
    assert len(outbound(sandbox)) == 1 and sandbox.create_calls == 2
    withdrawal.refresh_from_db()
    assert withdrawal.circle_transfer_id == outbound(sandbox)[0]["id"]


def test_worker_killed_after_circle_accepted_resends_one_transfer(sandbox, user):
    """SIGKILL between Circle's acceptance and our commit; Circle's completion arrives while
    we know nothing of the transfer (parked); the restarted worker resends with the same key,
    records it, completes it, and replays what was parked."""
    phase_set("shadow")
    withdrawal = withdraw(user)
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "CIRCLE_API_BASE_URL": sandbox.base_url,
        "CIRCLE_API_KEY": "sandbox-key",
    }
    child = subprocess.Popen(
        [sys.executable, "manage.py", "onchain", "send"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sandbox.on_created = lambda transfer: os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    sandbox.on_created = None
    withdrawal.refresh_from_db()
    assert (withdrawal.status, withdrawal.attempts, withdrawal.circle_transfer_id) == (
        "pending",
        0,
        None,
    )
    [transfer] = outbound(sandbox)
    sandbox.transfer_finish(transfer["id"], "complete")
    assert CircleNotification.objects.get(transfer_id=transfer["id"]).status == "parked"

    assert withdrawals_send().submitted == 1
    withdrawal.refresh_from_db()
    assert withdrawal.status == "completed" and withdrawal.circle_transfer_id == transfer["id"]
    assert len(outbound(sandbox)) == 1
    assert CircleNotification.objects.get(transfer_id=transfer["id"]).status == "processed"
    assert system("usdc_buffer") == 970 and system("withdrawals_pending_usdc") == 0
    assert integrity_ok()


def test_concurrent_workers_send_each_withdrawal_once(sandbox, settings):
    phase_set("shadow")
    buffer_fund("1000")
    users = []
    for _ in range(12):
        user_id = legacy_user("50")
        ledger_balance_set(user_id, "50")
        users.append(user_id)
        withdraw(user_id, amount="10")
        withdraw(user_id, amount="15")
    sandbox.delay = 0.05

    def worker(_):
        try:
            return withdrawals_send().submitted
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        submitted = sum(pool.map(worker, range(4)))
    assert submitted == 24 == sandbox.create_calls == len(outbound(sandbox))
    assert set(Withdrawal.objects.values_list("status", flat=True)) == {"submitted"}


def test_the_same_withdrawal_requested_concurrently_holds_once(user):
    phase_set("shadow")
    key = uuid.uuid4()
    barrier = threading.Barrier(4)

    def request(_):
        barrier.wait()
        try:
            return withdraw(user, idempotency_key=key).pk
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = set(pool.map(request, range(4)))
    assert len(ids) == 1 and Withdrawal.objects.count() == 1
    assert balances(user) == (Decimal(70), Decimal(70))


def test_insufficient_funds_and_kill_switch_write_nothing(sandbox, user):
    phase_set("shadow")
    with pytest.raises(InsufficientFunds):
        withdraw(user, amount="100.01")
    phase_set("shadow", kill_switch=True)
    with pytest.raises(KillSwitchEngaged):
        withdraw(user)
    assert not Withdrawal.objects.exists() and not BalanceMutation.objects.exists()
    phase_set("shadow")
    withdraw(user)
    phase_set("shadow", kill_switch=True)
    assert withdrawals_send().submitted == 0 and sandbox.create_calls == 0  # nothing goes out


def test_the_database_refuses_illegal_transitions_and_deletes(sandbox, user):
    phase_set("shadow")
    withdrawal = withdraw(user)
    withdrawals_send()
    sandbox.transfer_finish(withdrawal_transfer(withdrawal), "complete")
    for change in (
        "UPDATE onchain_withdrawals SET status = 'pending'",
        "UPDATE onchain_withdrawals SET status = 'failed'",
        "UPDATE onchain_withdrawals SET amount = 1",
        "DELETE FROM onchain_withdrawals",
    ):
        with (
            pytest.raises(DatabaseError, match="withdrawal"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(change)
    assert Withdrawal.objects.get().status == "completed"


def test_polling_credits_a_deposit_whose_webhook_never_came_and_the_late_webhook_does_not(
    sandbox, user
):
    phase_set("shadow")
    DepositAddress.objects.create(address="0xdeposit", chain="ETH", user_id=user)
    transfer = sandbox.deposit(address="0xdeposit", amount="12.5", notify=False)
    sandbox.deposit(address="0xnobody", amount="3", notify=False)
    report = transfers_poll()
    assert (report.deposits_credited, report.deposits_parked) == (1, 1)
    assert balances(user) == (Decimal("112.5"), Decimal("112.5"))
    late = CircleSandbox.notification("transfers.completed", transfer)
    assert sandbox.deliver(sandbox.subscriber, late)[0] == 200
    assert transfers_poll().deposits_credited == 0
    assert balances(user) == (Decimal("112.5"), Decimal("112.5"))
    assert (
        BalanceMutation.objects.filter(reference=f"circle:transfer:{transfer['id']}").count() == 1
    )


def test_polling_settles_a_submitted_withdrawal_whose_webhook_never_came(sandbox, user):
    phase_set("shadow")
    withdrawal = withdraw(user)
    withdrawals_send()
    sandbox.transfer_finish(withdrawal_transfer(withdrawal), "complete", notify=False)
    assert transfers_poll().withdrawals_settled == 1
    withdrawal.refresh_from_db()
    assert withdrawal.status == "completed" and system("usdc_buffer") == 970


CHECKSUMMED = "0x8381470ED67C3802402dbbFa0058E8871F017A6F"  # a valid EIP-55 spelling


def test_withdrawal_api_holds_once_per_key_and_names_bad_fields(client, user, api_token):
    phase_set("shadow")
    body = {"amount": "25.5", "address": DESTINATION, "chain": "ETH"}
    status, first = post_withdrawal(client, user, api_token, body)
    assert status == 201 and first["status"] == "pending" and first["amount"] == "25.5"
    assert post_withdrawal(client, user, api_token, body) == (201, first)  # replay
    assert Withdrawal.objects.count() == 1
    assert balances(user) == (Decimal("74.5"), Decimal("74.5"))
    nested = "deep"
    for _ in range(20):  # past the API's 16 levels
        nested = [nested]
    for bad, field in [
        ({**body, "amount": 25.5}, "amount"),
        ({**body, "amount": "1.0000001"}, "amount"),
        ({**body, "chain": "DOGE"}, "chain"),
        ({**body, "address": " "}, "address"),
        ({**body, "address": "0xde\x00st"}, "address"),  # PostgreSQL refuses NUL: once a 500
        ({**body, "address": "0x\ud800"}, "address"),
        ({**body, "chain": ["ETH"]}, "chain"),
        ({**body, "memo": nested}, "memo"),
        # An address Circle would send to, checked as a deposit address is (found from outside:
        # each of these was held and queued for Circle): a typo sends money away for good.
        ({**body, "address": "hello world"}, "address"),
        ({**body, "address": "0x12"}, "address"),
        ({**body, "address": "0x" + "g" * 40}, "address"),
        ({**body, "address": "\u202e0x" + "a" * 40}, "address"),
        ({**body, "address": "\uff58" * 42}, "address"),
        ({**body, "address": "0x" + "A" * 20 + "a" * 20}, "address"),  # not its EIP-55 case
        ({**body, "address": CHECKSUMMED.replace("ED67", "Ed67")}, "address"),
    ]:
        status, answer = post_withdrawal(client, user, api_token, bad, key=f"k-{field}-{bad}")
        assert status == 400 and answer["error"]["field"] == field
    status, answer = post_withdrawal(client, user, api_token, {**body, "amount": "500"}, "w-2")
    assert status == 422 and answer["error"]["code"] == "insufficient_funds"
    status, answer = post_withdrawal(client, user, api_token, {**body, "amount": "1"})
    assert status == 422 and answer["error"]["field"] == "Idempotency-Key"
    assert Withdrawal.objects.count() == 1
    assert not ApiClientSpend.objects.exclude(amount=Decimal("25.5")).exists()
    assert balances(user) == (Decimal("74.5"), Decimal("74.5"))
    status, answer = post_withdrawal(
        client, user, api_token, {**body, "address": CHECKSUMMED}, "w-3"
    )
    assert status == 201 and answer["address"] == CHECKSUMMED  # as given, EIP-55 case kept


def test_a_users_own_client_needs_the_withdraw_scope(client, user):
    """Issue 9 item 6: a client scoped to one user withdraws only with `withdraw`, and within
    its limits (debits and withdrawals share the money-out direction)."""
    phase_set("shadow")
    actor = Actor("test")
    _, reader = api_client_issue(name="reader", user_id=user, scopes=["read"], actor=actor)
    body = {"amount": "25.5", "address": DESTINATION, "chain": "ETH"}
    status, answer = post_withdrawal(client, user, reader, body)
    assert status == 403 and answer["error"]["scope"] == "withdraw"
    _, wallet = api_client_issue(
        name="wallet",
        user_id=user,
        scopes=["read", "withdraw"],
        daily_limit=Decimal("30"),
        actor=actor,
    )
    assert post_withdrawal(client, user, wallet, body)[0] == 201
    status, answer = post_withdrawal(client, user, wallet, {**body, "amount": "5"}, key="w-2")
    assert status == 429 and answer["error"]["limit"] == "daily_limit"
    assert Withdrawal.objects.count() == 1
    assert balances(user) == (Decimal("74.5"), Decimal("74.5"))


def test_failure_webhook_before_the_send_returns_and_again_after_reverses_once(sandbox, user):
    """Circle notifies the failure while our POST is still waiting for its answer (we do not
    know the transfer id yet: parked), then redelivers it: one reversal."""
    phase_set("shadow")
    withdrawal = withdraw(user)
    sandbox.on_created = lambda transfer: sandbox.transfer_finish(transfer["id"], "failed")
    assert withdrawals_send().submitted == 1
    withdrawal.refresh_from_db()
    assert withdrawal.status == "failed"
    notification = CircleNotification.objects.get(transfer_id=withdrawal.circle_transfer_id)
    assert notification.status == "processed" and notification.attempts == 2  # parked, replayed
    sandbox.deliver(sandbox.subscriber, notification.body.encode())
    assert BalanceMutation.objects.filter(reference=withdrawal.reversal_reference).count() == 1
    assert balances(user) == (Decimal(100), Decimal(100))
    assert system("withdrawals_pending_usdc") == 0


def test_completion_waits_while_the_ledger_buffer_is_short_then_settles(sandbox, settings):
    """Circle sent the money but the ledger's USDC buffer cannot cover it (the treasury has not
    topped it up): the notification is kept failed (503, Circle redelivers), nothing is half
    done; once the buffer is funded the redelivery completes the withdrawal once."""
    phase_set("shadow")
    user = legacy_user("100")
    ledger_balance_set(user, "100")
    buffer_fund("10")
    withdrawal = withdraw(user, amount="30")
    withdrawals_send()
    transfer_id = withdrawal_transfer(withdrawal)
    status, answer = sandbox.deliver(
        sandbox.subscriber,
        CircleSandbox.notification(
            "transfers.completed", sandbox.transfer_finish(transfer_id, "complete", notify=False)
        ),
    )
    assert status == 503 and answer["error"]["code"] == "not_applied"
    notification = CircleNotification.objects.get(transfer_id=transfer_id)
    assert notification.status == "failed" and "would go negative" in notification.error
    withdrawal.refresh_from_db()
    assert withdrawal.status == "submitted" and system("usdc_buffer") == 10
    buffer_fund("100")
    assert sandbox.deliver(sandbox.subscriber, notification.body.encode())[0] == 200
    withdrawal.refresh_from_db()
    assert withdrawal.status == "completed" and system("usdc_buffer") == 80
    assert integrity_ok()

"""Issue 9's on-chain money paths, against the Circle sandbox over real HTTP: a dead withdrawal
whose transfer Circle did create is never cancelled (item 7); operators' cancel, resend and
replay from the command line, audited (items 14, 17); strict failures of holds, deposits and
reversals recorded (item 9); illegal withdrawal changes as domain errors (item 13); the kill
switch (item 15); custody: Circle's wallet balance, withdrawals of money booked before shadow,
holds and completions across a rollback (items 2, 3)."""

import json
import re
import uuid
from decimal import Decimal
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.custody import custody_open
from cutover.exceptions import KillSwitchEngaged, StrictLedgerFailure
from cutover.models import BalanceMutation, LegacyBalance, OperatorAudit, StrictFailure
from ledger.models import Account, Entry
from ledger.services import Leg, transaction_post
from onchain import circle
from onchain.deposits import deposit_plain
from onchain.exceptions import (
    CancelRefused,
    CircleUnavailable,
    WithdrawalRefused,
    WithdrawalTransitionRefused,
    onchain_rules,
)
from onchain.models import CircleNotification, DepositAddress, Withdrawal
from onchain.polling import transfers_poll
from onchain.sandbox import CircleSandbox
from onchain.withdrawals import withdrawal_cancel, withdrawal_resend, withdrawals_send
from tests.cutover.factories import OPERATOR, ledger_balance_set, legacy_user, phase_set
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
from tests.scans import sequential_scans, sequential_scans_since

pytestmark = pytest.mark.django_db(transaction=True)


def dead_withdrawal(sandbox, settings, user_id, *, created: bool, **kwargs) -> Withdrawal:
    """A withdrawal whose only send timed out: after Circle created the transfer (`created`,
    the answer held past our timeout) or before (a 503)."""
    settings.ONCHAIN_WITHDRAWAL_MAX_ATTEMPTS = 1
    withdrawal = withdraw(user_id, **kwargs)
    if created:
        sandbox.answer_delay = 3.0  # longer than CIRCLE_HTTP_TIMEOUT
    else:
        sandbox.fail_next = [503]
    assert withdrawals_send().dead == 1
    sandbox.answer_delay = 0.0
    withdrawal.refresh_from_db()
    return withdrawal


def cancel(withdrawal: Withdrawal, reason: str = "the runbook's dead withdrawal") -> Withdrawal:
    return withdrawal_cancel(withdrawal_id=withdrawal.pk, actor=Actor.command_line(), reason=reason)


# Item 7: cancel asks Circle first -----------------------------------------------------------


@pytest.mark.parametrize(
    ("at_circle", "final"),
    [("complete", "completed"), ("pending", "submitted"), ("failed", "failed")],
)
def test_cancel_of_a_withdrawal_circle_created_is_refused_and_it_follows_circle(
    sandbox, user, settings, at_circle, final
):
    phase_set("shadow")
    withdrawal = dead_withdrawal(sandbox, settings, user, created=True)
    assert withdrawal.circle_transfer_id is None
    [transfer] = outbound(sandbox)
    if at_circle != "pending":  # on chain; our webhook cannot place it yet: parked
        sandbox.transfer_finish(transfer["id"], at_circle)
        assert CircleNotification.objects.get(transfer_id=transfer["id"]).status == "parked"

    with pytest.raises(CancelRefused, match=f"Circle has its transfer {transfer['id']}"):
        cancel(withdrawal)

    withdrawal.refresh_from_db()
    assert (withdrawal.status, withdrawal.circle_transfer_id) == (final, transfer["id"])
    if at_circle == "pending":  # it completes later, as any submitted withdrawal
        sandbox.transfer_finish(transfer["id"], "complete")
        withdrawal.refresh_from_db()
        assert withdrawal.status == "completed"
    paid = at_circle != "failed"
    reversals = BalanceMutation.objects.filter(reference=withdrawal.reversal_reference).count()
    assert reversals == (0 if paid else 1)
    assert balances(user) == ((Decimal(70),) * 2 if paid else (Decimal(100),) * 2)
    assert system("withdrawals_pending_usdc") == 0
    assert system("usdc_buffer") == (Decimal(970) if paid else Decimal(1000))
    assert set(CircleNotification.objects.values_list("status", flat=True)) <= {"processed"}
    audit = OperatorAudit.objects.get(target=f"withdrawal:{withdrawal.pk}")
    assert (audit.action, audit.before["status"]) == ("withdrawal.cancel", "dead")
    assert audit.after["circle_transfer_id"] == transfer["id"]
    assert audit.after["outcome"] == "refused: Circle has the transfer"
    transfers_poll()  # and nothing moves again
    assert system("usdc_buffer") == (Decimal(970) if paid else Decimal(1000))
    assert len(outbound(sandbox)) == 1 and integrity_ok()


def test_cancel_changes_nothing_while_circle_cannot_be_reached(sandbox, user, settings):
    phase_set("shadow")
    withdrawal = dead_withdrawal(sandbox, settings, user, created=False)
    settings.CIRCLE_API_BASE_URL = "http://127.0.0.1:9"  # nothing listens there
    with pytest.raises(CircleUnavailable):
        cancel(withdrawal)
    withdrawal.refresh_from_db()
    assert withdrawal.status == "dead" and not OperatorAudit.objects.exists()
    assert balances(user) == (Decimal(70), Decimal(70))
    assert system("withdrawals_pending_usdc") == 30


def test_cancel_of_a_withdrawal_circle_never_created_reverses_once(sandbox, user, settings):
    phase_set("shadow")
    other = withdraw(user, amount="30")  # the same destination and amount, sent and recorded
    withdrawals_send()
    withdrawal = dead_withdrawal(sandbox, settings, user, created=False)
    assert len(outbound(sandbox)) == 1  # only the other's transfer exists at Circle
    assert cancel(withdrawal).status == "failed"
    with pytest.raises(WithdrawalRefused, match="not dead"):
        cancel(withdrawal)
    assert BalanceMutation.objects.filter(reference=withdrawal.reversal_reference).count() == 1
    assert balances(user) == (Decimal(70), Decimal(70))  # only the other one stays held
    assert withdrawal_transfer(other) == outbound(sandbox)[0]["id"]


@pytest.mark.parametrize("second_created", [True, False])
def test_two_dead_withdrawals_circle_may_have_are_not_cancelled_and_a_resend_settles_them(
    sandbox, user, settings, second_created
):
    """Two dead withdrawals to the same destination for the same amount, the first one's
    transfer made by Circle (its answer lost), the second's too or not: which transfer is whose
    is unknown, so neither is cancelled; a resend (the same idempotency keys) makes Circle name
    each one's own transfer."""
    phase_set("shadow")
    first = dead_withdrawal(sandbox, settings, user, created=True)
    second = dead_withdrawal(sandbox, settings, user, created=second_created)
    for withdrawal in (first, second):
        with pytest.raises(CancelRefused, match="may be this withdrawal's or another's"):
            cancel(withdrawal)
    assert set(Withdrawal.objects.values_list("status", flat=True)) == {"dead"}
    assert not OperatorAudit.objects.exists()
    for withdrawal in (first, second):
        withdrawal_resend(withdrawal_id=withdrawal.pk, actor=Actor.command_line())
    assert withdrawals_send().submitted == 2 and len(outbound(sandbox)) == 2
    assert {withdrawal_transfer(first), withdrawal_transfer(second)} == {
        t["id"] for t in outbound(sandbox)
    }
    assert balances(user) == (Decimal(40), Decimal(40))


# Items 14 and 17: the operator's commands, audited --------------------------------------------


def test_cancel_command_reverses_a_dead_withdrawal_once_and_audits_it(sandbox, user, settings):
    phase_set("shadow")
    withdrawal = dead_withdrawal(sandbox, settings, user, created=False)
    out = StringIO()
    call_command(
        "onchain", "cancel", str(withdrawal.pk), "--reason", "no transfer at Circle", stdout=out
    )
    withdrawal.refresh_from_db()
    assert withdrawal.status == "failed"
    assert withdrawal.last_error.startswith(f"cancelled by {OPERATOR}")
    assert out.getvalue() == (
        f"withdrawal {withdrawal.pk}: 30.000000 USDC of user {user} to ETH:{DESTINATION}, failed "
        f"({withdrawal.last_error})\n"
    )
    assert balances(user) == (Decimal(100), Decimal(100))
    assert system("withdrawals_pending_usdc") == 0
    audit = OperatorAudit.objects.get()
    assert audit.actor == OPERATOR and audit.action == "withdrawal.cancel"
    assert audit.target == f"withdrawal:{withdrawal.pk}"
    assert (audit.before["status"], audit.after["status"]) == ("dead", "failed")
    assert audit.after["outcome"] == "cancelled" and audit.reason == "no transfer at Circle"
    with pytest.raises(CommandError, match="not dead"):
        call_command("onchain", "cancel", str(withdrawal.pk), "--reason", "again")
    with pytest.raises(CommandError, match="withdrawal: no withdrawal 999999"):
        call_command("onchain", "cancel", "999999", "--reason", "none")
    assert BalanceMutation.objects.filter(reference=withdrawal.reversal_reference).count() == 1
    assert OperatorAudit.objects.count() == 1


def test_resend_and_replay_commands_are_audited(sandbox, user, settings):
    phase_set("shadow")
    withdrawal = dead_withdrawal(sandbox, settings, user, created=False)
    out = StringIO()
    call_command(
        "onchain", "resend", str(withdrawal.pk), "--reason", "Circle is back", "--json", stdout=out
    )
    resent = json.loads(out.getvalue())
    assert (resent["id"], resent["status"], resent["attempts"]) == (withdrawal.pk, "pending", 0)
    assert resent["idempotency_key"] == str(withdrawal.idempotency_key)  # the same transfer
    assert Decimal(resent["amount"]) == Decimal(30)
    audit = OperatorAudit.objects.get(action="withdrawal.resend")
    assert audit.actor == OPERATOR and audit.reason == "Circle is back"
    assert (audit.before["status"], audit.after["status"]) == ("dead", "pending")
    assert (audit.before["attempts"], audit.after["attempts"]) == (1, 0)

    transfer = sandbox.deposit(address="0xlate", amount="5")  # to an unknown address
    parked = CircleNotification.objects.get(transfer_id=transfer["id"])
    assert parked.status == "parked"
    out = StringIO()
    call_command("onchain", "replay", parked.notification_id, "--json", stdout=out)
    still = json.loads(out.getvalue())  # nobody's address yet: parked again
    assert (still["notification_id"], still["status"]) == (parked.notification_id, "parked")
    DepositAddress.objects.create(address="0xlate", chain="ETH", user_id=user)
    out = StringIO()
    call_command(
        "onchain",
        "replay",
        parked.notification_id,
        "--reason",
        "address registered",
        "--json",
        stdout=out,
    )
    replayed = json.loads(out.getvalue())
    assert (replayed["status"], replayed["error"]) == ("processed", "")
    audit = OperatorAudit.objects.get(action="notification.replay", reason="address registered")
    assert audit.target == f"notification:{parked.notification_id}"
    assert (audit.before, audit.after) == ({"status": "parked"}, {"status": "processed"})
    assert audit.actor == OPERATOR
    assert balances(user) == (Decimal(75), Decimal(75))  # 30 still held, 5 deposited


def test_withdraw_command_holds_the_money_as_the_operator_s_request(user):
    phase_set("shadow")
    given = {"--user": str(user), "--amount": "25.50", "--address": DESTINATION, "--chain": "ETH"}
    args = [part for pair in given.items() for part in pair]
    out = StringIO()
    call_command("onchain", "withdraw", *args, "--json", stdout=out)
    requested = json.loads(out.getvalue())
    withdrawal = Withdrawal.objects.get()
    assert (requested["id"], requested["status"], requested["chain"]) == (
        withdrawal.pk,
        "pending",
        "ETH",
    )
    assert Decimal(requested["amount"]) == withdrawal.amount == Decimal("25.5")
    assert requested["requested_by"] == withdrawal.requested_by == OPERATOR
    assert balances(user) == (Decimal("74.5"), Decimal("74.5"))  # held
    out = StringIO()
    call_command("onchain", "withdraw", *args, stdout=out)
    assert out.getvalue().startswith("withdrawal ") and "25.500000 USDC of user" in out.getvalue()

    refusals = [
        ("--amount", "1e3", "--amount: amount '1e3' must be a plain decimal"),
        ("--address", " ", "--address: address must be 1..128 characters"),
        ("--address", "0x12", "--address: a ETH address is 0x followed by 40 hexadecimal digits"),
        ("--chain", "MARS", "argument --chain: invalid choice: 'MARS'"),
        ("--user", "alice", "--user: not a UUID"),
    ]
    for flag, value, message in refusals:
        bad = [part for pair in {**given, flag: value}.items() for part in pair]
        with pytest.raises(CommandError, match=re.escape(message)):
            call_command("onchain", "withdraw", *bad, stdout=StringIO())
    assert Withdrawal.objects.count() == 2


# Item 9: strict failures recorded -------------------------------------------------------------


def ledger_reference_take(reference: str) -> None:
    """Make the ledger refuse the balance path's posting for `reference` (another posting
    already holds it): a ledger-only failure, which strict mode turns into a failed request."""
    transaction_post(
        namespace="balance",
        reference_id=reference,
        kind="test_conflict",
        legs=[
            Leg.debit(Account.objects.get(code="usdc_buffer"), "1"),
            Leg.credit(Account.objects.get(code="opening_balance_equity_usdc"), "1"),
        ],
    )


def test_strict_failures_of_holds_deposits_and_reversals_are_recorded(sandbox, user):
    phase_set("strict", read_percent=100)
    short = legacy_user("100")
    ledger_balance_set(short, "10")  # the ledger refuses the debit the legacy store allows
    key = uuid.uuid4()
    with pytest.raises(StrictLedgerFailure):
        withdraw(short, idempotency_key=key)
    assert not Withdrawal.objects.exists()
    failure = StrictFailure.objects.get()
    assert (failure.reference, failure.user_id) == (f"circle:withdrawal:{key}:hold", short)
    assert failure.phase == "strict"

    DepositAddress.objects.create(address="0xdeposit", chain="ETH", user_id=user)
    transfer_id = str(uuid.uuid4())
    ledger_reference_take(f"circle:transfer:{transfer_id}")
    sandbox.deposit(address="0xdeposit", amount="5", transfer_id=transfer_id)  # the webhook: 503
    assert CircleNotification.objects.get(transfer_id=transfer_id).status == "failed"
    assert transfers_poll().deposits_not_applied == 1  # the poll finds it too, and goes on
    assert StrictFailure.objects.filter(reference=f"circle:transfer:{transfer_id}").count() == 2
    assert balances(user) == (Decimal(100), Decimal(100))

    withdrawal = withdraw(user)
    withdrawals_send()
    ledger_reference_take(withdrawal.reversal_reference)
    sandbox.transfer_finish(withdrawal_transfer(withdrawal), "failed")  # the reversal fails
    assert StrictFailure.objects.filter(reference=withdrawal.reversal_reference).count() == 1
    withdrawal.refresh_from_db()
    assert withdrawal.status == "submitted" and balances(user) == (Decimal(70), Decimal(70))


def test_a_strict_failure_in_the_one_statement_deposit_path_names_its_user_and_credits_nothing(
    sandbox, user
):
    """A plain deposit's notification takes the one-statement path
    (onchain_deposit_notification_accept); when its ledger credit fails in strict, the
    statement rolls back whole, the StrictFailure row names the user the SQL function found
    (passed back in the error's HINT), nothing is credited in either store, and Circle hears
    503 not_applied (README: a retry can help), the row kept failed with its traceback. The
    redelivery (the stored row, the general path) and a renotification under another id (the
    one-statement path again) fail alike, each recorded, each naming the user."""
    phase_set("strict", read_percent=100)
    bystander = legacy_user("100")
    ledger_balance_set(bystander, "100")
    DepositAddress.objects.create(address="0xdeposit", chain="ETH", user_id=user)
    DepositAddress.objects.create(address="0xbystander", chain="ETH", user_id=bystander)
    transfer_id = str(uuid.uuid4())
    reference = f"circle:transfer:{transfer_id}"
    ledger_reference_take(reference)
    entries_before = Entry.objects.filter(account__user_id=user).count()
    buffer_before = system("usdc_buffer")
    body = CircleSandbox.transfer_notification(
        transfer_id=transfer_id, address="0xdeposit", amount="5", wallet_id=sandbox.wallet_id
    )
    assert deposit_plain("custody.transfer", json.loads(body)) is not None  # the fast path

    renotified = CircleSandbox.notification("custody.transfer", json.loads(body)["notification"])
    for delivered, failures in ((body, 1), (body, 2), (renotified, 3)):
        status, answer = sandbox.deliver(sandbox.subscriber, delivered)
        assert (status, answer["error"]["code"]) == (503, "not_applied")
        recorded = StrictFailure.objects.filter(reference=reference)
        assert recorded.count() == failures
        assert set(recorded.values_list("user_id", "phase")) == {(user, "strict")}
        notification_id = json.loads(delivered)["notificationId"]
        stored = CircleNotification.objects.get(notification_id=notification_id)
        assert stored.status == "failed" and "StrictLedgerFailure" in stored.error
    assert StrictFailure.objects.count() == 3  # nothing else failed

    assert balances(user) == (Decimal(100), Decimal(100))
    assert balances(bystander) == (Decimal(100), Decimal(100))
    assert not BalanceMutation.objects.filter(reference=reference).exists()
    assert Entry.objects.filter(account__user_id=user).count() == entries_before
    assert system("usdc_buffer") == buffer_before
    assert integrity_ok()


# Item 13: the database's withdrawal rules as domain errors -------------------------------------


def test_an_illegal_withdrawal_change_is_a_domain_error(sandbox, user):
    phase_set("shadow")
    completed = withdraw(user)
    withdrawals_send()
    sandbox.transfer_finish(withdrawal_transfer(completed), "complete")
    pending = withdraw(user, amount="10")
    for withdrawal, change, message in [
        (completed, {"status": "pending"}, "completed -> pending is not a legal transition"),
        (pending, {"amount": Decimal(1)}, "what was held cannot change"),
    ]:
        with (
            pytest.raises(WithdrawalTransitionRefused, match=message),
            onchain_rules(),
            transaction.atomic(),
        ):
            Withdrawal.objects.filter(pk=withdrawal.pk).update(**change)
    with pytest.raises(WithdrawalTransitionRefused, match="never deleted"), onchain_rules():
        Withdrawal.objects.filter(pk=completed.pk).delete()
    completed.refresh_from_db()
    pending.refresh_from_db()
    assert (completed.status, pending.amount) == ("completed", Decimal(10))


# Item 15: the kill switch ---------------------------------------------------------------------


def test_kill_switch_refuses_new_withdrawals_over_http_with_503(client, user, api_token):
    phase_set("shadow", kill_switch=True)
    body = {"amount": "25", "address": DESTINATION, "chain": "ETH"}
    status, answer = post_withdrawal(client, user, api_token, body)
    assert status == 503 and answer["error"]["code"] == "unavailable"
    assert "kill switch" in answer["error"]["message"]
    assert not Withdrawal.objects.exists() and not BalanceMutation.objects.exists()
    phase_set("shadow")
    assert post_withdrawal(client, user, api_token, body)[0] == 201  # the same key, released


def test_kill_switch_holds_sends_resends_and_cancels(sandbox, user, settings):
    phase_set("shadow")
    dead = dead_withdrawal(sandbox, settings, user, created=False)
    pending = withdraw(user, amount="10")
    calls = sandbox.create_calls
    phase_set("shadow", kill_switch=True)
    assert withdrawals_send().submitted == 0
    with pytest.raises(KillSwitchEngaged):
        withdrawal_resend(withdrawal_id=dead.pk, actor=Actor.command_line())
    with pytest.raises(KillSwitchEngaged):
        cancel(dead)
    assert sandbox.create_calls == calls and not OperatorAudit.objects.exists()
    assert Withdrawal.objects.get(pk=dead.pk).status == "dead"
    assert Withdrawal.objects.get(pk=pending.pk).status == "pending"
    assert balances(user) == (Decimal(60), Decimal(60))
    phase_set("shadow")
    assert cancel(dead).status == "failed" and withdrawals_send().submitted == 1


def test_kill_switch_still_records_deposits_and_posts_completions(sandbox, user):
    phase_set("shadow")
    withdrawal = withdraw(user)
    withdrawals_send()
    DepositAddress.objects.create(address="0xdeposit", chain="ETH", user_id=user)
    phase_set("shadow", kill_switch=True)
    transfer = sandbox.deposit(address="0xdeposit", amount="5", notify=False)
    status, answer = sandbox.deliver(
        sandbox.subscriber, CircleSandbox.notification("transfers.completed", transfer)
    )
    assert status == 503 and answer["error"]["code"] == "not_applied"
    stored = CircleNotification.objects.get(transfer_id=transfer["id"])
    assert stored.status == "failed" and "kill switch" in stored.error
    sandbox.transfer_finish(withdrawal_transfer(withdrawal), "complete")  # money that left
    withdrawal.refresh_from_db()
    assert withdrawal.status == "completed"
    assert system("withdrawals_pending_usdc") == 0 and system("usdc_buffer") == 970
    assert balances(user) == (Decimal(70), Decimal(70))
    phase_set("shadow")
    assert sandbox.deliver(sandbox.subscriber, stored.body.encode())[0] == 200  # redelivered
    assert balances(user) == (Decimal(75), Decimal(75))


# Items 2 and 3: custody -----------------------------------------------------------------------


def custody_open_usdc() -> Decimal:
    """Book the USDC buffer's opening balance from what Circle reports for our wallet."""
    reported = circle.wallet_balance(base_url=settings.CIRCLE_API_BASE_URL)
    custody_open(
        currency="USDC",
        reported=reported,
        source="circle",
        actor=Actor.command_line(),
        reason="custody opening from Circle's wallet balance",
    )
    return reported


def test_circle_reports_the_wallet_balance_as_money_comes_and_goes(sandbox, user):
    sandbox.wallet_balance = Decimal("1000")
    assert circle.wallet_balance(base_url=sandbox.base_url) == Decimal(1000)
    sandbox.deposit(address="0xnobody", amount="12.5", notify=False)
    assert circle.wallet_balance(base_url=sandbox.base_url) == Decimal("1012.5")
    phase_set("shadow")
    completed, failed = withdraw(user, amount="30"), withdraw(user, amount="20")
    withdrawals_send()
    sandbox.transfer_finish(withdrawal_transfer(failed), "failed")
    assert circle.wallet_balance(base_url=sandbox.base_url) == Decimal("1012.5")
    sandbox.transfer_finish(withdrawal_transfer(completed), "complete")
    sandbox.transfer_finish(withdrawal_transfer(completed), "complete")  # once
    assert circle.wallet_balance(base_url=sandbox.base_url) == Decimal("982.5")


@pytest.fixture
def legacy_users(sandbox):
    """Three legacy users with 100 USDC each, backed by 300 USDC in the Circle wallet;
    custody opened from Circle's report, then backfilled."""
    phase_set("legacy")
    users = [legacy_user("100") for _ in range(3)]
    sandbox.wallet_balance = Decimal(300)
    assert custody_open_usdc() == 300
    backfill_run()
    return users


def test_a_withdrawal_of_money_booked_before_shadow_completes(sandbox, legacy_users):
    phase_set("shadow")
    by_poll = withdraw(legacy_users[0], amount="30")
    by_webhook = withdraw(legacy_users[1], amount="45")
    withdrawals_send()
    sandbox.transfer_finish(withdrawal_transfer(by_poll), "complete", notify=False)
    report = transfers_poll()
    assert (report.withdrawals_settled, report.withdrawals_not_settled) == (1, 0)
    sandbox.transfer_finish(withdrawal_transfer(by_webhook), "complete")
    assert set(Withdrawal.objects.values_list("status", flat=True)) == {"completed"}
    assert set(CircleNotification.objects.values_list("status", flat=True)) == {"processed"}
    assert system("usdc_buffer") == 225 == circle.wallet_balance(base_url=sandbox.base_url)
    assert system("withdrawals_pending_usdc") == 0
    assert system("opening_balance_equity_usdc") == 0  # 300 opened, 300 backfilled to users
    assert integrity_ok()


def test_one_withdrawal_that_cannot_post_does_not_stop_the_poll(sandbox):
    phase_set("shadow")
    buffer_fund("30")  # short of the first withdrawal
    users = [legacy_user("100") for _ in range(2)]
    for user_id in users:
        ledger_balance_set(user_id, "100")
    first, second = withdraw(users[0], amount="40"), withdraw(users[1], amount="20")
    withdrawals_send()
    for withdrawal in (first, second):
        sandbox.transfer_finish(withdrawal_transfer(withdrawal), "complete", notify=False)
    report = transfers_poll()
    assert (report.withdrawals_settled, report.withdrawals_not_settled) == (1, 1)
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, second.status) == ("submitted", "completed")
    assert system("usdc_buffer") == 10


def test_a_hold_placed_in_shadow_and_reversed_after_a_rollback_leaves_no_pending(
    sandbox, legacy_users
):
    """Needs the legacy rule (custody open: a legacy mutation posts its counterparty side):
    the reversal in legacy takes the hold out of withdrawals_pending_usdc."""
    phase_set("shadow")
    withdrawal = withdraw(legacy_users[0], amount="30")
    withdrawals_send()
    assert system("withdrawals_pending_usdc") == 30
    phase_set("legacy")  # the rollback
    sandbox.transfer_finish(withdrawal_transfer(withdrawal), "failed")
    withdrawal.refresh_from_db()
    assert withdrawal.status == "failed"
    assert LegacyBalance.objects.get(user_id=legacy_users[0]).buying_power == 100
    assert system("withdrawals_pending_usdc") == 0
    assert system("usdc_buffer") == 300 == circle.wallet_balance(base_url=sandbox.base_url)
    assert integrity_ok()


def test_a_withdrawal_made_in_legacy_after_a_rollback_leaves_the_buffer_with_the_wallet(
    sandbox, legacy_users
):
    phase_set("shadow")
    phase_set("legacy")  # the rollback
    withdrawal = withdraw(legacy_users[0], amount="30")
    withdrawals_send()
    sandbox.transfer_finish(withdrawal_transfer(withdrawal), "complete")
    withdrawal.refresh_from_db()
    assert withdrawal.status == "completed"
    assert LegacyBalance.objects.get(user_id=legacy_users[0]).buying_power == 70
    assert system("usdc_buffer") == 270 == circle.wallet_balance(base_url=sandbox.base_url)
    assert system("withdrawals_pending_usdc") == 0
    assert integrity_ok()


def test_a_deposit_reads_by_index_however_small_the_tables_were_when_planned(user):
    """The deposit functions' plans are kept per connection until a table is analyzed again.
    Planned while the inbox and the journal were empty (a new deployment, analyzed), their
    look-ups became sequential scans, and every later notification read both whole tables.
    However small they were, they read by index."""
    phase_set("shadow")
    DepositAddress.objects.create(address="0xdeposit", chain="ETH", user_id=user)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE onchain_circle_notifications, cutover_balance_mutations")
    deliveries = [("n1", "t1"), ("n2", "t2"), ("n3", "t1"), ("n1", "t1")]  # a renotification,
    with transaction.atomic(), connection.cursor() as cursor:  # then a redelivery
        before = sequential_scans("onchain_circle_notifications", "cutover_balance_mutations")
        for notification_id, transfer_id in deliveries:
            cursor.execute(
                "SELECT inserted, outcome FROM onchain_deposit_notification_accept(%s, "
                "'transfers', %s, 'key', '{}', %s, 'ETH', '0xdeposit', ARRAY['ETH'], 'USDC', 5, "
                "'5.00', '5.00 USDC', 'usdc_buffer')",
                [notification_id, transfer_id, transfer_id],
            )
        sequential = sequential_scans_since(before)
    assert balances(user) == (Decimal("110"), Decimal("110"))
    assert CircleNotification.objects.count() == 3
    assert sequential == {"onchain_circle_notifications": 0, "cutover_balance_mutations": 0}

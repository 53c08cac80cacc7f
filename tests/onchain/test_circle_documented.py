"""Circle's notifications as Circle documents them (tests/onchain/fixtures/circle), through the
endpoint over real HTTP with their real v2 signatures: what credits, what is refused and kept,
and renotifications that neither storm nor credit twice. (Mint v1 through SNS:
test_circle_sns.py.)"""

import copy
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from cutover.actors import Actor
from cutover.exceptions import OperatorNotPermitted, TransitionRefused
from cutover.models import BalanceMutation, OperatorAudit
from ledger.selectors import system_balance
from onchain.chains import address_validate
from onchain.discrepancies import transfer_discrepancy_resolve
from onchain.exceptions import AddressInvalid
from onchain.models import CircleNotification, DepositAddress, TransferDiscrepancy
from onchain.sandbox import DEPOSIT_NOTIFICATIONS, USDC_TOKEN_ID, CircleSandbox, wallets_inbound
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import balances

pytestmark = pytest.mark.django_db(transaction=True)

FIXTURES = Path(__file__).parent / "fixtures" / "circle"
ADDRESS = "0x" + "ab" * 20
WALLET = "1000000001"  # CIRCLE_WALLET_ID's default, the sandbox's wallet


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def webhook(sandbox):
    return sandbox.subscriber


@pytest.fixture
def depositor():
    """A user in shadow (both stores written) with a registered ETH deposit address."""
    phase_set("shadow")
    user_id = legacy_user("0")
    ledger_balance_set(user_id, "0")
    DepositAddress.objects.create(address=ADDRESS, chain="ETH", user_id=user_id)
    return user_id


def mint_transfer(transfer_id="t-1", value="25.50", status="complete", changes=None) -> dict:
    """An inbound Circle Mint transfer into our wallet, as Circle documents the object."""
    transfer = {
        "id": transfer_id,
        "source": {"type": "blockchain", "chain": "ETH"},
        "destination": {"type": "wallet", "id": WALLET, "address": ADDRESS, "chain": "ETH"},
        "amount": {"amount": value, "currency": "USD"},
        "transactionHash": "0x" + "4c" * 32,
        "status": status,
        "createDate": "2026-01-15T18:23:44.000Z",
    }
    transfer.update(changes or {})
    return transfer


def send(sandbox, webhook, notification_type, transfer, notification_id=None):
    body = CircleSandbox.notification(notification_type, transfer, notification_id)
    return sandbox.deliver(webhook, body)


def credited(user_id) -> Decimal:
    legacy, ledger = balances(user_id)
    assert legacy == ledger  # shadow: both stores
    return ledger


def stored() -> CircleNotification:
    return CircleNotification.objects.get()


@pytest.mark.parametrize("phase", ["shadow", "cutover"])
@pytest.mark.parametrize(
    "notification_type", ["custody.transfer", "transactions.inbound", "transfers.completed"]
)
def test_a_documented_completed_deposit_credits_once(
    sandbox, webhook, depositor, phase, notification_type
):
    phase_set(phase, read_percent=100)
    transfer = mint_transfer()
    if notification_type == "transactions.inbound":
        transfer = wallets_inbound(transfer)
    status, answer = send(sandbox, webhook, notification_type, transfer)
    assert (status, answer["status"]) == (200, "processed")
    status, _ = send(sandbox, webhook, notification_type, transfer)  # another notification id
    assert status == 200
    legacy, ledger = balances(depositor)
    assert ledger == Decimal("25.5") and legacy == Decimal("25.5" if phase == "shadow" else "0")
    assert BalanceMutation.objects.get().reference == "circle:transfer:t-1"
    assert system_balance(code="usdc_buffer") == Decimal("25.5")


@pytest.mark.parametrize(
    ("notification_type", "status"),
    [
        ("custody.transfer", "pending"),
        ("custody.transfer", "failed"),
        ("transfers.completed", "pending"),  # the checklist's name does not make it complete
        ("transfers.completed", "failed"),
        ("transfers.created", "pending"),
        ("transfers.failed", "complete"),  # name and status disagree: final for neither
        ("transfers.created", "complete"),
    ],
)
def test_a_transfer_not_complete_credits_nothing(
    sandbox, webhook, depositor, notification_type, status
):
    answer = send(sandbox, webhook, notification_type, mint_transfer(status=status))
    assert answer[0] == 200 and answer[1]["status"] == "processed"
    assert credited(depositor) == 0 and not BalanceMutation.objects.exists()


@pytest.mark.parametrize("state", ["CONFIRMED", "QUEUED", "SENT", "FAILED", "CANCELED"])
def test_a_wallets_transaction_credits_only_at_complete(sandbox, webhook, depositor, state):
    transaction = {**wallets_inbound(mint_transfer()), "state": state}
    status, answer = send(sandbox, webhook, "transactions.inbound", transaction)
    assert (status, answer["status"]) == (200, "processed")
    assert credited(depositor) == 0

    complete = {**transaction, "state": "COMPLETE"}  # the same transaction, later
    assert send(sandbox, webhook, "transactions.inbound", complete)[0] == 200
    assert credited(depositor) == Decimal("25.5")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"amount": {"amount": "25.50", "currency": "EUR"}}, "currency (EUR)"),
        ({"amount": {"amount": "25.50", "currency": "EURC"}}, "currency (EURC)"),
        ({"amount": {"amount": "25.50"}}, "currency (none)"),
        ({"amount": {"amount": "1E+1", "currency": "USD"}}, "plain decimal"),
        ({"amount": {"amount": "-5", "currency": "USD"}}, "plain decimal"),
        ({"amount": {"amount": "0", "currency": "USD"}}, "positive"),
        ({"amount": {"amount": "1.0000001", "currency": "USD"}}, "decimal places"),
        ({"amount": {"amount": 25.5, "currency": "USD"}}, "decimal string"),
        ({"amount": {"amount": "NaN", "currency": "USD"}}, "plain decimal"),
        ({"source": {"type": "wallet", "id": "1000099999"}}, "another wallet's"),
        ({"destination": {"type": "wallet", "id": "1000099999", "address": ADDRESS}}, "another"),
        # Found from outside: a destination wallet that names no id was credited.
        ({"destination": {"type": "wallet", "address": ADDRESS, "chain": "ETH"}}, "another"),
        ({"destination": {"type": "blockchain", "address": ADDRESS, "chain": "ETH"}}, "another"),
    ],
)
def test_a_transfer_we_do_not_credit_is_refused_kept_and_answered_200(
    sandbox, webhook, depositor, change, why
):
    status, answer = send(sandbox, webhook, "custody.transfer", mint_transfer(changes=change))
    assert (status, answer["status"]) == (200, "refused")  # Circle's retry would bring the same
    row = stored()
    assert row.status == "refused" and why in row.error
    assert credited(depositor) == 0 and not BalanceMutation.objects.exists()
    again = send(
        sandbox, webhook, "custody.transfer", mint_transfer(changes=change), row.notification_id
    )
    assert again[0] == 200 and again[1]["duplicate"] is True
    assert stored().deliveries == 2 and credited(depositor) == 0


@pytest.mark.parametrize("wallet", ["c4d1da72-111e-4d52-bdbf-2e74a2d803d5", "", None])
def test_a_wallets_transaction_into_another_wallet_is_refused_not_credited(
    sandbox, webhook, depositor, wallet
):
    """Found from outside: `transactions.inbound` credited whatever its walletId; money in
    another wallet of the account is not in the custody the USDC buffer books."""
    transaction = {**wallets_inbound(mint_transfer()), "walletId": wallet}
    status, answer = send(sandbox, webhook, "transactions.inbound", transaction)
    assert (status, answer["status"]) == (200, "refused")
    assert "another wallet's" in stored().error
    assert credited(depositor) == 0 and not BalanceMutation.objects.exists()


def test_a_wallets_token_we_do_not_know_is_refused_not_taken_for_usdc(sandbox, webhook, depositor):
    transaction = {**wallets_inbound(mint_transfer()), "tokenId": str(uuid.uuid4())}
    status, answer = send(sandbox, webhook, "transactions.inbound", transaction)
    assert (status, answer["status"]) == (200, "refused")
    assert "token" in stored().error and credited(depositor) == 0


def test_the_documented_wallets_example_is_refused_for_its_eight_decimals(
    sandbox, webhook, settings
):
    """Circle's example (tokenId c4d1…, MATIC-AMOY, amounts ["6.62607015"]) to a registered
    address, its token taken for USDC: USDC has six decimals, so it is refused, not rounded."""
    example = fixture("wallets_v2_transactions_inbound_apiref_example.json")
    transaction = example["notification"]
    settings.CIRCLE_WALLETS_TOKENS = {transaction["tokenId"]: "USDC"}
    settings.CIRCLE_WALLET_ID = transaction["walletId"]  # into our wallet
    user_id = legacy_user("0")
    ledger_balance_set(user_id, "0")
    DepositAddress.objects.create(
        address=transaction["destinationAddress"], chain="POLY", user_id=user_id
    )
    transaction["state"] = "COMPLETE"
    body = json.dumps(example).encode()
    status, answer = sandbox.deliver(webhook, body)
    assert (status, answer["status"]) == (200, "refused")
    assert "more than 6 decimal places" in stored().error
    assert credited(user_id) == 0


def test_the_documented_wallets_example_as_it_stands_credits_nothing(sandbox, webhook, settings):
    """As documented (no `state`): recorded, nothing moves; into another wallet than ours,
    refused as not ours."""
    body = (FIXTURES / "wallets_v2_transactions_inbound_apiref_example.json").read_bytes()
    status, answer = sandbox.deliver(webhook, body)
    assert (status, answer["status"]) == (200, "refused")
    assert "wallet" in stored().error
    CircleNotification.objects.all().delete()
    settings.CIRCLE_WALLET_ID = json.loads(body)["notification"]["walletId"]
    status, answer = sandbox.deliver(webhook, body)
    assert (status, answer["status"]) == (200, "processed")
    assert stored().transfer_id == "c4d1da72-111e-4d52-bdbf-2e74a2d803d5"
    assert not BalanceMutation.objects.exists()


def test_a_partial_documented_envelope_is_refused_not_a_retry_storm(sandbox, webhook):
    """Circle's flows page shows `"notification": {"id": ""}`: no transfer id to credit."""
    body = (FIXTURES / "wallets_v2_transactions_inbound_flows_envelope_partial.json").read_bytes()
    status, answer = sandbox.deliver(webhook, body)
    assert (status, answer["status"]) == (200, "refused")
    assert "no id" in stored().error


def test_a_notification_type_we_do_not_act_on_is_recorded_and_answered_200(sandbox, webhook):
    fiat = fixture("mint_v1_deposits_notification.json")
    envelope = {
        "subscriptionId": str(uuid.uuid4()),
        "notificationId": str(uuid.uuid4()),
        "notificationType": "payments",
        "notification": fiat["deposit"],
        "timestamp": "2026-12-01T00:00:00Z",
        "version": 2,
    }
    status, answer = sandbox.deliver(webhook, json.dumps(envelope).encode())
    assert (status, answer["status"]) == (200, "processed")
    assert stored().notification_type == "payments"


def test_four_notification_ids_for_one_transfer_at_once_all_200_credited_once(
    sandbox, webhook, depositor
):
    bodies = [
        CircleSandbox.notification(kind, transfer)
        for kind, transfer in [
            ("custody.transfer", mint_transfer()),
            ("custody.transfer", mint_transfer()),
            ("transfers.completed", mint_transfer()),
            ("transactions.inbound", wallets_inbound(mint_transfer())),
        ]
    ]
    for _ in range(5):  # five rounds: the race is not won by luck
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda body: sandbox.deliver(webhook, body), bodies))
        assert [status for status, _ in answers] == [200] * 4
    assert credited(depositor) == Decimal("25.5")
    assert BalanceMutation.objects.count() == 1
    assert set(CircleNotification.objects.values_list("status", flat=True)) == {"processed"}


def test_one_notification_delivered_four_times_at_once_all_200_stored_once_counted(
    sandbox, webhook, depositor
):
    """Circle retries one notification id (same body) while the first delivery is still in
    flight: the deliveries wait for each other (the notification's advisory lock), so each is
    answered 200, the inbox holds one row with every delivery counted, and the deposit is
    credited once."""
    body = CircleSandbox.notification("custody.transfer", mint_transfer(), "n-retried")
    for _ in range(5):  # five rounds: the race is not won by luck
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: sandbox.deliver(webhook, body), range(4)))
        assert [status for status, _ in answers] == [200] * 4
    row = stored()
    assert (row.notification_id, row.status, row.deliveries) == ("n-retried", "processed", 20)
    assert credited(depositor) == Decimal("25.5")
    assert BalanceMutation.objects.count() == 1


def test_a_renotification_contradicting_the_credit_is_a_discrepancy_answered_200(
    sandbox, webhook, depositor
):
    assert send(sandbox, webhook, "custody.transfer", mint_transfer(value="25.50"))[0] == 200
    status, answer = send(sandbox, webhook, "custody.transfer", mint_transfer(value="2550.00"))
    assert (status, answer["status"]) == (200, "refused")
    assert credited(depositor) == Decimal("25.5") and BalanceMutation.objects.count() == 1
    discrepancy = TransferDiscrepancy.objects.get()
    assert (discrepancy.transfer_id, discrepancy.status) == ("t-1", "open")
    assert discrepancy.credited_amount == Decimal("25.5")
    assert discrepancy.notified_amount == "2550.00"
    contradicting = CircleNotification.objects.get(status="refused")
    assert discrepancy.notification_id == contradicting.notification_id

    # Redelivered: still 200, still one discrepancy, still one credit.
    again = send(
        sandbox,
        webhook,
        "custody.transfer",
        mint_transfer(value="2550.00"),
        contradicting.notification_id,
    )
    assert again[0] == 200 and again[1]["duplicate"] is True
    assert TransferDiscrepancy.objects.count() == 1 and credited(depositor) == Decimal("25.5")


def test_concurrent_contradicting_renotifications_credit_one_and_record_the_other(
    sandbox, webhook, depositor
):
    first = CircleSandbox.notification("custody.transfer", mint_transfer(value="10.00"))
    second = CircleSandbox.notification("custody.transfer", mint_transfer(value="99.00"))
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda body: sandbox.deliver(webhook, body), [first, second]))
    assert [status for status, _ in answers] == [200, 200]
    assert sorted(answer["status"] for _, answer in answers) == ["processed", "refused"]
    assert credited(depositor) in (Decimal("10"), Decimal("99"))
    assert BalanceMutation.objects.count() == 1 and TransferDiscrepancy.objects.count() == 1


def test_a_withdrawal_settles_only_from_our_wallet(sandbox, webhook, depositor):
    """A transfer from another wallet of the account with our withdrawal's transfer id is not
    our withdrawal's news; Circle Mint v1 delivers every wallet's transfers."""
    outbound = copy.deepcopy(fixture("mint_v1_transfers_notification.json")["transfer"])
    status, answer = send(sandbox, webhook, "custody.transfer", outbound)
    assert (status, answer["status"]) == (200, "refused")
    assert "another wallet's" in stored().error


def test_the_wallets_test_notification_is_answered_200(sandbox, webhook):
    status, answer = send(sandbox, webhook, "webhooks.test", {})
    assert (status, answer["status"]) == (200, "processed")


def test_the_sandbox_notifies_deposits_in_each_documented_shape(sandbox, depositor, settings):
    port = sandbox.server.server_address[1]
    settings.CIRCLE_SNS_URL_PATTERN = re.compile(rf"http://127\.0\.0\.1:{port}")
    for index, shape in enumerate(DEPOSIT_NOTIFICATIONS):
        sandbox.deposit_notifications = shape
        sandbox.deposit(address=ADDRESS, amount="1.25", transfer_id=f"d-{index}")
    assert credited(depositor) == Decimal("3.75")
    kinds = set(CircleNotification.objects.values_list("notification_type", flat=True))
    assert kinds == {"custody.transfer", "transactions.inbound", "transfers"}
    assert USDC_TOKEN_ID in CircleNotification.objects.get(transfer_id="d-1").body
    assert CircleNotification.objects.get(transfer_id="d-2").notification_id.startswith("sns:")


def test_an_operator_resolves_a_discrepancy_with_a_note_audited(
    sandbox, webhook, depositor, client
):
    send(sandbox, webhook, "custody.transfer", mint_transfer(value="25.50"))
    send(sandbox, webhook, "custody.transfer", mint_transfer(value="30.00"))
    discrepancy = TransferDiscrepancy.objects.get()
    clerk = User.objects.create_user("clerk", password="a-long-password-1", is_staff=True)
    with pytest.raises(OperatorNotPermitted):
        transfer_discrepancy_resolve(
            discrepancy_id=discrepancy.pk, actor=Actor.for_user(clerk), note="looked"
        )
    root = User.objects.create_superuser("root", password="a-long-password-1")
    client.force_login(root)
    changelist = "/admin/onchain/transferdiscrepancy/"
    assert "t-1" in client.get(changelist).content.decode()
    action = {"action": "resolve", "_selected_action": [discrepancy.pk]}
    confirm = client.post(changelist, action)
    assert confirm.status_code == 200 and "note" in confirm.content.decode()
    client.post(changelist, {**action, "confirmed": "yes", "note": ""})  # a note is required
    assert TransferDiscrepancy.objects.get().status == "open"
    client.post(changelist, {**action, "confirmed": "yes", "note": "Circle's resend was wrong"})
    discrepancy.refresh_from_db()
    assert (discrepancy.status, discrepancy.resolved_by) == ("resolved", "admin:root")
    audit = OperatorAudit.objects.get(action="transfer_discrepancy.resolve")
    assert audit.reason == "Circle's resend was wrong"
    assert credited(depositor) == Decimal("25.5")  # resolving moves no money by itself
    with pytest.raises(TransitionRefused):  # an operator resolving it twice changes nothing
        transfer_discrepancy_resolve(
            discrepancy_id=discrepancy.pk, actor=Actor.for_user(root), note="again"
        )
    assert OperatorAudit.objects.filter(action="transfer_discrepancy.resolve").count() == 1


def test_polygon_is_poly_as_circle_names_it_and_matic_is_refused_naming_the_chain():
    with pytest.raises(AddressInvalid) as refused:
        address_validate(chain="MATIC", address=ADDRESS)
    assert refused.value.field == "chain" and "POLY" in str(refused.value)
    assert address_validate(chain="POLY", address=ADDRESS) == ADDRESS

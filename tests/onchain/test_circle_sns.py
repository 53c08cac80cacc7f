"""Circle Mint v1 through Amazon SNS, over real sockets: the sandbox plays SNS (its own
certificate, signed envelopes, the confirmation URL) and posts to the live webhook. Nothing is
trusted before the topic, the URLs and the signature are checked; a verified Notification's
Circle message goes through the inbox (deduplicated by `sns:<MessageId>`)."""

import json
import logging
import re
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from cutover.actors import Actor
from cutover.models import BalanceMutation
from onchain.addresses import deposit_address_add
from onchain.models import CircleNotification
from onchain.withdrawals import withdrawals_send
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import balances, integrity_ok, system, withdraw

pytestmark = pytest.mark.django_db(transaction=True)

FIXTURES = Path(__file__).parent / "fixtures" / "circle"
EAST = "arn:aws:sns:us-east-1:908968368384:sandbox_platform-notifications-topic"
WEST = "arn:aws:sns:us-west-2:908968368384:sandbox_platform-notifications-topic"
ADDRESS = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # EIP-55's first test vector


@pytest.fixture
def sns(sandbox, settings):
    """The Circle sandbox as SNS: its own host (and no other) is SNS's for the product."""
    port = sandbox.server.server_address[1]
    settings.CIRCLE_SNS_URL_PATTERN = re.compile(rf"http://127\.0\.0\.1:{port}")
    return sandbox


@pytest.fixture
def webhook(sandbox):
    return sandbox.subscriber


@pytest.fixture
def depositor():
    user_id = legacy_user("0")
    ledger_balance_set(user_id, "0")
    deposit_address_add(address=ADDRESS, chain="ETH", user_id=user_id, actor=Actor("operator"))
    return user_id


def mint_deposit(transfer_id="t-1", amount="25.50", address=ADDRESS) -> dict:
    """Circle Mint v1's `transfers` message: a completed inbound transfer into our wallet."""
    return {
        "clientId": "00000000-0000-0000-0000-000000000001",
        "notificationType": "transfers",
        "version": 1,
        "customAttributes": {"clientId": "00000000-0000-0000-0000-000000000001"},
        "transfer": {
            "id": transfer_id,
            "source": {"type": "blockchain", "chain": "ETH"},
            "destination": {
                "type": "wallet",
                "id": django_settings.CIRCLE_WALLET_ID,
                "address": address,
                "chain": "ETH",
            },
            "amount": {"amount": amount, "currency": "USD"},
            "transactionHash": "0x" + uuid.uuid4().hex,
            "status": "complete",
            "createDate": "2026-12-01T10:00:00.000Z",
        },
    }


def nothing_happened(depositor=None):
    assert not CircleNotification.objects.exists()
    assert not BalanceMutation.objects.exists()
    if depositor is not None:
        assert balances(depositor) == (Decimal(0), Decimal(0))


@pytest.mark.parametrize("topic", [EAST, WEST])
def test_each_regional_subscription_is_confirmed_once(sns, webhook, topic):
    confirmation = sns.sns_confirmation(topic)
    status, answer = sns.deliver_sns(webhook, confirmation)
    assert status == 200
    assert answer == {
        "messageId": confirmation["MessageId"],
        "type": "SubscriptionConfirmation",
        "topicArn": topic,
        "duplicate": False,
    }
    assert sns.sns_confirmed == [{"TopicArn": topic, "Token": confirmation["Token"]}]
    row = CircleNotification.objects.get()
    assert row.notification_id == f"sns:{confirmation['MessageId']}"
    assert (row.notification_type, row.status) == ("sns.SubscriptionConfirmation", "processed")
    status, answer = sns.deliver_sns(webhook, confirmation)  # SNS's retry: recorded, not redone
    assert status == 200 and answer["duplicate"] is True
    assert len(sns.sns_confirmed) == 1
    assert CircleNotification.objects.get().deliveries == 2


@pytest.mark.parametrize(
    "subscribe_url",
    [
        "http://localhost:{port}/?Action=ConfirmSubscription&TopicArn={topic}&Token={token}",
        "http://127.0.0.1:{port}@localhost:{port}/?Action=ConfirmSubscription&TopicArn={topic}"
        "&Token={token}",
        "https://sns.us-west-2.amazonaws.com.example.org/?Action=ConfirmSubscription",
    ],
)
def test_a_confirmation_url_off_sns_hosts_is_refused_and_never_visited(sns, webhook, subscribe_url):
    confirmation = sns.sns_confirmation(WEST)
    port = sns.server.server_address[1]
    confirmation["SubscribeURL"] = subscribe_url.format(
        port=port, topic=WEST, token=confirmation["Token"]
    )
    sns.sns_sign(confirmation)  # SNS's signature is genuine: only the host is wrong
    status, answer = sns.deliver_sns(webhook, confirmation)
    assert status == 403 and answer["error"]["field"] == "SubscribeURL"
    assert sns.sns_confirmed == []
    assert sns.sns_certificate_fetches == 0  # refused before anything was fetched
    nothing_happened()


@pytest.mark.parametrize("signature_version", ["1", "2"])
def test_a_completed_mint_deposit_credits_once(sns, webhook, depositor, signature_version):
    phase_set("shadow")
    envelope = sns.sns_envelope(mint_deposit(), topic_arn=WEST, signature_version=signature_version)
    status, answer = sns.deliver_sns(webhook, envelope)
    assert status == 200
    assert answer == {
        "notificationId": f"sns:{envelope['MessageId']}",
        "status": "processed",
        "duplicate": False,
    }
    assert balances(depositor) == (Decimal("25.5"), Decimal("25.5"))
    assert BalanceMutation.objects.get().reference == "circle:transfer:t-1"
    row = CircleNotification.objects.get()
    assert (row.notification_type, row.key_id, row.transfer_id) == ("transfers", "sns", "t-1")
    assert row.body == envelope["Message"]  # Circle's message, stored as SNS carried it

    status, answer = sns.deliver_sns(webhook, envelope)  # SNS retries under the same MessageId
    assert (status, answer["duplicate"]) == (200, True)
    # Circle publishes from both regions: the same transfer under another topic and MessageId.
    other_region = sns.sns_envelope(mint_deposit(), topic_arn=EAST)
    status, answer = sns.deliver_sns(webhook, other_region)
    assert (status, answer["status"], answer["duplicate"]) == (200, "processed", False)
    assert balances(depositor) == (Decimal("25.5"), Decimal("25.5"))
    assert BalanceMutation.objects.count() == 1
    assert CircleNotification.objects.get(notification_id=row.notification_id).deliveries == 2
    assert sns.sns_certificate_fetches == 1  # one fetch per certificate, then the process's


@pytest.mark.parametrize(
    "certificate_url",
    [
        "http://localhost:{port}{path}",
        "http://127.0.0.1:{port}@localhost:{port}{path}",
        "https://127.0.0.1:{port}{path}",
        "http://127.0.0.1:{port}/certificate.txt",
    ],
)
def test_a_certificate_off_sns_hosts_is_refused_and_never_fetched(
    sns, webhook, depositor, certificate_url
):
    phase_set("shadow")
    envelope = sns.sns_envelope(mint_deposit())
    envelope["SigningCertURL"] = certificate_url.format(
        port=sns.server.server_address[1], path=sns.sns_signer[2]
    )
    status, answer = sns.deliver_sns(webhook, envelope)
    assert status == 403 and answer["error"]["field"] == "SigningCertURL"
    assert sns.sns_certificate_fetches == 0
    nothing_happened(depositor)


def test_another_topic_is_refused(sns, webhook, depositor):
    phase_set("shadow")
    envelope = sns.sns_envelope(mint_deposit(), topic_arn="arn:aws:sns:us-east-1:1:not-circle")
    status, answer = sns.deliver_sns(webhook, envelope)
    assert status == 403 and answer["error"]["field"] == "TopicArn"
    assert sns.sns_certificate_fetches == 0
    nothing_happened(depositor)


@pytest.mark.parametrize("change", ["message", "subject_added", "signature_version"])
def test_a_signature_over_something_else_is_refused(sns, webhook, depositor, change):
    phase_set("shadow")
    envelope = sns.sns_envelope(mint_deposit(), signature_version="2")
    if change == "message":
        envelope["Message"] = json.dumps(mint_deposit(amount="95.50"), separators=(",", ":"))
    elif change == "subject_added":
        envelope["Subject"] = "transfers"  # signed when present
    else:
        envelope["SignatureVersion"] = "1"  # the same signature read as SHA1's
    status, answer = sns.deliver_sns(webhook, envelope)
    assert status == 403 and answer["error"]["field"] == "Signature"
    nothing_happened(depositor)


def test_a_subject_is_part_of_what_sns_signs(sns, webhook, depositor):
    phase_set("shadow")
    envelope = sns.sns_envelope(mint_deposit())
    envelope["Subject"] = "transfers"
    sns.sns_sign(envelope)
    status, answer = sns.deliver_sns(webhook, envelope)
    assert (status, answer["status"]) == (200, "processed")
    assert balances(depositor) == (Decimal("25.5"), Decimal("25.5"))


def test_documented_mint_transfer_of_another_wallet_is_kept_refused(sns, webhook):
    phase_set("shadow")
    message = json.loads((FIXTURES / "mint_v1_transfers_notification.json").read_text())
    envelope = sns.sns_envelope(message, signature_version="1")
    status, answer = sns.deliver_sns(webhook, envelope)
    assert (status, answer["status"]) == (200, "refused")
    row = CircleNotification.objects.get()
    assert row.status == "refused" and "another wallet's" in row.error
    assert row.transfer_id == "0d46b642-3a5f-4071-a747-4053b7df2f99"
    assert not BalanceMutation.objects.exists()


def test_an_unsubscription_is_recorded_and_alerted_never_resubscribed(sns, webhook, caplog):
    caplog.set_level(logging.ERROR, logger="onchain.sns")
    envelope = sns.sns_unsubscribe_confirmation(EAST)
    status, answer = sns.deliver_sns(webhook, envelope)
    assert (status, answer["type"], answer["topicArn"]) == (200, "UnsubscribeConfirmation", EAST)
    assert sns.sns_confirmed == []  # its SubscribeURL was not visited
    row = CircleNotification.objects.get()
    assert (row.notification_type, row.status) == ("sns.UnsubscribeConfirmation", "processed")
    assert any(
        "ALERT" in record.getMessage() and EAST in record.getMessage() for record in caplog.records
    )


def test_unreachable_certificate_or_confirmation_url_is_503_and_retried(sns, webhook):
    confirmation = sns.sns_confirmation(WEST)
    good_url = confirmation["SubscribeURL"]
    confirmation["SubscribeURL"] = good_url.replace(confirmation["Token"], "expired")
    sns.sns_sign(confirmation)
    status, answer = sns.deliver_sns(webhook, confirmation)
    assert status == 503 and answer["error"]["code"] == "sns_unavailable"
    assert not CircleNotification.objects.exists()

    missing = sns.sns_envelope(mint_deposit())
    missing["SigningCertURL"] = f"{sns.base_url}/SimpleNotificationService-gone.pem"
    status, answer = sns.deliver_sns(webhook, missing)
    assert status == 503 and answer["error"]["code"] == "sns_unavailable"
    assert not CircleNotification.objects.exists()

    confirmation["SubscribeURL"] = good_url
    status, _ = sns.deliver_sns(webhook, sns.sns_sign(confirmation))  # SNS's retry
    assert status == 200 and len(sns.sns_confirmed) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b"[]", "body"),
        (json.dumps({"Type": "Hello"}).encode(), "Type"),
        (json.dumps({"Type": "Notification", "MessageId": "m"}).encode(), "TopicArn"),
    ],
)
def test_malformed_envelopes_are_400_naming_the_field(sns, webhook, body, field):
    status, answer = sns.deliver_sns(webhook, body)
    assert status == 400 and answer["error"]["field"] == field
    nothing_happened()


@pytest.mark.parametrize("missing", ["Signature", "SigningCertURL", "Timestamp", "Token"])
def test_a_confirmation_missing_a_field_is_400_naming_it(sns, webhook, missing):
    confirmation = sns.sns_confirmation(WEST)
    del confirmation[missing]
    status, answer = sns.deliver_sns(webhook, confirmation)
    assert status == 400 and answer["error"]["field"] == missing
    assert sns.sns_confirmed == [] and sns.sns_certificate_fetches == 0
    nothing_happened()


def test_an_unknown_signature_version_is_refused(sns, webhook):
    envelope = sns.sns_envelope(mint_deposit())
    envelope["SignatureVersion"] = "3"
    status, answer = sns.deliver_sns(webhook, envelope)
    assert status == 403 and answer["error"]["field"] == "SignatureVersion"
    nothing_happened()


def test_a_verified_message_that_is_not_circles_is_400(sns, webhook):
    status, answer = sns.deliver_sns(webhook, sns.sns_envelope("Hello world!"))
    assert status == 400 and answer["error"]["field"] == "Message"
    nothing_happened()


def test_the_webhook_token_and_size_limit_apply_to_sns(sns, webhook, depositor, settings):
    phase_set("shadow")
    settings.CIRCLE_WEBHOOK_SECRET = "s3cret"
    envelope = sns.sns_envelope(mint_deposit())
    status, answer = sns.deliver_sns(webhook, envelope)
    assert status == 401 and answer["error"]["field"] == "token"
    assert sns.sns_certificate_fetches == 0
    big = sns.sns_envelope(mint_deposit() | {"padding": "x" * 70000})
    status, _ = sns.deliver_sns(f"{webhook}?token=s3cret", big)
    assert status == 413
    nothing_happened(depositor)
    status, answer = sns.deliver_sns(f"{webhook}?token=s3cret", envelope)
    assert (status, answer["status"]) == (200, "processed")
    assert balances(depositor) == (Decimal("25.5"), Decimal("25.5"))


@pytest.mark.parametrize("phase", ["shadow", "cutover"])
def test_the_documented_mint_transfer_completes_our_withdrawal_once(sns, webhook, user, phase):
    """Circle's documented v1 `transfers` message (tests/onchain/fixtures/circle), its ids and
    figures those of our withdrawal's transfer: delivered by SNS twice (both regions), the
    withdrawal completes once."""
    phase_set(phase, read_percent=100)
    withdrawal = withdraw(user, amount="3.14", address="0x8381470ED67C3802402dbbFa0058E8871F017A6F")
    assert withdrawals_send().submitted == 1
    withdrawal.refresh_from_db()
    message = json.loads((FIXTURES / "mint_v1_transfers_notification.json").read_text())
    message["transfer"]["id"] = withdrawal.circle_transfer_id
    message["transfer"]["source"]["id"] = django_settings.CIRCLE_WALLET_ID
    message["transfer"]["destination"]["chain"] = "ETH"
    for topic in (EAST, WEST):
        status, answer = sns.deliver_sns(webhook, sns.sns_envelope(message, topic_arn=topic))
        assert (status, answer["status"]) == (200, "processed")
    withdrawal.refresh_from_db()
    assert withdrawal.status == "completed"
    assert system("withdrawals_pending_usdc") == 0
    assert system("usdc_buffer") == Decimal("1000") - Decimal("3.14")
    assert balances(user)[1] == Decimal("96.86")
    assert integrity_ok()


@pytest.mark.parametrize("body", [b"[" * 60000, b'{"Type": ' * 6000 + b"1"])
def test_json_nested_past_the_parser_before_any_signature_is_400(sns, webhook, body):
    """The SNS envelope is parsed before its signature can be checked: a stranger's deep JSON
    is refused naming the body, never a 500."""
    status, answer = sns.deliver_sns(webhook, body)
    assert status == 400 and answer["error"]["field"] == "body"
    assert not CircleNotification.objects.exists()

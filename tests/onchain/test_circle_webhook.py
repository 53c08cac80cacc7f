"""Circle's webhook against the shipped sandbox over real HTTP: signatures verified before
anything is trusted, the inbox deduplicates, a completed deposit credits once in every phase."""

import json
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from cutover.models import BalanceMutation, LegacyBalance
from ledger.models import Account
from ledger.selectors import system_balance
from onchain.models import CircleNotification, CirclePublicKey, DepositAddress
from onchain.sandbox import CircleSandbox
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sandbox(settings):
    with CircleSandbox() as running:
        settings.CIRCLE_API_BASE_URL = running.base_url
        settings.CIRCLE_API_KEY = "sandbox-key"
        yield running


@pytest.fixture
def webhook(live_server):
    return f"{live_server.url}/webhooks/circle/transfers"


@pytest.fixture
def depositor():
    user_id = legacy_user("0")
    ledger_balance_set(user_id, "0")
    DepositAddress.objects.create(address="0xabc", chain="ETH", user_id=user_id)
    return user_id


def balances(user_id):
    legacy = LegacyBalance.objects.get(user_id=user_id).buying_power
    ledger = Account.objects.get(user_id=user_id, account_type="usdc_balance").balance
    return legacy, ledger


def completed(transfer_id="t-1", amount="25.50", address="0xabc", notification_id=None):
    return CircleSandbox.transfer_notification(
        notification_type="transfers.completed",
        transfer_id=transfer_id,
        address=address,
        amount=amount,
        notification_id=notification_id,
    )


@pytest.mark.parametrize("phase", ["legacy", "shadow", "read_switch", "strict", "cutover"])
def test_completed_deposit_credits_the_user_and_the_buffer_once(sandbox, webhook, depositor, phase):
    phase_set(phase, read_percent=100)
    body = completed()
    status, answer = sandbox.deliver(webhook, body)
    assert (status, answer["status"], answer["duplicate"]) == (200, "processed", False)
    again, answer = sandbox.deliver(webhook, body)  # Circle redelivers with the same id
    assert again == 200 and answer["duplicate"] is True
    legacy, ledger = balances(depositor)
    assert legacy == Decimal("25.5" if phase != "cutover" else "0")
    assert ledger == Decimal("25.5" if phase != "legacy" else "0")
    buffer = system_balance(code="usdc_buffer")
    assert buffer == Decimal("25.5" if phase != "legacy" else "0")
    notification = CircleNotification.objects.get()
    assert notification.deliveries == 2 and notification.status == "processed"
    assert BalanceMutation.objects.get().reference == "circle:transfer:t-1"
    assert sandbox.key_fetches == 1  # fetched once, then from the table


def test_same_transfer_in_another_notification_credits_once(sandbox, webhook, depositor):
    phase_set("shadow")
    assert sandbox.deliver(webhook, completed())[0] == 200
    assert sandbox.deliver(webhook, completed())[0] == 200  # a new notification id
    assert balances(depositor) == (Decimal("25.5"), Decimal("25.5"))
    assert CircleNotification.objects.count() == 2


def test_many_deliveries_shuffled_and_concurrent_credit_exactly(sandbox, webhook, depositor):
    phase_set("shadow")
    rng = random.Random(5)
    bodies, expected = [], Decimal(0)
    for index in range(40):
        amount = Decimal(rng.randint(1, 10000)) / 100
        expected += amount
        body = completed(transfer_id=f"t-{index}", amount=str(amount))
        bodies += [body] * rng.randint(1, 3)
    rng.shuffle(bodies)
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda b: sandbox.deliver(webhook, b)[0], bodies))
    # A concurrent duplicate may be told to come back (503); Circle's retry then settles it.
    for body, status in zip(bodies, statuses, strict=True):
        if status != 200:
            assert sandbox.deliver(webhook, body)[0] == 200
    assert balances(depositor) == (expected, expected)
    assert BalanceMutation.objects.count() == 40


def test_unknown_address_is_parked_not_dropped(sandbox, webhook, depositor):
    status, answer = sandbox.deliver(webhook, completed(address="0xnobody"))
    assert (status, answer["status"]) == (200, "parked")
    assert CircleNotification.objects.get().status == "parked"
    assert not BalanceMutation.objects.exists()


@pytest.mark.parametrize(
    ("tamper", "status", "code"),
    [
        ("byte", 401, "bad_signature"),
        ("reserialised", 401, "bad_signature"),
        ("other_key", 401, "bad_signature"),
        ("unknown_key_id", 400, "unknown_key"),
        ("no_signature", 401, "bad_signature"),
        ("not_base64", 401, "bad_signature"),
    ],
)
def test_rejected_deliveries_store_and_credit_nothing(
    sandbox, webhook, depositor, tamper, status, code
):
    body = completed()
    signature, key_id, sent = sandbox.sign(body), None, body
    if tamper == "byte":
        sent = body.replace(b"25.50", b"95.50")
    elif tamper == "reserialised":
        sent = json.dumps(json.loads(body), indent=1).encode()
    elif tamper == "other_key":
        with CircleSandbox() as stranger:
            signature = stranger.sign(body)
    elif tamper == "unknown_key_id":
        key_id = str(uuid.uuid4())
    elif tamper == "no_signature":
        signature = ""
    elif tamper == "not_base64":
        signature = "!!!"
    answer_status, answer = sandbox.deliver(webhook, sent, signature=signature, key_id=key_id)
    assert answer_status == status and answer["error"]["code"] == code
    assert not CircleNotification.objects.exists()
    assert not BalanceMutation.objects.exists()
    assert balances(depositor) == (Decimal(0), Decimal(0))


def test_bodies_that_are_not_notifications_are_400(sandbox, webhook):
    for body in (
        b"{not json",
        b"[1, 2]",
        json.dumps({"notificationType": "custody.transfer"}).encode(),
        json.dumps({"notificationId": "n", "notificationType": 7}).encode(),
        json.dumps({"notificationId": "n"}).encode(),
        json.dumps({"notificationId": "", "notificationType": "custody.transfer"}).encode(),
    ):
        status, answer = sandbox.deliver(webhook, body)
        assert status == 400 and answer["error"]["code"] == "malformed", body
    assert not CircleNotification.objects.exists()


def test_a_type_we_do_not_act_on_is_kept_and_answered_200_not_retried(sandbox, webhook):
    body = json.dumps({"notificationId": "n", "notificationType": "x"}).encode()
    status, answer = sandbox.deliver(webhook, body)
    assert (status, answer["status"]) == (200, "processed")
    assert CircleNotification.objects.get().notification_type == "x"


def test_oversized_body_is_413(sandbox, webhook, settings):
    status, answer = sandbox.deliver(webhook, b"{" + b" " * 70000 + b"}")
    assert status == 413 and answer["error"]["code"] == "too_large"


def test_kill_switch_leaves_the_notification_stored_and_retryable(sandbox, webhook, depositor):
    phase_set("shadow", kill_switch=True)
    body = completed()
    status, answer = sandbox.deliver(webhook, body)
    assert status == 503 and answer["error"]["code"] == "not_applied"
    stored = CircleNotification.objects.get()
    assert stored.status == "failed" and "KillSwitchEngaged" in stored.error
    phase_set("shadow")
    status, answer = sandbox.deliver(webhook, body)  # Circle's redelivery
    assert (status, answer["status"]) == (200, "processed")
    assert balances(depositor) == (Decimal("25.5"), Decimal("25.5"))
    assert CirclePublicKey.objects.count() == 1


def test_parked_deposit_is_credited_by_a_replay_once_the_address_is_known(sandbox, webhook):
    phase_set("shadow")
    _, answer = sandbox.deliver(webhook, completed(address="0xlate"))
    assert answer["status"] == "parked"
    user_id = legacy_user("0")
    DepositAddress.objects.create(address="0xlate", chain="ETH", user_id=user_id)
    notification_id = CircleNotification.objects.get().notification_id
    out = StringIO()
    call_command("onchain", "replay", notification_id, stdout=out)
    assert out.getvalue().strip() == f"{notification_id}: processed"
    call_command("onchain", "replay", notification_id, stdout=StringIO())  # again: no effect
    assert LegacyBalance.objects.get(user_id=user_id).buying_power == Decimal("25.5")
    assert BalanceMutation.objects.count() == 1
    with pytest.raises(CommandError, match="no stored notification"):
        call_command("onchain", "replay", "missing")


def test_buffer_status_needs_the_admin_token_and_reports_the_alert(
    client, settings, sandbox, webhook, depositor
):
    settings.ADMIN_TOKEN = "admin-secret"
    settings.METRICS_TOKEN = "metrics-secret"
    settings.ONCHAIN_BUFFER_ALERT_THRESHOLD = Decimal("100")
    url = "/internal/onchain/buffer-status"
    assert client.get(url).status_code == 401
    assert client.get(url, HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    phase_set("shadow")
    sandbox.deliver(webhook, completed(amount="25.50"))
    body = client.get(url, HTTP_AUTHORIZATION="Bearer admin-secret").json()
    assert body == {
        "currency": "USDC",
        "balance": "25.500000",
        "alert_threshold": "100",
        "below_threshold": True,
    }
    metrics = client.get("/metrics", headers={"Authorization": "Bearer metrics-secret"})
    assert "onchain_buffer_level 25.5" in metrics.content.decode()


def test_webhook_secret_is_an_extra_gate_never_a_bypass(sandbox, webhook, depositor, settings):
    settings.CIRCLE_WEBHOOK_SECRET = "s3cret"
    phase_set("shadow")
    body = completed()
    status, answer = sandbox.deliver(webhook, body)  # no token
    assert status == 401 and answer["error"]["field"] == "token"
    assert sandbox.key_fetches == 0  # refused before any key was fetched
    status, answer = sandbox.deliver(f"{webhook}?token=s3cret", body, signature="AAAA")
    assert status == 401 and answer["error"]["code"] == "bad_signature"  # token does not bypass
    assert not CircleNotification.objects.exists()
    status, answer = sandbox.deliver(f"{webhook}?token=s3cret", body)
    assert (status, answer["status"]) == (200, "processed")
    assert balances(depositor) == (Decimal("25.5"), Decimal("25.5"))


def test_console_shows_a_banner_while_the_buffer_is_below_the_threshold(client, settings):
    from django.contrib.auth.models import User

    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw-long-enough-1"))
    settings.ONCHAIN_BUFFER_ALERT_THRESHOLD = Decimal("5000")
    page = client.get("/admin/").content.decode()
    assert 'id="buffer-alert"' in page and "below the alert threshold" in page
    settings.ONCHAIN_BUFFER_ALERT_THRESHOLD = Decimal("0")
    assert 'id="buffer-alert"' not in client.get("/admin/").content.decode()

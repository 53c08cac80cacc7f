"""The on-chain engine's scheduled work in a real Celery worker with its beat, over Redis: a
requested withdrawal is sent by the beat-driven outbox pass and completed by Circle's webhook;
a deposit whose webhook never came is credited by the beat-driven poll."""

from decimal import Decimal

import pytest
import redis

from cutover.models import LegacyBalance
from onchain.models import DepositAddress, Withdrawal
from onchain.sandbox import CircleSandbox
from onchain.withdrawals import withdrawal_request
from tests.celery import WORKER_WITH_BEAT, celery_running, wait_for
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import DESTINATION, buffer_fund

pytestmark = pytest.mark.django_db(transaction=True)
BROKER = "redis://127.0.0.1:6379/14"


def test_beat_sends_withdrawals_and_polls_deposits(live_server):
    phase_set("shadow")
    buffer_fund("1000")
    user = legacy_user("100")
    ledger_balance_set(user, "100")
    DepositAddress.objects.create(address="0xdeposit", chain="ETH", user_id=user)
    redis.Redis.from_url(BROKER).flushdb()
    subscriber = f"{live_server.url}/webhooks/circle/transfers"
    with CircleSandbox(subscriber=subscriber, settle="complete") as sandbox:
        environment = {
            "CELERY_BROKER_URL": BROKER,
            "ENABLE_ONCHAIN_ENGINE": "true",
            "CIRCLE_API_BASE_URL": sandbox.base_url,
            "CIRCLE_API_KEY": "sandbox-key",
            "ONCHAIN_WITHDRAWAL_SEND_INTERVAL": "1s",
            "ONCHAIN_DEPOSIT_POLL_INTERVAL": "1s",
            "CUTOVER_RECONCILE_INTERVAL": "1h",
        }
        with celery_running(WORKER_WITH_BEAT, environment=environment):
            withdrawal = withdrawal_request(
                user_id=user, amount="30", address=DESTINATION, chain="ETH"
            )
            deposit = sandbox.deposit(address="0xdeposit", amount="12.5", notify=False)
            assert wait_for(lambda: Withdrawal.objects.get(pk=withdrawal.pk).status == "completed")
            reference = f"circle:transfer:{deposit['id']}"
            assert wait_for(
                lambda: LegacyBalance.objects.get(user_id=user).buying_power == Decimal("82.5")
            ), reference
    assert len([t for t in sandbox.transfers.values() if t["source"]["type"] == "wallet"]) == 1

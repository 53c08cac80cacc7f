"""The on-chain engine's scheduled work in a real Celery worker with its beat, over Redis: a
requested withdrawal is sent by the beat-driven outbox pass and completed by Circle's webhook;
a deposit whose webhook never came is credited by the beat-driven poll."""

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from cutover.models import LegacyBalance
from onchain.models import DepositAddress, Withdrawal
from onchain.sandbox import CircleSandbox
from onchain.services import withdrawal_request
from tests.cutover.factories import database_url, ledger_balance_set, legacy_user, phase_set
from tests.onchain.test_withdrawals import buffer_fund

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent.parent
BROKER = "redis://127.0.0.1:6379/14"


def wait_for(condition, seconds: float = 60) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_beat_sends_withdrawals_and_polls_deposits(live_server, tmp_path):
    phase_set("shadow")
    buffer_fund("1000")
    user = legacy_user("100")
    ledger_balance_set(user, "100")
    DepositAddress.objects.create(address="0xdeposit", chain="ETH", user_id=user)
    redis.Redis.from_url(BROKER).flushdb()
    subscriber = f"{live_server.url}/webhooks/circle/transfers"
    with CircleSandbox(subscriber=subscriber, settle="complete") as sandbox:
        env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "CELERY_BROKER_URL": BROKER,
            "ENABLE_ONCHAIN_ENGINE": "true",
            "CIRCLE_API_BASE_URL": sandbox.base_url,
            "CIRCLE_API_KEY": "sandbox-key",
            "ONCHAIN_WITHDRAWAL_SEND_INTERVAL": "1s",
            "ONCHAIN_DEPOSIT_POLL_INTERVAL": "1s",
            "CUTOVER_RECONCILE_INTERVAL": "1h",
        }
        worker = subprocess.Popen(
            [
                sys.executable,
                *("-m", "celery", "-A", "config", "worker", "--beat"),
                *("--schedule", str(tmp_path / "beat-schedule"), "-c", "1", "--pool", "solo"),
                *("--without-heartbeat", "--without-mingle", "--without-gossip"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            withdrawal = withdrawal_request(
                user_id=user, amount="30", address="0xdest", chain="ETH"
            )
            deposit = sandbox.deposit(address="0xdeposit", amount="12.5", notify=False)
            assert wait_for(lambda: Withdrawal.objects.get(pk=withdrawal.pk).status == "completed")
            reference = f"circle:transfer:{deposit['id']}"
            assert wait_for(
                lambda: LegacyBalance.objects.get(user_id=user).buying_power == Decimal("82.5")
            ), reference
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=30)
    assert len([t for t in sandbox.transfers.values() if t["source"]["type"] == "wallet"]) == 1

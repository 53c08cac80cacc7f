"""Many notifications, each delivered 1..3 times, shuffled, from several processes at once, in
every phase: balances exactly as expected, one credit per transfer. 2,000 notifications per
phase in the suite (about 10 s each here; thousands of concurrent duplicates already);
`scripts/soak` runs 50,000 (ONCHAIN_STORM_NOTIFICATIONS)."""

import multiprocessing
import os
import random
import signal
import time
import uuid
from collections import defaultdict
from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import Sum

from cutover.exceptions import CutoverError
from cutover.models import BalanceMutation, LegacyBalance
from ledger.models import Account
from ledger.selectors import ledger_integrity_checks, system_balance
from onchain.inbox import notification_receive
from onchain.models import CircleNotification, DepositAddress
from onchain.sandbox import CircleSandbox
from rehearsal.runtime import processes_run
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)
NOTIFICATIONS = int(os.environ.get("ONCHAIN_STORM_NOTIFICATIONS", "2000"))
CI_NOTIFICATIONS = 2000
# The suite's per-test timeout holds CI's size; scripts/soak's 50,000 per phase run as long as
# they take.
STORM_TIMEOUT = pytest.mark.timeout(600 if NOTIFICATIONS <= CI_NOTIFICATIONS else 0)
PROCESSES = 4
USERS = 50


def deliver(batch: list[tuple[bytes, str, str]]) -> int:
    """One sender: every delivery until Circle would stop retrying it (2xx)."""
    retried = 0
    try:
        for body, signature, key_id in batch:
            for _ in range(20):
                try:
                    notification_receive(body=body, signature=signature, key_id=key_id)
                    break
                except CutoverError:  # a concurrent duplicate told to come back (503)
                    retried += 1
            else:
                raise AssertionError("a delivery never succeeded")
    finally:
        connection.close()
    return retried


@STORM_TIMEOUT
@pytest.mark.parametrize("phase", ["legacy", "shadow", "read_switch", "strict", "cutover"])
def test_notification_storm_credits_each_transfer_once(settings, phase):
    phase_set(phase, read_percent=50)
    rng = random.Random(phase)
    users = []
    for index in range(USERS):
        user_id = legacy_user("0")
        ledger_balance_set(user_id, "0")
        DepositAddress.objects.create(address=f"0x{index:040x}", chain="ETH", user_id=user_id)
        users.append(user_id)
    expected: dict[uuid.UUID, Decimal] = defaultdict(Decimal)
    with CircleSandbox() as sandbox:
        settings.CIRCLE_API_BASE_URL = sandbox.base_url
        settings.CIRCLE_API_KEY = "sandbox-key"
        deliveries = []
        for index in range(NOTIFICATIONS):
            user = rng.randrange(USERS)
            amount = Decimal(rng.randint(1, 10**8)) / 10**6
            expected[users[user]] += amount
            body = CircleSandbox.transfer_notification(
                notification_type="transfers.completed",
                transfer_id=f"storm-{index}",
                address=f"0x{user:040x}",
                amount=str(amount),
            )
            deliveries += [(body, sandbox.sign(body), sandbox.key_id)] * rng.randint(1, 3)
        rng.shuffle(deliveries)
        processes_run(deliver, [(deliveries[n::PROCESSES],) for n in range(PROCESSES)])
        assert sandbox.key_fetches >= 1

    assert CircleNotification.objects.count() == NOTIFICATIONS
    assert set(CircleNotification.objects.values_list("status", flat=True)) == {"processed"}
    assert BalanceMutation.objects.count() == NOTIFICATIONS  # one credit per transfer
    total = sum(expected.values())
    legacy = dict(LegacyBalance.objects.values_list("user_id", "buying_power"))
    ledger = dict(Account.objects.filter(user_id__in=users).values_list("user_id", "balance"))
    for user in users:
        assert legacy[user] == (0 if phase == "cutover" else expected[user])
        assert ledger[user] == (0 if phase == "legacy" else expected[user])
    buffer = system_balance(code="usdc_buffer")
    assert buffer == (0 if phase == "legacy" else total)
    users_total = Account.objects.filter(user_id__in=users).aggregate(s=Sum("balance"))["s"]
    assert users_total == (0 if phase == "legacy" else total)
    assert all(check.ok for check in ledger_integrity_checks())


def test_receiver_killed_mid_storm_loses_and_duplicates_nothing(settings):
    """kill -9 of the process applying notifications, wherever it happens to be; Circle then
    redelivers everything (it had no 2xx for what was in flight): each transfer credited once."""
    phase_set("shadow")
    user = legacy_user("0")
    ledger_balance_set(user, "0")
    DepositAddress.objects.create(address="0xcrash", chain="ETH", user_id=user)
    with CircleSandbox() as sandbox:
        settings.CIRCLE_API_BASE_URL = sandbox.base_url
        settings.CIRCLE_API_KEY = "sandbox-key"
        deliveries = []
        for index in range(1500):
            body = CircleSandbox.transfer_notification(
                notification_type="transfers.completed",
                transfer_id=f"crash-{index}",
                address="0xcrash",
                amount="1.25",
            )
            deliveries.append((body, sandbox.sign(body), sandbox.key_id))
        connection.close()
        child = multiprocessing.get_context("fork").Process(target=deliver, args=(deliveries,))
        child.start()
        deadline = time.time() + 60
        while time.time() < deadline and CircleNotification.objects.count() < 300:
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
        applied = BalanceMutation.objects.count()
        assert 0 < applied < 1500, "the kill should land mid-run"
        deliver(deliveries)  # Circle's redeliveries
    assert BalanceMutation.objects.count() == 1500
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("1875")
    assert Account.objects.get(user_id=user).balance == Decimal("1875")
    assert set(CircleNotification.objects.values_list("status", flat=True)) == {"processed"}
    assert all(check.ok for check in ledger_integrity_checks())

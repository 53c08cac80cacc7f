"""The USDC buffer's shards (ledger migration 0010): deposits post to the depositor's shard,
the buffer's balance is the sum over its shards wherever it is read (selectors, the treasury's
view, the cockpit's history), and a posting that takes from the buffer (a withdrawal's
completion, a conversion, a custody opening) first gathers the shards into the base in one
balanced transaction. Real PostgreSQL, the Circle and Due sandboxes over real HTTP."""

import time
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.utils import timezone

from cutover.balance_path import balance_credit
from cutover.models import CustodyOpening, LegacyBalance
from ledger.models import Account, Entry, Transaction
from ledger.selectors import (
    SHARDS,
    USDC_BUFFER,
    account_balance_history,
    ledger_integrity_checks,
    shard_codes,
    system_account,
    system_balance,
)
from ledger.services import Leg, system_account_gather, transaction_apply
from onchain.models import DepositAddress, Withdrawal
from onchain.selectors import buffer_status
from onchain.withdrawals import withdrawals_send
from rehearsal.runtime import processes_run
from tests.cutover.factories import custody_open_all, ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import buffer_fund, outbound, withdraw
from tests.treasury.factories import buffers, fund
from treasury.cycle import settlement_cycle_run
from treasury.models import ConversionJob
from treasury.monitor import monitor_run
from treasury.submission import jobs_submit

pytestmark = pytest.mark.django_db(transaction=True)


def shard_of(user_id) -> str:
    """The buffer's shard cutover_balance_mutate picks for this user."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT abs(hashtext(%s::text)::bigint) %% 64", [str(user_id)])
        shard = cursor.fetchone()[0]
    return USDC_BUFFER if shard == 0 else f"{USDC_BUFFER}#{shard}"


def depositor():
    """A user with 0 USDC in both stores whose buffer shard is not the base, so that what the
    tests deposit for such users sits on shards only."""
    user_id = uuid.uuid4()
    while shard_of(user_id) == USDC_BUFFER:
        user_id = uuid.uuid4()
    LegacyBalance.objects.create(user_id=user_id, buying_power=0, currency="USDC")
    ledger_balance_set(user_id, "0")
    return user_id


def shard_balances() -> dict[str, Decimal]:
    """Every account of the buffer with a balance, by code."""
    return dict(
        Account.objects.filter(code__in=shard_codes(USDC_BUFFER), user_id__isnull=True)
        .exclude(balance=0)
        .values_list("code", "balance")
    )


def integrity_ok() -> bool:
    return all(check.ok for check in ledger_integrity_checks())


def gathers() -> list[Transaction]:
    return list(Transaction.objects.filter(kind="shard_gather").order_by("pk"))


def gather_is_balanced_into_the_base(posting: Transaction) -> Decimal:
    """The gather's legs: one debit on the base of what the credits take from shards."""
    legs = list(Entry.objects.filter(transaction=posting).select_related("account"))
    debits = [leg for leg in legs if leg.side == "debit"]
    credits = [leg for leg in legs if leg.side == "credit"]
    assert [leg.account.code for leg in debits] == [USDC_BUFFER]
    assert credits and all(leg.account.code.startswith(f"{USDC_BUFFER}#") for leg in credits)
    assert debits[0].amount == sum(leg.amount for leg in credits)
    return debits[0].amount


def test_the_buffer_has_its_shards_like_its_base():
    base = Account.objects.get(code=USDC_BUFFER)
    shards = Account.objects.filter(code__in=shard_codes(USDC_BUFFER)[1:])
    assert shards.count() == SHARDS - 1
    assert {
        (a.account_type, a.currency_id, a.normal_balance, a.allow_negative, a.user_id)
        for a in shards
    } == {(base.account_type, base.currency_id, base.normal_balance, base.allow_negative, None)}
    # `_` is no wildcard for system_balance: an account named like one is not summed.
    assert not Account.objects.filter(code="usdcXbuffer").exists()
    assert system_balance(code="fiat_buffer") == 0


def test_deposits_spread_over_the_shards_and_the_buffer_is_their_sum(sandbox):
    """Circle deposits over the webhook, for many users: each lands on its user's shard."""
    phase_set("shadow")
    users, expected = [], Decimal(0)
    for index in range(24):
        user = legacy_user("0")
        ledger_balance_set(user, "0")
        address = f"0x{index + 1:040x}"
        DepositAddress.objects.create(address=address, chain="ETH", user_id=user)
        amount = Decimal(index + 1) + Decimal("0.5")
        sandbox.deposit(address=address, amount=str(amount))
        users.append((user, amount))
        expected += amount
    held = shard_balances()
    assert len(held) >= 8  # spread, not one row
    for user, amount in users:
        assert held[shard_of(user)] >= amount
    assert sum(held.values()) == expected == system_balance(code=USDC_BUFFER)
    assert buffer_status().balance == expected  # onchain's alert reads the sum
    assert buffers()["USDC"] == expected  # v_buffer_status sums the shards too
    assert gathers() == []  # deposits never gather
    assert integrity_ok()


def test_a_withdrawal_completion_gathers_the_shards_first(sandbox):
    """The buffer holds nothing in its base, only deposits on shards: the completion's credit
    on the base succeeds because the gather moved every shard's balance there first."""
    phase_set("shadow")
    users = []
    for index in range(10):
        user = depositor()
        address = f"0x{index + 1:040x}"
        DepositAddress.objects.create(address=address, chain="ETH", user_id=user)
        sandbox.deposit(address=address, amount="50")
        users.append(user)
    assert Account.objects.get(code=USDC_BUFFER).balance == 0
    assert len(shard_balances()) > 1 and system_balance(code=USDC_BUFFER) == 500

    withdrawal = withdraw(users[0], amount="30")
    assert withdrawals_send().submitted == 1
    [transfer] = outbound(sandbox)
    sandbox.transfer_finish(transfer["id"], "complete")
    withdrawal.refresh_from_db()
    assert withdrawal.status == "completed"

    [gather] = gathers()
    assert gather_is_balanced_into_the_base(gather) == 500
    assert shard_balances() == {USDC_BUFFER: Decimal(470)}  # every shard emptied
    assert system_balance(code=USDC_BUFFER) == 470
    assert Account.objects.get(code="withdrawals_pending_usdc").balance == 0
    # A deposit after it lands on a shard again; the next completion gathers only that.
    DepositAddress.objects.create(address="0x" + "f" * 40, chain="ETH", user_id=users[1])
    sandbox.deposit(address="0x" + "f" * 40, amount="7")
    second = withdraw(users[2], amount="20")
    withdrawals_send()
    transfer = next(t for t in outbound(sandbox) if t["id"] != transfer["id"])
    sandbox.transfer_finish(transfer["id"], "complete")
    second.refresh_from_db()
    assert second.status == "completed"
    assert gather_is_balanced_into_the_base(gathers()[-1]) == 7
    assert system_balance(code=USDC_BUFFER) == 457 == shard_balances()[USDC_BUFFER]
    assert Withdrawal.objects.filter(status="completed").count() == 2
    assert integrity_ok()


def test_a_conversion_out_of_the_usdc_buffer_gathers_its_shards(due):
    """30,000 USDC deposited over many users' shards (the balance path's deposits, as
    onchain_deposit_credit makes them): the treasury converts what lies above the minimum."""
    phase_set("shadow")
    for index in range(30):
        balance_credit(
            user_id=depositor(),
            amount="1000",
            reference=f"deposit-{index}",
            reason="circle_deposit",
            counterparty=USDC_BUFFER,
        )
    assert Account.objects.get(code=USDC_BUFFER).balance == 0
    assert len(shard_balances()) > 1 and buffers()["USDC"] == 30000
    settlement_cycle_run(triggered_by="test")
    job = ConversionJob.objects.get()
    assert (job.source_currency, job.source_amount) == ("USDC", Decimal("25000"))
    jobs_submit()
    due.finish(ConversionJob.objects.get().provider_reference, "completed")
    monitor_run()
    assert ConversionJob.objects.get().status == "completed"
    [gather] = gathers()
    assert gather_is_balanced_into_the_base(gather) == 30000
    assert shard_balances() == {USDC_BUFFER: Decimal(5000)}
    assert buffers() == {"USDC": Decimal("5000"), "USD": Decimal("25000")}
    assert integrity_ok()


def test_the_gather_without_shards_to_empty_posts_nothing():
    fund("fiat_buffer", "10")
    buffer_fund("5")
    with transaction.atomic():
        base, balance = system_account_gather(code="fiat_buffer")
        assert (base.code, balance) == ("fiat_buffer", Decimal(10))
        base, balance = system_account_gather(code=USDC_BUFFER)
        assert (base.code, balance) == (USDC_BUFFER, Decimal(5))
    assert gathers() == []
    with pytest.raises(RuntimeError, match=r"inside transaction\.atomic"):
        system_account_gather(code=USDC_BUFFER)


def test_custody_opening_counts_deposits_already_on_shards():
    """Deposits credited in shadow before custody opened sit on shards: the opening brings the
    whole buffer (their sum) to what Circle reports, after gathering them."""
    phase_set("shadow")
    for index in range(5):
        balance_credit(
            user_id=depositor(),
            amount="20",
            reference=f"early-{index}",
            reason="circle_deposit",
            counterparty=USDC_BUFFER,
        )
    assert Account.objects.get(code=USDC_BUFFER).balance == 0
    assert system_balance(code=USDC_BUFFER) == 100
    custody_open_all(usdc="250", usd="0")
    assert system_balance(code=USDC_BUFFER) == 250 == shard_balances()[USDC_BUFFER]
    [gather] = gathers()
    assert gather_is_balanced_into_the_base(gather) == 100
    opening = CustodyOpening.objects.get(currency="USDC")
    assert opening.buffer_before == 100  # the whole buffer, shards included
    assert integrity_ok()


def test_the_history_sums_the_shards():
    """Each posting commits on its own (its own now()), so the buckets can tell them apart."""
    custody_open_all(usdc="1000")
    phase_set("shadow")
    users = {}
    while len(users) < 3:  # three users on three different shards, none the base
        user = depositor()
        users.setdefault(shard_of(user), user)
    first, second, third = users.values()
    balance_credit(
        user_id=first, amount="10", reference="h0", reason="deposit", counterparty=USDC_BUFFER
    )
    time.sleep(0.01)
    before = timezone.now()
    balance_credit(
        user_id=second, amount="5", reference="h1", reason="deposit", counterparty=USDC_BUFFER
    )
    time.sleep(0.5)  # buckets wide enough for the next two postings to share one
    between = timezone.now()
    balance_credit(
        user_id=third, amount="2", reference="h2", reason="deposit", counterparty=USDC_BUFFER
    )
    balance_credit(
        user_id=first, amount="1", reference="h3", reason="deposit", counterparty=USDC_BUFFER
    )
    until = timezone.now() + timedelta(seconds=1)
    opening, changed = account_balance_history(
        code=USDC_BUFFER, since=before, until=until, width=between - before
    )
    assert opening == Decimal("1010")  # the base's 1000 and the first shard's 10
    assert min(changed) == before
    # Each bucket: every shard's last balance in it, the others' carried forward, summed.
    assert list(changed.values()) == [Decimal("1015"), Decimal("1018")]
    assert system_balance(code=USDC_BUFFER) == 1018
    assert integrity_ok()


def _deposits(users: list, amount: str) -> int:
    """One process of deposits: legacy-phase credits, mirrored (a shard debited, equity
    credited, in that account order: equity first)."""
    try:
        for user in users:
            balance_credit(
                user_id=user,
                amount=amount,
                reference=f"race-{user}",
                reason="circle_deposit",
                counterparty=USDC_BUFFER,
            )
    except Exception as exc:  # raised again as what a parent can unpickle, message kept
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None
    finally:
        connection.close()
    return len(users)


def _spends(rounds: int) -> int:
    """One process of payouts from the buffer against equity (a legacy-held withdrawal's
    completion): gather, then credit the base."""
    try:
        for _ in range(rounds):
            with transaction.atomic():
                system_account_gather(code=USDC_BUFFER, also=["opening_balance_equity_usdc"])
                transaction_apply(
                    namespace="test",
                    reference_id=f"spend:{uuid.uuid4()}",
                    kind="spend",
                    legs=[
                        Leg.debit(system_account(code="opening_balance_equity_usdc"), "1"),
                        Leg.credit(system_account(code=USDC_BUFFER), "1"),
                    ],
                )
    except Exception as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None
    finally:
        connection.close()
    return rounds


def _racer(kind: str, *args) -> int:
    return _deposits(*args) if kind == "deposits" else _spends(*args)


def test_gathers_race_deposits_without_deadlock():
    """Mirrored deposits (legacy, custody open: they lock equity, then their shard) race
    payouts that gather every shard: all of them lock in the one id order, so none deadlocks
    (a deadlock would raise 40P01 out of its process) and every unit is where it should be."""
    custody_open_all(usdc="1000")
    users = [legacy_user("0") for _ in range(240)]
    results = processes_run(
        _racer,
        [("deposits", users[n::3], "3") for n in range(3)] + [("spends", 40), ("spends", 40)],
    )
    assert results == [80, 80, 80, 40, 40]
    assert system_balance(code=USDC_BUFFER) == 1000 + 240 * 3 - 80
    assert Account.objects.get(code=USDC_BUFFER).balance > 0
    assert len(gathers()) > 1
    assert integrity_ok()

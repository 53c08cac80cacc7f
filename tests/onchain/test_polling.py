"""Issue 11, item 4: the poll reads every page of Circle's transfer list (newest first, older
pages by `pageAfter`) until its lookback is covered, parks a malformed transfer in the inbox
and goes on, marks the inbox rows parked for a transfer it credits processed, and brings each
submitted withdrawal to Circle's status whatever another's answer was. Against the Circle
sandbox over real HTTP and the real PostgreSQL."""

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from cutover.models import BalanceMutation
from onchain import circle
from onchain.models import CircleNotification, DepositAddress, Withdrawal
from onchain.polling import transfers_poll
from onchain.sandbox import CircleSandbox
from onchain.withdrawals import withdrawals_send
from tests.cutover.factories import phase_set
from tests.onchain.factories import balances, system, withdraw, withdrawal_transfer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def depositor(user):
    """The `user` (100 USDC in both stores, a buffer of 1000) with a deposit address, in
    shadow (a credit reaches both stores)."""
    phase_set("shadow")
    DepositAddress.objects.create(address="0xdeposit", chain="ETH", user_id=user)
    return user


def missed(sandbox, count: int, amount: str = "1.5") -> list[dict]:
    """Deposits whose webhook never came."""
    return [sandbox.deposit(address="0xdeposit", amount=amount, notify=False) for _ in range(count)]


def credited() -> set[str]:
    return set(
        BalanceMutation.objects.filter(reference__startswith="circle:transfer:").values_list(
            "reference", flat=True
        )
    )


def references(transfers: list[dict]) -> set[str]:
    return {f"circle:transfer:{t['id']}" for t in transfers}


def test_sandbox_lists_as_circle_documents(sandbox):
    """Newest first; `pageAfter` / `pageBefore` are exclusive ids; pageSize at most 50;
    `from` inclusive."""
    now = timezone.now().replace(microsecond=0)
    made = [
        sandbox.deposit(
            address="0xa", amount="1", notify=False, created=now - timedelta(minutes=70 - i)
        )
        for i in range(70)
    ]
    newest_first = [t["id"] for t in reversed(made)]

    def ids(**query) -> list[str]:
        params = {"destinationWalletId": sandbox.wallet_id, **query}
        path = "/v1/transfers?" + "&".join(f"{k}={v}" for k, v in params.items())
        return [t["id"] for t in circle._call(sandbox.base_url, "GET", path)["data"]]

    assert ids(pageSize=100) == newest_first[:50]
    assert ids(pageSize=10, pageAfter=newest_first[9]) == newest_first[10:20]
    assert ids(pageSize=10, pageBefore=newest_first[20]) == newest_first[10:20]
    assert ids(pageSize=5, pageBefore=newest_first[2]) == newest_first[:2]
    boundary = made[40]["createDate"]  # 30 minutes ago, exactly: included
    assert ids(**{"from": boundary}) == newest_first[:30]
    assert ids(**{"from": boundary, "to": made[59]["createDate"]}) == newest_first[10:30]
    with pytest.raises(circle.CircleRefused):
        ids(pageAfter=newest_first[0], pageBefore=newest_first[5])


def test_one_poll_credits_sixty_missed_deposits_over_two_pages_and_a_second_nothing(
    sandbox, depositor
):
    transfers = missed(sandbox, 60)
    report = transfers_poll()
    assert (report.deposits_seen, report.deposits_credited, report.deposits_malformed) == (
        60,
        60,
        0,
    )
    pages = [r for r in sandbox.list_requests if "destinationWalletId" in r]
    assert [(r["pageSize"], r.get("pageAfter")) for r in pages] == [
        ("50", None),
        ("50", transfers[10]["id"]),  # the oldest of the first page (newest first)
    ]
    assert credited() == references(transfers)
    assert balances(depositor) == (Decimal(190), Decimal(190))
    assert system("usdc_buffer") == 1090

    again = transfers_poll()
    assert (again.deposits_seen, again.deposits_credited) == (60, 0)
    assert BalanceMutation.objects.filter(reference__startswith="circle:transfer:").count() == 60
    assert balances(depositor) == (Decimal(190), Decimal(190))


def test_a_malformed_transfer_ending_a_page_is_parked_and_counted_once(sandbox, depositor):
    """It has no id to page past: the next page starts at the last transfer that has one and
    lists it again (once seen as two malformed transfers in one poll)."""
    good = missed(sandbox, 10)
    bad = sandbox.deposit(address="0xdeposit", amount="1.5", notify=False)
    good += missed(sandbox, 49)  # newer: the first page's 49, then the bad one, its 50th
    del bad["id"]
    report = transfers_poll()
    assert (report.deposits_seen, report.deposits_credited, report.deposits_malformed) == (
        60,
        59,
        1,
    )
    assert credited() == references(good)
    assert CircleNotification.objects.get().status == "parked"


def _no_id(transfer: dict) -> None:
    del transfer["id"]


def _no_amount(transfer: dict) -> None:
    del transfer["amount"]


def _bad_amount(transfer: dict) -> None:
    transfer["amount"]["amount"] = "12abc"


def _number_amount(transfer: dict) -> None:
    transfer["amount"]["amount"] = 12


def _number_id(transfer: dict) -> None:
    transfer["id"] = 12345


def _number_status(transfer: dict) -> None:
    transfer["status"] = 1


def _nothing_but_a_date(transfer: dict) -> None:
    transfer.clear()


def _nul_in_a_field_we_do_not_read(transfer: dict) -> None:
    # PostgreSQL stores no NUL in text: the whole page was refused as unreadable, and with it
    # the 59 good deposits (the list is read as strictly as a request to us).
    transfer["description"] = "a\x00b"


def _nul_in_the_id(transfer: dict) -> None:
    transfer["id"] = transfer["id"][:8] + "\x00" + transfer["id"][9:]


def _unpaired_surrogate_in_the_status(transfer: dict) -> None:
    transfer["status"] = "complete\ud800"


def _nested_deeper_than_the_boundary(transfer: dict) -> None:
    deep: dict = {}
    for _ in range(40):
        deep = {"a": deep}
    transfer["description"] = deep


@pytest.mark.parametrize(
    "poison",
    [
        _no_id,
        _no_amount,
        _bad_amount,
        _number_amount,
        _number_id,
        _number_status,
        _nothing_but_a_date,
        _nul_in_a_field_we_do_not_read,
        _nul_in_the_id,
        _unpaired_surrogate_in_the_status,
        _nested_deeper_than_the_boundary,
    ],
)
def test_a_poisoned_transfer_mid_page_is_parked_and_the_others_are_credited(
    sandbox, depositor, poison
):
    good = missed(sandbox, 30)
    bad = sandbox.deposit(address="0xdeposit", amount="1.5", notify=False)
    good += missed(sandbox, 29)
    poison(bad)
    if not bad:  # the sandbox lists only dated transfers into the wallet
        bad["createDate"] = good[0]["createDate"]
        bad["destination"] = {"type": "wallet", "id": sandbox.wallet_id}

    report = transfers_poll()
    assert (report.deposits_credited, report.deposits_malformed) == (59, 1)
    assert credited() == references(good)
    assert balances(depositor) == (Decimal("188.5"), Decimal("188.5"))
    parked = CircleNotification.objects.get()
    assert (parked.status, parked.notification_type) == ("parked", "poll.transfer")
    assert parked.notification_id.startswith("poll:") and parked.error

    again = transfers_poll()  # seen again, kept once, nothing credited twice
    assert (again.deposits_credited, again.deposits_malformed) == (0, 1)
    assert CircleNotification.objects.count() == 1
    assert balances(depositor) == (Decimal("188.5"), Decimal("188.5"))


def test_a_malformed_transfer_circle_corrects_is_credited_and_its_parked_row_processed(
    sandbox, depositor
):
    [transfer] = missed(sandbox, 1, amount="7")
    transfer["amount"]["amount"] = "7.0.0"
    assert transfers_poll().deposits_malformed == 1
    row = CircleNotification.objects.get(notification_id=f"poll:{transfer['id']}")
    assert row.status == "parked" and row.transfer_id == transfer["id"]

    transfer["amount"]["amount"] = "7"
    report = transfers_poll()
    assert (report.deposits_credited, report.notifications_resolved) == (1, 1)
    row.refresh_from_db()
    assert (row.status, row.error) == ("processed", "") and row.processed_at is not None
    assert balances(depositor) == (Decimal(107), Decimal(107))


def test_a_parked_notification_the_poll_credits_ends_processed(sandbox, user):
    """A deposit notified before its address was registered is parked; once the address is
    known, the poll credits it and marks the parked row processed in the same transaction.
    A row that names another amount for the same transfer stays parked for an operator."""
    phase_set("shadow")
    transfer = sandbox.deposit(address="0xlater", amount="12.5")  # the webhook parks it
    contradiction = CircleSandbox.transfer_notification(
        notification_type="transfers.completed",
        transfer_id=transfer["id"],
        address="0xlater",
        amount="99",
    )
    assert sandbox.deliver(sandbox.subscriber, contradiction)[0] == 200
    assert list(CircleNotification.objects.values_list("status", flat=True)) == ["parked"] * 2
    DepositAddress.objects.create(address="0xlater", chain="ETH", user_id=user)

    report = transfers_poll()
    assert (report.deposits_credited, report.notifications_resolved) == (1, 1)
    statuses = dict(
        CircleNotification.objects.values_list("body", "status").filter(transfer_id=transfer["id"])
    )
    assert sorted(statuses.values()) == ["parked", "processed"]
    assert statuses[contradiction.decode()] == "parked"
    assert balances(user) == (Decimal("112.5"), Decimal("112.5"))
    assert transfers_poll().deposits_credited == 0


def test_the_lookback_bounds_the_poll_even_when_circle_ignores_from(sandbox, depositor):
    now = timezone.now()
    old = [
        sandbox.deposit(
            address="0xdeposit", amount="1", notify=False, created=now - timedelta(hours=3)
        )
        for _ in range(60)
    ]
    edge = sandbox.deposit(
        address="0xdeposit",
        amount="1",
        notify=False,
        created=now - timedelta(hours=2) + timedelta(seconds=30),
    )
    recent = [edge, *missed(sandbox, 54, amount="1")]

    sandbox.ignore_from = True
    report = transfers_poll(lookback=timedelta(hours=2))
    assert report.deposits_credited == 55
    assert credited() == references(recent)
    pages = [r for r in sandbox.list_requests if "destinationWalletId" in r]
    assert len(pages) == 2  # the second page reached past the lookback: no third
    assert balances(depositor) == (Decimal(155), Decimal(155))

    sandbox.ignore_from = False
    assert transfers_poll(lookback=timedelta(hours=2)).deposits_seen == 55
    assert transfers_poll(lookback=timedelta(hours=4)).deposits_credited == 60
    assert credited() == references(recent + old)


def test_two_polls_at_once_credit_each_transfer_once(sandbox, depositor):
    transfers = missed(sandbox, 60)

    def poll():
        try:
            return transfers_poll()
        finally:
            connection.close()

    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: poll(), range(2)))
    assert sum(r.deposits_not_applied for r in reports) == 0
    assert credited() == references(transfers)
    assert BalanceMutation.objects.filter(reference__startswith="circle:transfer:").count() == 60
    assert balances(depositor) == (Decimal(190), Decimal(190))
    assert system("usdc_buffer") == 1090


def test_a_withdrawal_circle_has_no_answer_for_does_not_stop_the_others(sandbox, user):
    phase_set("shadow")
    lost, first, second = (withdraw(user, amount="10") for _ in range(3))
    withdrawals_send()
    sandbox.transfers.pop(withdrawal_transfer(lost))  # Circle answers 404 for it
    for withdrawal in (first, second):
        sandbox.transfer_finish(withdrawal_transfer(withdrawal), "complete", notify=False)

    report = transfers_poll()
    assert (report.withdrawals_checked, report.withdrawals_settled) == (3, 2)
    assert report.withdrawals_not_settled == 1
    statuses = {w.pk: w.status for w in Withdrawal.objects.all()}
    assert statuses == {lost.pk: "submitted", first.pk: "completed", second.pk: "completed"}
    assert system("usdc_buffer") == 980


def test_the_poll_reports_over_the_command(sandbox, depositor):
    missed(sandbox, 3)
    out = StringIO()
    call_command("onchain", "poll", "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert (report["deposits_credited"], report["deposits_malformed"]) == (3, 0)

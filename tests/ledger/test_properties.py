"""Property tests of the posting function: for random legs, currencies and amounts, either the
posting is applied exactly (every balance moves by its signed legs) or it is refused whole."""

from collections import defaultdict
from decimal import Decimal
from itertools import count

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.exceptions import InsufficientFunds, InvalidPosting, UnbalancedTransaction
from ledger.models import Account, Entry, Transaction
from ledger.money import CURRENCY_DECIMALS
from ledger.selectors import ledger_integrity_checks, system_account
from ledger.services import Leg, transaction_post
from tests.ledger.factories import UserAccountFactory, fund

pytestmark = pytest.mark.django_db(transaction=True)
references = count()

leg_strategy = st.tuples(
    st.integers(min_value=0, max_value=5),  # which user account of the currency
    st.sampled_from(["debit", "credit"]),
    st.integers(min_value=1, max_value=5_000_000),  # in minor units of the currency
)
posting_strategy = st.lists(
    st.tuples(st.sampled_from(sorted(CURRENCY_DECIMALS)), leg_strategy), min_size=1, max_size=8
)


@pytest.fixture
def accounts():
    users = {}
    for currency in CURRENCY_DECIMALS:
        users[currency] = [
            UserAccountFactory(currency_id=currency, account_type=f"{currency.lower()}_balance")
            for _ in range(6)
        ]
        for account in users[currency][:3]:
            fund(account, "1000")
    return users


def signed(account: Account, side: str, amount: Decimal) -> Decimal:
    return amount if side == account.normal_balance else -amount


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw_legs=posting_strategy, balance_it=st.booleans())
def test_posting_is_exact_or_refused_whole(accounts, raw_legs, balance_it):
    legs = []
    for currency, (index, side, minor) in raw_legs:
        account = accounts[currency][index]
        amount = Decimal(minor).scaleb(-CURRENCY_DECIMALS[currency])
        legs.append(Leg(account.pk, side, amount, currency))
    totals = defaultdict(Decimal)
    for leg in legs:
        totals[leg.currency] += leg.amount if leg.side == "debit" else -leg.amount
    if balance_it:
        for currency, difference in totals.items():
            if difference:
                clearing = system_account(code=f"deposits_clearing_{currency.lower()}")
                side = "credit" if difference > 0 else "debit"
                legs.append(Leg(clearing.pk, side, abs(difference), currency))
    balanced = balance_it or not any(totals.values())

    touched = {leg.account_id for leg in legs}
    before = dict(Account.objects.filter(pk__in=touched).values_list("pk", "balance"))
    by_id = Account.objects.in_bulk(touched)
    expected = dict(before)
    for leg in legs:
        expected[leg.account_id] += signed(by_id[leg.account_id], leg.side, leg.amount)
    overdrawn = any(expected[pk] < 0 and not by_id[pk].allow_negative for pk in touched)
    entries_before = Entry.objects.count()
    reference = f"prop-{next(references)}"

    if len(legs) < 2 or not balanced:
        error = InvalidPosting if len(legs) < 2 else UnbalancedTransaction
        with pytest.raises(error):
            transaction_post(namespace="prop", reference_id=reference, kind="random", legs=legs)
        outcome = before
    elif overdrawn:
        with pytest.raises(InsufficientFunds):
            transaction_post(namespace="prop", reference_id=reference, kind="random", legs=legs)
        outcome = before
    else:
        result = transaction_post(
            namespace="prop", reference_id=reference, kind="random", legs=legs
        )
        assert result.created
        outcome = expected
        assert Entry.objects.count() == entries_before + len(legs)

    after = dict(Account.objects.filter(pk__in=touched).values_list("pk", "balance"))
    assert after == outcome
    if outcome is before:
        assert Entry.objects.count() == entries_before
        assert not Transaction.objects.filter(reference_id=reference).exists()
    assert all(check.ok for check in ledger_integrity_checks())

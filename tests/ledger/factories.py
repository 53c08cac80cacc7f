"""Factories for ledger tests. Money only moves through transaction_post, so user accounts are
created empty and funded by `fund`."""

import uuid
from decimal import Decimal

import factory

from ledger.models import Account, Side
from ledger.selectors import system_account
from ledger.services import Leg, transaction_post


class UserAccountFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Account

    user_id = factory.LazyFunction(uuid.uuid4)
    account_type = "usdc_balance"
    currency_id = "USDC"
    normal_balance = Side.CREDIT
    allow_negative = False


def fund(account: Account, amount: Decimal | str, reference: str | None = None) -> None:
    """Give a user account an opening balance against opening-balance equity."""
    equity = system_account(code=f"opening_balance_equity_{account.currency_id.lower()}")
    transaction_post(
        namespace="test-opening",
        reference_id=reference or f"opening-{account.pk}-{uuid.uuid4().hex}",
        kind="opening_balance",
        legs=[Leg.debit(equity, Decimal(amount)), Leg.credit(account, Decimal(amount))],
    )

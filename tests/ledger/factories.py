"""Factories for ledger tests. Money only moves through transaction_post, so user accounts are
created empty and funded by `fund`."""

import uuid
from decimal import Decimal

import factory

from ledger.models import Account, Side
from ledger.services import opening_balance_post


class UserAccountFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Account

    user_id = factory.LazyFunction(uuid.uuid4)
    account_type = "usdc_balance"
    currency_id = "USDC"
    normal_balance = Side.CREDIT
    allow_negative = False


def fund(account: Account, amount: Decimal | str, reference: str | None = None) -> None:
    """Give a user account an opening balance (several calls give several)."""
    opening_balance_post(
        namespace="test-opening",
        account=account,
        amount=Decimal(amount),
        reference_id=reference or f"opening-{account.pk}-{uuid.uuid4().hex}",
    )

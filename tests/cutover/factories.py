"""Helpers to arrange the cutover's state for a test."""

import getpass
import uuid
from decimal import Decimal

from django.db import connection
from django.utils import timezone

from cutover.actors import Actor
from cutover.custody import custody_open
from cutover.models import LegacyBalance, PhaseState
from ledger.selectors import user_account_type
from ledger.services import account_open, opening_balance_post
from rehearsal import runtime

# How the commands name the operator running them (cutover.actors.Actor.command_line).
OPERATOR = f"cli:{getpass.getuser()}"


def legacy_user(amount: str | Decimal = "100", currency: str = "USDC") -> uuid.UUID:
    user_id = uuid.uuid4()
    LegacyBalance.objects.create(user_id=user_id, buying_power=Decimal(amount), currency=currency)
    return user_id


def ledger_balance_set(user_id: uuid.UUID, amount: str | Decimal, currency: str = "USDC"):
    """Give the user's ledger account this opening balance (as a backfill would)."""
    account = account_open(
        user_id=user_id, account_type=user_account_type(currency), currency=currency
    )
    if Decimal(amount):
        opening_balance_post(namespace="test-backfill", account=account, amount=Decimal(amount))
    return account


def phase_set(phase: str, read_percent: int = 0, kill_switch: bool = False) -> None:
    """Arrange a phase directly (the tests of the phase machine go through its service)."""
    PhaseState.objects.filter(pk=1).update(
        phase=phase,
        read_percent=read_percent,
        entered_at=timezone.now(),
        kill_switch=kill_switch,
        kill_switch_reason="test" if kill_switch else "",
    )


def database_url() -> str:
    """The test database's URL, for a child process (`manage.py` in a subprocess)."""
    return runtime.database_url(connection.settings_dict["NAME"])


def custody_open_all(usdc: str | Decimal = "0", usd: str | Decimal = "0") -> None:
    """Book both buffers' custody opening balances (the legacy -> shadow gate needs them)."""
    for currency, reported in (("USDC", usdc), ("USD", usd)):
        custody_open(
            currency=currency,
            reported=reported,
            source="test",
            actor=Actor("cli:test"),
            reason="custody opened for the test",
        )

"""Custody, read from the providers: what Circle reports for our wallet (USDC) and what Due
reports holding for us (USD) become the system buffers' opening balances, and are compared with
the buffers from then on (the booking itself is `cutover.custody`)."""

from decimal import Decimal

from django.conf import settings
from django.utils import timezone

from cutover.actors import Actor
from cutover.custody import CustodyComparison, CustodyReading, custody_open, custody_reconcile
from cutover.exceptions import CustodyRefused
from cutover.models import CustodyOpening
from ledger.selectors import BUFFER_ACCOUNTS
from onchain import circle
from onchain.selectors import deposits_not_yet_credited
from treasury import due

SOURCES = {"USDC": "circle", "USD": "due"}
CONSISTENT_READ_ATTEMPTS = 3


def custody_readings(currencies: list[str] | None = None) -> list[CustodyReading]:
    """Each custodian's balance now, over its API (CircleUnavailable / DueUnavailable when it
    cannot answer: nothing is booked or compared on a guess)."""
    readings = []
    for currency in currencies or list(BUFFER_ACCOUNTS):
        if SOURCES[currency] == "circle":
            reported = circle.wallet_balance()
        else:
            reported = due.balance_get(due.provider_base_url("due"), currency)
        readings.append(CustodyReading(currency, SOURCES[currency], reported))
    return readings


def custody_open_at(
    *,
    currency: str,
    reported: Decimal,
    uncredited: Decimal,
    source: str,
    actor: Actor,
    reason: str,
) -> CustodyOpening:
    """Book a buffer's opening balance from its custodian's reading, less the deposits in it
    not yet credited to anyone (`deposits_uncredited_at_circle`, read with it): their credit
    will bring them into the buffer, so booking them now would count them twice."""
    if uncredited:
        reason = f"{reason} ({source} reported {reported}, less {uncredited} not yet credited)"
    return custody_open(
        currency=currency,
        reported=Decimal(reported) - uncredited,
        source=source,
        actor=actor,
        reason=reason,
    )


def deposits_uncredited_at_circle() -> Decimal:
    """Deposits in our wallet credited to nobody yet: the inbox's, and every inbound transfer
    Circle lists within the poll's lookback (a deposit whose webhook has not come)."""
    since = timezone.now() - settings.ONCHAIN_DEPOSIT_POLL_LOOKBACK
    listed = circle.transfers_inbound(since=since.isoformat().replace("+00:00", "Z"))
    return deposits_not_yet_credited(listed)


def custody_open_from_providers(
    *, actor: Actor, reason: str, currencies: list[str] | None = None
) -> list[CustodyOpening]:
    """Book each buffer's opening balance at what its custodian reports now."""
    openings = []
    for currency in currencies or list(BUFFER_ACCOUNTS):
        # A deposit landing between the reading and the list of uncredited deposits would be
        # counted twice or not at all: read until the list is the same on both sides.
        for _ in range(CONSISTENT_READ_ATTEMPTS):
            before = deposits_uncredited_at_circle() if currency == "USDC" else Decimal(0)
            [reading] = custody_readings([currency])
            after = deposits_uncredited_at_circle() if currency == "USDC" else Decimal(0)
            if before == after:
                break
        else:
            raise CustodyRefused(
                f"{currency}: deposits kept arriving while the custodian was read; try again"
            )
        openings.append(
            custody_open_at(
                currency=reading.currency,
                reported=reading.reported,
                uncredited=after,
                source=reading.source,
                actor=actor,
                reason=reason,
            )
        )
    return openings


def custody_reconcile_from_providers() -> list[CustodyComparison]:
    """Compare every buffer with what its custodian reports; differences are recorded."""
    return custody_reconcile(readings=custody_readings())

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


def custody_readings(
    currencies: list[str] | None = None, *, circle_base_url: str, due_base_url: str
) -> list[CustodyReading]:
    """Each custodian's balance now, over its API (CircleUnavailable / DueUnavailable when it
    cannot answer: nothing is booked or compared on a guess)."""
    readings = []
    for currency in currencies or list(BUFFER_ACCOUNTS):
        if SOURCES[currency] == "circle":
            reported = circle.wallet_balance(base_url=circle_base_url)
        else:
            reported = due.balance_get(due_base_url, currency)
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


def deposits_uncredited_at_circle(*, base_url: str) -> Decimal:
    """Deposits in our wallet credited to nobody yet: the inbox's, and every inbound transfer
    Circle lists within the poll's lookback (a deposit whose webhook has not come)."""
    since = timezone.now() - settings.ONCHAIN_DEPOSIT_POLL_LOOKBACK
    listed = circle.transfers_inbound(base_url=base_url, since=since)
    return deposits_not_yet_credited(listed)


def custody_open_from_providers(
    *,
    actor: Actor,
    reason: str,
    currencies: list[str] | None = None,
    circle_base_url: str | None = None,
    due_base_url: str | None = None,
) -> list[CustodyOpening]:
    """Book each buffer's opening balance at what its custodian reports now (Circle at
    `circle_base_url`, Due at `due_base_url`; the settings' unless given)."""
    circle_base_url, due_base_url = _base_urls(circle_base_url, due_base_url)
    openings = []
    for currency in currencies or list(BUFFER_ACCOUNTS):
        # A deposit landing between the reading and the list of uncredited deposits would be
        # counted twice or not at all: read until the list is the same on both sides.
        for _ in range(CONSISTENT_READ_ATTEMPTS):
            before = _uncredited(currency, circle_base_url)
            [reading] = custody_readings(
                [currency], circle_base_url=circle_base_url, due_base_url=due_base_url
            )
            after = _uncredited(currency, circle_base_url)
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


def _uncredited(currency: str, circle_base_url: str) -> Decimal:
    if currency != "USDC":
        return Decimal(0)
    return deposits_uncredited_at_circle(base_url=circle_base_url)


def custody_reconcile_from_providers(
    *, circle_base_url: str | None = None, due_base_url: str | None = None
) -> list[CustodyComparison]:
    """Compare every buffer with what its custodian reports (Circle at `circle_base_url`, Due
    at `due_base_url`; the settings' unless given); differences are recorded."""
    circle_base_url, due_base_url = _base_urls(circle_base_url, due_base_url)
    return custody_reconcile(
        readings=custody_readings(circle_base_url=circle_base_url, due_base_url=due_base_url)
    )


def _base_urls(circle_base_url: str | None, due_base_url: str | None) -> tuple[str, str]:
    """Where Circle and Due answer: as given, else from the settings."""
    return (
        circle_base_url or settings.CIRCLE_API_BASE_URL,
        due_base_url or due.provider_base_url("due", due.provider_base_urls()),
    )

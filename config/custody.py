"""Custody, wired to the providers: what Circle reports for our wallet (USDC) and what Due
reports holding for us (USD) become the system buffers' opening balances, and are compared with
the buffers from then on. It lives here, at the top layer, because it reads both engines'
providers and the engines never import each other."""

from cutover.actors import Actor
from cutover.models import CustodyOpening
from cutover.selectors import CUSTODY_BUFFERS
from cutover.services import CustodyComparison, CustodyReading, custody_open, custody_reconcile
from onchain import circle
from treasury import due

SOURCES = {"USDC": "circle", "USD": "due"}


def custody_readings(currencies: list[str] | None = None) -> list[CustodyReading]:
    """Each custodian's balance now, over its API (CircleUnavailable / DueUnavailable when it
    cannot answer: nothing is booked or compared on a guess)."""
    readings = []
    for currency in currencies or list(CUSTODY_BUFFERS):
        if SOURCES[currency] == "circle":
            reported = circle.wallet_balance()
        else:
            reported = due.balance_get(due.provider_base_url("due"), currency)
        readings.append(CustodyReading(currency, SOURCES[currency], reported))
    return readings


def custody_open_from_providers(
    *, actor: Actor, reason: str, currencies: list[str] | None = None
) -> list[CustodyOpening]:
    """Book each buffer's opening balance at what its custodian reports now."""
    return [
        custody_open(
            currency=reading.currency,
            reported=reading.reported,
            source=reading.source,
            actor=actor,
            reason=reason,
        )
        for reading in custody_readings(currencies)
    ]


def custody_reconcile_from_providers() -> list[CustodyComparison]:
    """Compare every buffer with what its custodian reports; differences are recorded."""
    return custody_reconcile(readings=custody_readings())

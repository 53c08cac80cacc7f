"""Reads of the treasury: the buffers against their thresholds, providers in the order jobs go
to them."""

from dataclasses import dataclass
from decimal import Decimal

from django.db import connection

from treasury import due
from treasury.exceptions import ProviderNotConfigured
from treasury.models import ConversionProvider


@dataclass(frozen=True)
class BufferReading:
    currency: str
    account: str
    balance: Decimal
    minimum: Decimal
    target: Decimal
    maximum: Decimal
    state: str  # below_min | ok | above_max


def buffer_status_list() -> list[BufferReading]:
    """Every buffer with a threshold, from v_buffer_status (the ledger's system accounts)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT currency, account, balance, minimum, target, maximum, state "
            "FROM v_buffer_status ORDER BY currency"
        )
        return [BufferReading(*row) for row in cursor.fetchall()]


def provider_configured(code: str) -> bool:
    try:
        due.provider_base_url(code)
    except ProviderNotConfigured:
        return False
    return True


def provider_pick() -> ConversionProvider | None:
    """The enabled provider a new job goes to, among those whose API host the settings name:
    healthy ones first (failover), by priority; an unhealthy one only when none is healthy, so
    conversions are still attempted."""
    providers = ConversionProvider.objects.filter(enabled=True).order_by(
        "-healthy", "priority", "code"
    )
    return next((p for p in providers if provider_configured(p.code)), None)

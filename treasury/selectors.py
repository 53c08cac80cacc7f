"""Reads of the treasury: the buffers against their thresholds, what a conversion may take from
a buffer (what jobs already reserve from it), providers in the order jobs go to them."""

from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal

from django.db import connection
from django.db.models import Sum

from ledger.money import CURRENCY_DECIMALS
from ledger.selectors import (
    BUFFER_ACCOUNTS,
    WITHDRAWALS_PENDING_ACCOUNTS,
    system_account,
    system_balance,
)
from treasury import due
from treasury.exceptions import ProviderNotConfigured
from treasury.models import (
    RESERVING_STATUSES,
    BufferThreshold,
    ConversionJob,
    ConversionProvider,
    JobStatus,
)


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


def provider_health() -> list[tuple[str, bool]]:
    """Each enabled provider's code and whether it is healthy (failover order aside)."""
    return list(
        ConversionProvider.objects.filter(enabled=True)
        .order_by("code")
        .values_list("code", "healthy")
    )


def provider_configured(code: str) -> bool:
    try:
        due.provider_base_url(code, due.provider_base_urls())
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


def quantum(currency: str) -> Decimal:
    return Decimal(1).scaleb(-CURRENCY_DECIMALS[currency])


def reserved(source: str) -> Decimal:
    """What jobs already take, or may have taken, from the `source` buffer."""
    return ConversionJob.objects.filter(
        source_currency=source, status__in=RESERVING_STATUSES
    ).aggregate(total=Sum("source_amount"))["total"] or Decimal(0)


def withdrawals_held(source: str) -> Decimal:
    """What the `source` buffer still holds for withdrawals not yet settled: it leaves the
    buffer when they do."""
    code = WITHDRAWALS_PENDING_ACCOUNTS.get(source)
    return system_account(code=code).balance if code else Decimal(0)


def source_available(source: str) -> Decimal:
    """What a new conversion may take from the `source` buffer, in whole cents: what it holds
    above its own minimum (so feeding one buffer never puts the other below its band) less
    what pending withdrawals will take from it and what jobs already reserve from it."""
    minimum = BufferThreshold.objects.filter(currency=source).values_list("minimum", flat=True)
    balance = system_balance(code=BUFFER_ACCOUNTS[source]) - withdrawals_held(source)
    available = balance - (minimum.first() or Decimal(0)) - reserved(source)
    return max(available, Decimal(0)).quantize(quantum("USD"), rounding=ROUND_DOWN)


def jobs_for_an_operator() -> dict[str, int]:
    """Conversion jobs only an operator can end: disputed ones (treasury.operators.job_resolve)
    and completed ones Due refunds (job_reverse)."""
    return {
        "disputed": ConversionJob.objects.filter(status=JobStatus.DISPUTED).count(),
        "refunded": ConversionJob.objects.filter(
            status=JobStatus.COMPLETED, provider_status__in=due.REFUND_STATUSES
        ).count(),
    }

"""Custody: booking the system buffers' opening balances from what their providers report, and
reconciling the buffers' ledger balances with the providers' reported balances (custody
discrepancies)."""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from django.db import connection, transaction
from django.utils import timezone

from cutover import metrics
from cutover.actors import Actor
from cutover.exceptions import (
    CustodyRefused,
    ReasonRequired,
    ReconciliationBusy,
)
from cutover.locks import CUSTODY_RECONCILE_LOCK
from cutover.models import (
    CustodyDiscrepancy,
    CustodyOpening,
    DiscrepancyStatus,
)
from cutover.operator_audit import operator_action_record
from cutover.phase_machine import phase_lock_exclusive
from ledger.exceptions import InvalidAmount
from ledger.money import CURRENCY_DECIMALS, amount_parse
from ledger.selectors import BUFFER_ACCOUNTS, equity_account_code, system_account, system_balance
from ledger.services import Leg, system_account_gather, transaction_apply

CUSTODY_NAMESPACE = "custody"


def custody_reading_parse(value: Decimal | str, currency: str) -> Decimal:
    """A provider's reported balance in `currency`: zero (an empty wallet) or a positive amount
    with at most the currency's places. Negative figures are refused."""
    if currency not in BUFFER_ACCOUNTS:
        raise CustodyRefused(
            f"currency must be one of {', '.join(BUFFER_ACCOUNTS)}, not {currency!r}"
        )
    places = CURRENCY_DECIMALS[currency]
    # amount_parse takes positive amounts only; zero is a legitimate balance here.
    if isinstance(value, str) and re.fullmatch(r"0(\.0+)?", value):
        if len(value.partition(".")[2]) > places:
            raise CustodyRefused(
                f"reported: {value} has more than {places} decimal places for {currency}"
            )
        return Decimal(0)
    if isinstance(value, Decimal) and value.is_zero() and value.as_tuple().exponent >= -places:
        return Decimal(0)
    if (isinstance(value, str) and value.strip().startswith("-")) or (
        isinstance(value, Decimal) and value.is_signed()
    ):
        raise CustodyRefused(f"reported: a provider's balance cannot be negative, got {value}")
    try:
        return amount_parse(value, currency)
    except InvalidAmount as exc:
        raise CustodyRefused(f"reported: {exc}") from None


def custody_open(
    *, currency: str, reported: Decimal | str, source: str, actor: Actor, reason: str
) -> CustodyOpening:
    """Book a system buffer's opening balance from what its provider reports: the buffer
    (`usdc_buffer` for USDC, `fiat_buffer` for USD) is brought to `reported` against the
    currency's opening-balance equity (namespace `custody`, reference `opening:<CUR>`), once per
    currency, audited. From then on the balance path mirrors legacy-phase mutations of that
    currency in the ledger (cutover_balance_mutate), so the buffers stay right across phases.

    Takes the phase lock exclusively (mutations in flight finish under the old rule; none
    starts meanwhile) and the buffer's row locks, its shards' included (postings to it wait)."""
    actor.require("cutover.open_custody")
    amount = custody_reading_parse(reported, currency)
    if not isinstance(source, str) or not source.strip() or len(source) > 64:
        raise CustodyRefused(
            "source: name the provider that reported the balance (1..64 characters)"
        )
    if not reason.strip():
        raise ReasonRequired("opening custody needs a written --reason")
    with transaction.atomic(durable=True):
        phase_lock_exclusive()
        existing = CustodyOpening.objects.filter(currency=currency).first()
        if existing is not None:
            raise CustodyRefused(
                f"custody for {currency} is already open: {existing.reported} from "
                f"{existing.source} at {existing.opened_at:%Y-%m-%d %H:%M:%S}"
            )
        # The buffer's rows locked (postings to it wait) and its shards' money, deposits
        # credited before custody opened, gathered into the base: its balance is the buffer's.
        buffer, before = system_account_gather(
            code=BUFFER_ACCOUNTS[currency], also=[equity_account_code(currency)]
        )
        equity = system_account(code=equity_account_code(currency))
        difference = amount - before
        posting = None
        if difference:
            posting = transaction_apply(
                namespace=CUSTODY_NAMESPACE,
                reference_id=f"opening:{currency}",
                kind="custody_opening",
                legs=[Leg.debit(buffer, difference), Leg.credit(equity, difference)]
                if difference > 0
                else [Leg.debit(equity, -difference), Leg.credit(buffer, -difference)],
                metadata={"source": source, "reported": str(amount), "buffer_before": str(before)},
            )
        opening = CustodyOpening.objects.create(
            currency=currency,
            reported=amount,
            source=source.strip(),
            buffer_before=before,
            ledger_transaction_id=posting.transaction_id if posting else None,
            opened_by=actor.name,
            reason=reason,
        )
        operator_action_record(
            actor=actor,
            action="custody.open",
            target=f"custody:{currency}",
            before={"opened": False, "buffer": str(before)},
            after={
                "opened": True,
                "buffer": str(amount),
                "reported": str(amount),
                "source": opening.source,
                "ledger_transaction_id": opening.ledger_transaction_id,
            },
            reason=reason,
        )
    return opening


@dataclass(frozen=True)
class CustodyReading:
    """What a provider reports it holds for us in one currency."""

    currency: str
    source: str
    reported: Decimal | str


@dataclass(frozen=True)
class CustodyComparison:
    currency: str
    source: str
    ledger_balance: Decimal
    reported: Decimal
    difference: Decimal  # ledger - reported
    discrepancy_id: int | None  # the open custody discrepancy, None when they agree
    resolved: bool  # an open discrepancy was resolved by this run

    @property
    def agrees(self) -> bool:
        return not self.difference


def custody_reconcile(*, readings: Iterable[CustodyReading]) -> list[CustodyComparison]:
    """Compare each system buffer's ledger balance with what its provider reports; record a
    custody discrepancy when they differ (one open row per currency and source; later
    sightings update it), resolve the open one when they agree again. One run at a time
    (CUSTODY_RECONCILE_LOCK; a second is refused with ReconciliationBusy). Every reading is
    validated before anything is written."""
    parsed = []
    for reading in readings:
        if not isinstance(reading.source, str) or not reading.source.strip():
            raise CustodyRefused("source: every reading names its provider")
        parsed.append(
            (
                reading.currency,
                reading.source,
                custody_reading_parse(reading.reported, reading.currency),
            )
        )
    comparisons = []
    with transaction.atomic(durable=True):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [CUSTODY_RECONCILE_LOCK])
            if not cursor.fetchone()[0]:
                raise ReconciliationBusy("another custody reconciliation is running")
        now = timezone.now()
        for currency, source, reported in parsed:
            balance = system_balance(code=BUFFER_ACCOUNTS[currency])
            difference = balance - reported
            found = (
                CustodyDiscrepancy.objects.select_for_update()
                .filter(currency=currency, source=source, status=DiscrepancyStatus.OPEN)
                .first()
            )
            resolved = False
            if difference and found is None:
                found = CustodyDiscrepancy.objects.create(
                    currency=currency,
                    source=source,
                    ledger_balance=balance,
                    reported=reported,
                    difference=difference,
                )
                transaction.on_commit(metrics.custody_discrepancies.inc)
            elif difference:
                found.ledger_balance, found.reported, found.difference = (
                    balance,
                    reported,
                    difference,
                )
                found.occurrences += 1
                found.last_seen_at = now
                found.save()
            elif found is not None:
                found.status = DiscrepancyStatus.RESOLVED
                found.resolved_at = found.last_seen_at = now
                found.save()
                resolved, found = True, None
            comparisons.append(
                CustodyComparison(
                    currency,
                    source,
                    balance,
                    reported,
                    difference,
                    found.pk if found else None,
                    resolved,
                )
            )
    return comparisons

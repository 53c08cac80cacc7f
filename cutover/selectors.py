"""Reads of the cutover: the phase, balances from the phase's read source, the stores compared
(the gates' evidence is built from them in cutover.gates)."""

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from uuid import UUID

from django.db import connection
from django.db.models import Count, Exists, Max, OuterRef, Q, QuerySet
from django.db.models.functions import Now
from django.utils import timezone

from cutover.exceptions import CurrencyNotHeld
from cutover.models import (
    UNRESOLVED,
    BalanceMutation,
    CustodyDiscrepancy,
    CustodyOpening,
    Discrepancy,
    DiscrepancyStatus,
    KnownDifference,
    LedgerStatus,
    LegacyArchive,
    OperatorAudit,
    PhaseState,
    ReconciliationRun,
    RunStatus,
    StrictFailure,
)
from cutover.phases import Phase
from gateway.log_context import log_context_bind
from ledger import metrics as ledger_metrics
from ledger.selectors import (
    BUFFER_ACCOUNTS,
    Snapshot,
    system_balance,
    user_balances_written_since,
)


def user_currency(user_id: UUID) -> str | None:
    """The one currency a user holds (legacy row first, else the ledger account), None for a
    user with neither yet."""
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT currency FROM balances WHERE user_id = %s
               UNION ALL
               SELECT currency FROM ledger_user_balances WHERE user_id = %s
               LIMIT 1""",
            [user_id, user_id],
        )
        row = cursor.fetchone()
    return row[0] if row else None


def phase_state() -> PhaseState:
    return PhaseState.objects.get(pk=1)


def read_bucket(user_id: UUID) -> int:
    """A stable bucket 0..99 from a hash of the user id: the same user reads the same store at a
    given percentage, and raising the percentage only adds users."""
    return int.from_bytes(hashlib.sha256(user_id.bytes).digest()[:8], "big") % 100


def read_source(state: PhaseState, user_id: UUID) -> str:
    if state.phase == Phase.LEGACY or state.phase == Phase.SHADOW:
        return "legacy"
    if state.phase == Phase.READ_SWITCH:
        return "ledger" if read_bucket(user_id) < state.read_percent else "legacy"
    return "ledger"


@dataclass(frozen=True)
class BalanceReading:
    user_id: UUID
    currency: str
    amount: Decimal
    source: str
    phase: str


LEGACY_READ_SQL = "SELECT buying_power, currency FROM balances WHERE user_id = %s"
LEDGER_READ_SQL = "SELECT balance, currency FROM ledger_user_balances WHERE user_id = %s"


def balance_get(*, user_id: UUID, currency: str = "USDC") -> BalanceReading:
    """The user's balance from the store the phase reads (0 for a user never seen);
    CurrencyNotHeld when that store holds the user in another currency (found from outside:
    a user holding 25 USD read as 0 USDC, a funded user told they had nothing)."""
    state = phase_state()
    log_context_bind(phase=state.phase)  # the rest of the request's log lines name it
    source = read_source(state, user_id)
    with connection.cursor() as cursor:
        if source == "ledger":
            cursor.execute(LEDGER_READ_SQL, [user_id])
            ledger_metrics.account_balance_checked.labels(source="read").inc()
        else:
            cursor.execute(LEGACY_READ_SQL, [user_id])
        row = cursor.fetchone()
    if row and row[1] != currency:
        raise CurrencyNotHeld(f"user {user_id} holds {row[1]}, not {currency}")
    amount = row[0] if row else Decimal(0)
    return BalanceReading(user_id, currency, amount, source, state.phase)


def legacy_archive_get() -> LegacyArchive | None:
    """The legacy store's archive (cutover.legacy_archive), or None while it is not archived."""
    return LegacyArchive.objects.first()


def custody_opened(currency: str) -> bool:
    """Whether the buffer of `currency` has its custody opening balance booked."""
    return CustodyOpening.objects.filter(currency=currency).exists()


def custody_status() -> list[dict]:
    """Per custody currency: whether it is open (and from what), the buffer's ledger balance
    now, and its open custody discrepancies."""
    openings = {o.currency: o for o in CustodyOpening.objects.all()}
    rows = []
    for currency, code in BUFFER_ACCOUNTS.items():
        opening = openings.get(currency)
        rows.append(
            {
                "currency": currency,
                "buffer": code,
                "buffer_balance": system_balance(code=code),
                "opened": opening is not None,
                "opened_at": opening.opened_at if opening else None,
                "opened_by": opening.opened_by if opening else None,
                "source": opening.source if opening else None,
                "reported_at_opening": opening.reported if opening else None,
                "open_discrepancies": CustodyDiscrepancy.objects.filter(
                    currency=currency, status=DiscrepancyStatus.OPEN
                ).count(),
            }
        )
    return rows


def known_difference_matching() -> QuerySet[KnownDifference]:
    """The active known-difference rules that match the discrepancy of the outer query: the
    same user, currency and difference (legacy - ledger) to the last unit, not yet expired."""
    return KnownDifference.objects.filter(
        user_id=OuterRef("user_id"),
        currency=OuterRef("currency"),
        difference=OuterRef("difference"),
        expires_at__gt=Now(),
    )


def discrepancies_counted() -> QuerySet[Discrepancy]:
    """The discrepancies that count against the gates: unresolved (open, investigating or a
    known difference) and matched by no active known-difference rule."""
    return Discrepancy.objects.filter(status__in=UNRESOLVED).filter(
        ~Exists(known_difference_matching())
    )


def open_discrepancy_count() -> int:
    """Discrepancies counting against the gates (discrepancies_counted)."""
    return discrepancies_counted().count()


def known_difference_count() -> int:
    """Unresolved discrepancies an active known-difference rule keeps from counting."""
    return (
        Discrepancy.objects.filter(status__in=UNRESOLVED)
        .filter(Exists(known_difference_matching()))
        .count()
    )


def known_difference_for(discrepancy: Discrepancy) -> KnownDifference | None:
    """The active known-difference rule that keeps `discrepancy` from counting, if any (the one
    that runs longest)."""
    return (
        KnownDifference.objects.filter(
            user_id=discrepancy.user_id,
            currency=discrepancy.currency,
            difference=discrepancy.difference,
            expires_at__gt=Now(),
        )
        .order_by("-expires_at", "-id")
        .first()
    )


def discrepancy_history(discrepancy_id: int) -> QuerySet[OperatorAudit]:
    """What operators did to a discrepancy, oldest first."""
    return OperatorAudit.objects.filter(target=f"discrepancy:{discrepancy_id}").order_by("at", "id")


def store_balances(user_id: UUID, currency: str) -> tuple[Decimal | None, Decimal | None]:
    """The user's legacy and ledger balance in `currency` now (None where a store has no row
    or account), without locks."""
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT (SELECT buying_power FROM balances WHERE user_id = %s AND currency = %s),
                      (SELECT balance FROM ledger_user_balances
                        WHERE user_id = %s AND currency = %s)""",
            [user_id, currency, user_id, currency],
        )
        return cursor.fetchone()


def open_custody_discrepancy_count() -> int:
    return CustodyDiscrepancy.objects.filter(status=DiscrepancyStatus.OPEN).count()


def strict_failure_count_in_phase(state: PhaseState) -> int:
    """Requests strict mode failed since the current phase began (what the cutover gate reads)."""
    return StrictFailure.objects.filter(at__gte=state.entered_at).count()


def reconciliation_age(state: PhaseState) -> timedelta:
    """How long the phase has gone without a reconciliation: since the last run finished, or
    since the phase began when no run finished after that."""
    last = ReconciliationRun.objects.filter(status=RunStatus.COMPLETED).aggregate(
        last=Max("finished_at")
    )["last"]
    since = max(last, state.entered_at) if last else state.entered_at
    return timezone.now() - since


# Users whose ledger balance is not their legacy balance: a missing account counts as 0.
DIFFERENCES_SQL = """
    SELECT coalesce(b.user_id, a.user_id) AS user_id,
           coalesce(b.currency, a.currency) AS currency,
           b.buying_power AS legacy, a.balance AS ledger
      FROM balances b
      FULL JOIN ledger_user_balances a ON a.user_id = b.user_id AND a.currency = b.currency
     WHERE coalesce(b.buying_power, 0) <> coalesce(a.balance, 0)
"""
TOTALS_SQL = """
    SELECT (SELECT coalesce(sum(buying_power), 0) FROM balances),
           (SELECT coalesce(sum(balance), 0) FROM ledger_user_balances),
           (SELECT count(*) FROM balances)
"""


# About this many legacy rows sampled per range boundary (TABLESAMPLE SYSTEM).
SAMPLE_ROWS_PER_CHUNK = 100


def user_range_bounds(chunk_users: int) -> list:
    """[None, b1, ..., None]: user_id bounds splitting the legacy users into ranges of about
    `chunk_users` (quantiles of a block sample; the open ends take users outside them, and
    ledger accounts without a legacy row): a reconciliation's chunks, a backfill's ranges."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = 'balances'::regclass")
        (estimate,) = cursor.fetchone()
        if estimate < 10 * chunk_users:  # never analysed, or small: count them
            cursor.execute("SELECT count(*) FROM balances")
            (estimate,) = cursor.fetchone()
        chunks = max(1, -(-estimate // chunk_users))
        if chunks == 1:
            return [None, None]
        percent = min(100.0, 100.0 * SAMPLE_ROWS_PER_CHUNK * chunks / estimate)
        sample = f"TABLESAMPLE SYSTEM ({percent})" if percent < 100 else ""
        cursor.execute(
            f"SELECT percentile_disc(%s::float8[]) WITHIN GROUP (ORDER BY user_id) "
            f"FROM balances {sample}",
            [[i / chunks for i in range(1, chunks)]],
        )
        (quantiles,) = cursor.fetchone()
    return [None, *sorted(set(q for q in quantiles or [] if q is not None)), None]


def backfill_pending() -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM ({DIFFERENCES_SQL}) d WHERE d.legacy IS NOT NULL")
        return cursor.fetchone()[0]


def store_differences(limit: int = 20) -> tuple[int, list[dict]]:
    """How many users differ between the stores, and the first few."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM ({DIFFERENCES_SQL}) d")
        (count,) = cursor.fetchone()
        cursor.execute(f"{DIFFERENCES_SQL} ORDER BY 1 LIMIT %s", [limit])
        rows = cursor.fetchall()
    return count, [
        {"user_id": str(u), "currency": c, "legacy": str(legacy), "ledger": str(ledger)}
        for u, c, legacy, ledger in rows
    ]


# The users either store wrote after a snapshot (equality_proof(since=...)), compared as
# DIFFERENCES_SQL compares every user.
DIFFERENCES_AMONG_SQL = """
    SELECT coalesce(b.user_id, a.user_id), coalesce(b.currency, a.currency), b.buying_power,
           a.balance
      FROM (SELECT * FROM balances WHERE user_id = ANY(%(users)s)) b
      FULL JOIN (SELECT * FROM ledger_user_balances WHERE user_id = ANY(%(users)s)) a
        ON a.user_id = b.user_id AND a.currency = b.currency
     WHERE coalesce(b.buying_power, 0) <> coalesce(a.balance, 0)
     ORDER BY 1
"""


@dataclass
class StoresSince:
    """What the stores wrote after a snapshot in which every user was equal: the users written
    (in either store) that differ now, and both totals."""

    written: int
    differing: list[dict]
    legacy_total: Decimal
    ledger_total: Decimal
    legacy_users: int

    @property
    def equal(self) -> bool:
        return not self.differing and self.legacy_total == self.ledger_total


def stores_written_since(since: Snapshot) -> StoresSince:
    """Every user either store wrote after `since` compared, and the totals, in one pass over
    each store. The users neither store wrote are as they were in the snapshot; a row deleted
    since would move its store's total (no balance is negative), so equal totals cover it."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT coalesce(sum(b.buying_power), 0), count(*),
                       coalesce(array_agg(b.user_id) FILTER (WHERE {since.written_after("b")}),
                                '{{}}')
                  FROM balances b""",
            since.params,
        )
        legacy_total, legacy_users, legacy_written = cursor.fetchone()
        ledger_total, _, ledger_written = user_balances_written_since(since)
        users = sorted(set(legacy_written) | set(ledger_written))
        cursor.execute(DIFFERENCES_AMONG_SQL, {"users": users})
        differing = [
            {"user_id": str(u), "currency": c, "legacy": str(legacy), "ledger": str(ledger)}
            for u, c, legacy, ledger in cursor.fetchall()
        ]
    return StoresSince(len(users), differing, legacy_total, ledger_total, legacy_users)


def store_totals() -> dict:
    with connection.cursor() as cursor:
        cursor.execute(TOTALS_SQL)
        legacy, ledger, users = cursor.fetchone()
    return {"legacy_total": str(legacy), "ledger_total": str(ledger), "legacy_users": users}


def ledger_write_stats(since) -> dict:
    counts = BalanceMutation.objects.filter(created_at__gte=since).aggregate(
        posted=Count("id", filter=Q(ledger_status=LedgerStatus.POSTED)),
        failed=Count("id", filter=Q(ledger_status=LedgerStatus.FAILED)),
    )
    strict = StrictFailure.objects.filter(at__gte=since).count()
    attempts = counts["posted"] + counts["failed"] + strict
    rate = Decimal(counts["posted"]) / attempts if attempts else None
    return {**counts, "strict_failures": strict, "attempts": attempts, "success_rate": rate}

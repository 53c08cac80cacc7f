"""Backfill: bringing every user's ledger balance to their legacy balance with opening-balance
postings, online, chunk by chunk, resumable and idempotent."""

from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

from django.db import connection, transaction

from cutover.exceptions import (
    KillSwitchEngaged,
    NotApplicable,
)
from cutover.phase_machine import phase_lock_shared
from cutover.phases import (
    Phase,
)
from cutover.selectors import (
    DIFFERENCES_SQL,
    phase_state,
)
from gateway.faults import fault_point
from ledger.selectors import (
    account_lock,
    equity_account_code,
    system_account,
    user_account_type,
)
from ledger.services import Leg, account_open, transaction_apply

BACKFILL_NAMESPACE = "backfill"

BACKFILL_CANDIDATES_SQL = f"""
    SELECT d.user_id, d.currency FROM ({DIFFERENCES_SQL}) d
     WHERE d.legacy IS NOT NULL AND d.user_id > %s
     ORDER BY d.user_id LIMIT %s
"""
BACKFILL_LOCK_ROWS_SQL = """
    SELECT user_id, buying_power, currency FROM balances
     WHERE user_id = ANY(%s) ORDER BY user_id FOR UPDATE
"""


@dataclass
class BackfillResult:
    users_examined: int = 0
    postings: int = 0
    amount: Decimal = Decimal(0)
    remaining: int = 0


def backfill_run(*, chunk_size: int = 500, on_progress=None) -> BackfillResult:
    """Bring every user's ledger balance to their legacy balance with opening-balance postings
    (against opening-balance equity), chunk by chunk, each chunk one transaction.

    Online: each user's legacy row is locked while its posting is computed and written, so a
    concurrent mutation waits and is not lost or counted twice. Resumable and idempotent: what
    is posted is the difference found under that lock, so a run killed at any point resumes by
    running again, and a finished user is never posted twice."""
    result = BackfillResult()
    cursor_user = UUID(int=0)
    while True:
        with transaction.atomic(durable=True):
            phase_lock_shared()
            state = phase_state()
            if state.kill_switch:
                raise KillSwitchEngaged(f"kill switch engaged: {state.kill_switch_reason}")
            if state.phase == Phase.CUTOVER:
                raise NotApplicable("after cutover the legacy store is no longer the source")
            with connection.cursor() as cursor:
                cursor.execute(BACKFILL_CANDIDATES_SQL, [cursor_user, chunk_size])
                candidates = [row[0] for row in cursor.fetchall()]
                if not candidates:
                    break
                cursor.execute(BACKFILL_LOCK_ROWS_SQL, [candidates])
                rows = cursor.fetchall()
            for user_id, legacy, currency in rows:
                posted = _backfill_user(user_id, legacy, currency)
                fault_point("backfill:user-posted")
                result.users_examined += 1
                if posted:
                    result.postings += 1
                    result.amount += abs(posted)
            cursor_user = candidates[-1]
        if on_progress:
            on_progress(result.users_examined)
    return result


def _backfill_user(user_id: UUID, legacy: Decimal, currency: str) -> Decimal:
    """Post the difference between the user's legacy and ledger balance; returns it."""
    account = account_open(
        user_id=user_id, account_type=user_account_type(currency), currency=currency
    )
    ledger, entries = account_lock(account_id=account.pk)
    difference = legacy - ledger
    if not difference:
        return Decimal(0)
    equity = system_account(code=equity_account_code(currency))
    legs = (
        [Leg.debit(equity, difference), Leg.credit(account, difference)]
        if difference > 0
        else [Leg.debit(account, -difference), Leg.credit(equity, -difference)]
    )
    transaction_apply(
        namespace=BACKFILL_NAMESPACE,
        # Unique per state of the account: a re-run after a committed posting finds no
        # difference; one after a rolled-back chunk posts under the same reference.
        reference_id=f"{user_id}:{entries}",
        kind="opening_balance" if entries == 0 else "backfill_adjustment",
        legs=legs,
        metadata={"user_id": str(user_id), "legacy_balance": str(legacy)},
    )
    return difference

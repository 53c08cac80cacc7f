"""Reads from the ledger, including the integrity checks behind `ledger verify`."""

from dataclasses import dataclass, field
from decimal import Decimal

from django.db import connection, transaction

from ledger import metrics
from ledger.models import GENESIS_HASH, Account

# System accounts others name (ledger migration 0003): the buffer of each custody currency
# (what Circle's wallet and the bank/Due hold for us) and opening-balance equity per currency.
USDC_BUFFER = "usdc_buffer"
BUFFER_ACCOUNTS = {"USDC": USDC_BUFFER, "USD": "fiat_buffer"}


def equity_account_code(currency: str) -> str:
    return f"opening_balance_equity_{currency.lower()}"


def user_account_type(currency: str) -> str:
    """The account type of a user's balance account in `currency` (in SQL,
    ledger_user_account_type(), ledger/sql/ledger.sql)."""
    return f"{currency.lower()}_balance"


def account_lock(*, account_id: int) -> tuple[Decimal, int]:
    """Lock an account's row until the end of the transaction (as posting to it does) and
    return its balance and entry count, for a caller that decides a posting from them."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT balance, entry_count FROM ledger_accounts WHERE id = %s FOR UPDATE",
            [account_id],
        )
        return cursor.fetchone()


def system_account(*, code: str) -> Account:
    return Account.objects.get(code=code, user_id__isnull=True)


def account_balance(*, account_id: int) -> Decimal:
    """The cached balance, kept by the database when posting (never summed on read)."""
    balance = Account.objects.values_list("balance", flat=True).get(pk=account_id)
    metrics.account_balance_checked.labels(source="read").inc()
    return balance


# The window's entries are found from the last entry before it (a backward scan of the
# account's (account_id, seq) index that stops there), so the cost is the window's entries,
# not the account's whole history.
BALANCE_BEFORE_SQL = """
    SELECT seq, balance_after FROM ledger_entries
     WHERE account_id = %s AND created_at < %s ORDER BY seq DESC LIMIT 1
"""
BALANCE_PER_BUCKET_SQL = """
    SELECT DISTINCT ON (1) date_bin(%s, created_at, %s) AS bucket, balance_after
      FROM ledger_entries
     WHERE account_id = %s AND seq > %s AND created_at < %s
     ORDER BY 1, seq DESC
"""


def account_balance_history(*, code: str, since, until, width) -> tuple[Decimal, dict]:
    """A system account's balance over time, from its entries' `balance_after`: the balance
    when `since` began, and {bucket start: the balance at the bucket's last entry} for the
    buckets of `width` (from `since`) in which it changed before `until`."""
    account_id = system_account(code=code).pk
    with connection.cursor() as cursor:
        cursor.execute(BALANCE_BEFORE_SQL, [account_id, since])
        before = cursor.fetchone()
        seq, opening = before if before else (0, Decimal(0))
        cursor.execute(BALANCE_PER_BUCKET_SQL, [width, since, account_id, seq, until])
        return opening, dict(cursor.fetchall())


@dataclass
class IntegrityCheck:
    name: str
    description: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# Each check counts what it looked at and lists what is wrong (at most PROBLEM_LIMIT rows).
PROBLEM_LIMIT = 50

_SIGNED = "CASE WHEN e.side = a.normal_balance THEN e.amount ELSE -e.amount END"

UNBALANCED_SQL = """
    SELECT transaction_id, currency,
           coalesce(sum(amount) FILTER (WHERE side = 'debit'), 0),
           coalesce(sum(amount) FILTER (WHERE side = 'credit'), 0)
      FROM ledger_entries
     GROUP BY transaction_id, currency
    HAVING coalesce(sum(amount) FILTER (WHERE side = 'debit'), 0)
        <> coalesce(sum(amount) FILTER (WHERE side = 'credit'), 0)
     ORDER BY transaction_id LIMIT %s
"""
TOO_FEW_LEGS_SQL = """
    SELECT t.id, count(e.id) FROM ledger_transactions t
      LEFT JOIN ledger_entries e ON e.transaction_id = t.id
     GROUP BY t.id HAVING count(e.id) < 2 ORDER BY t.id LIMIT %s
"""
CACHED_BALANCE_SQL = f"""
    SELECT a.id, a.balance, coalesce(s.total, 0), a.entry_count, coalesce(s.legs, 0)
      FROM ledger_accounts a
      LEFT JOIN (SELECT e.account_id, sum({_SIGNED}) AS total, count(*) AS legs
                   FROM ledger_entries e JOIN ledger_accounts a ON a.id = e.account_id
                  GROUP BY e.account_id) s ON s.account_id = a.id
     WHERE a.balance <> coalesce(s.total, 0) OR a.entry_count <> coalesce(s.legs, 0)
     ORDER BY a.id LIMIT %s
"""
CHAIN_SQL = f"""
    WITH chain AS (
        SELECT e.id, e.account_id, e.seq, e.hash, e.prev_hash, e.balance_after,
               ledger_entry_hash(e.prev_hash, e.id, e.transaction_id, e.account_id, e.currency,
                                 e.side, e.amount, e.seq) AS recomputed,
               lag(e.hash) OVER w AS previous_hash,
               row_number() OVER w AS position,
               sum({_SIGNED}) OVER w AS running_balance
          FROM ledger_entries e JOIN ledger_accounts a ON a.id = e.account_id
        WINDOW w AS (PARTITION BY e.account_id ORDER BY e.seq)
    )
    SELECT account_id, id, seq,
           CASE WHEN hash <> recomputed THEN 'hash does not match the entry'
                WHEN prev_hash <> coalesce(previous_hash, %s) THEN 'link to previous entry broken'
                WHEN seq <> position THEN 'sequence gap'
                ELSE 'balance_after does not match the running sum' END
      FROM chain
     WHERE hash <> recomputed OR prev_hash <> coalesce(previous_hash, %s)
        OR seq <> position OR balance_after <> running_balance
     ORDER BY account_id, seq LIMIT %s
"""
CHAIN_HEAD_SQL = """
    SELECT a.id FROM ledger_accounts a
      LEFT JOIN ledger_entries e ON e.account_id = a.id AND e.seq = a.entry_count
     WHERE a.last_hash <> coalesce(e.hash, %s)
     ORDER BY a.id LIMIT %s
"""


def _count(sql: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def _rows(sql: str, params: list) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def ledger_integrity_checks() -> list[IntegrityCheck]:
    """Every rule of the ledger, re-checked from the stored rows in set-based SQL (seed 001
    "Verify double-entry integrity"). Called outside a transaction it reads one REPEATABLE READ
    snapshot, so postings committed meanwhile cannot produce false alarms."""
    if connection.in_atomic_block:
        return _integrity_checks()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return _integrity_checks()


def _integrity_checks() -> list[IntegrityCheck]:
    balanced = IntegrityCheck(
        "balanced", "every transaction's debits equal its credits per currency"
    )
    legs = IntegrityCheck("two_legs", "every transaction has at least two entries")
    cached = IntegrityCheck("cached_balances", "every cached balance equals the sum of its entries")
    chains = IntegrityCheck("hash_chains", "every account's hash chain is intact")

    transactions = _count("SELECT count(*) FROM ledger_transactions")
    entries = _count("SELECT count(*) FROM ledger_entries")
    accounts = _count("SELECT count(*) FROM ledger_accounts")

    balanced.checked = legs.checked = transactions
    for txn, currency, debits, credits in _rows(UNBALANCED_SQL, [PROBLEM_LIMIT]):
        balanced.problems.append(
            f"transaction {txn}: {currency} debits {debits} != credits {credits}"
        )
    for txn, count in _rows(TOO_FEW_LEGS_SQL, [PROBLEM_LIMIT]):
        legs.problems.append(f"transaction {txn}: {count} entries")

    cached.checked = accounts
    for account, balance, total, entry_count, counted in _rows(CACHED_BALANCE_SQL, [PROBLEM_LIMIT]):
        cached.problems.append(
            f"account {account}: cached balance {balance} but entries sum to {total} "
            f"({entry_count} recorded entries, {counted} found)"
        )
    metrics.account_balance_checked.labels(source="verify").inc(accounts)

    chains.checked = entries
    for account, entry, seq, what in _rows(CHAIN_SQL, [GENESIS_HASH, GENESIS_HASH, PROBLEM_LIMIT]):
        chains.problems.append(f"account {account}, entry {entry} (seq {seq}): {what}")
    for (account,) in _rows(CHAIN_HEAD_SQL, [GENESIS_HASH, PROBLEM_LIMIT]):
        chains.problems.append(f"account {account}: last_hash is not its last entry's hash")
    return [balanced, legs, cached, chains]

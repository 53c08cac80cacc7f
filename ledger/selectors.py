"""Reads from the ledger, including the integrity checks behind `ledger verify`."""

from dataclasses import dataclass, field
from decimal import Decimal

from django.db import connection, transaction

from ledger import metrics
from ledger.models import GENESIS_HASH, Account, Transaction

# System accounts others name (ledger migration 0003): the buffer of each custody currency
# (what Circle's wallet and the bank/Due hold for us) and opening-balance equity per currency.
USDC_BUFFER = "usdc_buffer"
BUFFER_ACCOUNTS = {"USDC": USDC_BUFFER, "USD": "fiat_buffer"}
# What on-chain withdrawals hold until they settle, when it leaves the buffer for the chain.
WITHDRAWALS_PENDING_ACCOUNTS = {"USDC": "withdrawals_pending_usdc"}
# A hot system account is sharded: shard 0 is the account `code` itself, shards 1..SHARDS-1 are
# `code#1` .. `code#63` (clearing accounts: ledger migrations 0004 and 0008; the USDC buffer:
# 0010; opening-balance equity: 0011). cutover_balance_mutate picks a user's shard by
# hashtext(user_id) modulo 64; a backfill chunk posts against its user range's equity shard.
SHARDS = 64


def shard_codes(code: str) -> list[str]:
    """The codes of every shard of the system account `code`, the base (shard 0) first. An
    unsharded account has no row for its shards 1..63: reading them finds only the base."""
    return [code] + [f"{code}#{shard}" for shard in range(1, SHARDS)]


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


SYSTEM_BALANCE_SQL = """
    SELECT coalesce(sum(balance), 0) FROM ledger_accounts
     WHERE user_id IS NULL AND code = ANY(%s)
"""


def system_balance(*, code: str) -> Decimal:
    """A system account's balance summed over its shards (the base `code` and `code#1` ..
    `code#63`, named one by one: LIKE would take `_` for a wildcard): what the USDC buffer
    holds, whose deposits post to the depositor's shard. An unsharded account: its balance."""
    with connection.cursor() as cursor:
        cursor.execute(SYSTEM_BALANCE_SQL, [shard_codes(code)])
        return cursor.fetchone()[0]


def transaction_reference(*, transaction_id: int) -> tuple[str, str] | None:
    """A ledger transaction's (namespace, reference_id), or None when there is no such
    transaction."""
    return (
        Transaction.objects.filter(pk=transaction_id)
        .values_list("namespace", "reference_id")
        .first()
    )


def account_balance(*, account_id: int) -> Decimal:
    """The cached balance, kept by the database when posting (never summed on read)."""
    balance = Account.objects.values_list("balance", flat=True).get(pk=account_id)
    metrics.account_balance_checked.labels(source="read").inc()
    return balance


# Each shard's window is found from its last entry before it (a backward scan of the account's
# (account_id, seq) index that stops there), so the cost is the window's entries, not the
# accounts' whole history.
BALANCE_BEFORE_SQL = """
    SELECT a.id, coalesce(b.seq, 0), coalesce(b.balance_after, 0)
      FROM unnest(%s::bigint[]) AS a(id)
      LEFT JOIN LATERAL (
          SELECT e.seq, e.balance_after FROM ledger_entries e
           WHERE e.account_id = a.id AND e.created_at < %s ORDER BY e.seq DESC LIMIT 1
      ) b ON true
"""
BALANCE_PER_BUCKET_SQL = """
    SELECT DISTINCT ON (e.account_id, 2) e.account_id,
           date_bin(%s, e.created_at, %s) AS bucket, e.balance_after
      FROM ledger_entries e
      JOIN unnest(%s::bigint[], %s::bigint[]) AS w(account_id, seq) ON w.account_id = e.account_id
     WHERE e.account_id = ANY(%s) AND e.seq > w.seq AND e.created_at < %s
     ORDER BY e.account_id, 2, e.seq DESC
"""


def account_balance_history(*, code: str, since, until, width) -> tuple[Decimal, dict]:
    """A system account's balance summed over its shards, over time, from its entries'
    `balance_after`: the balance when `since` began, and {bucket start: the balance at the
    bucket's end} for the buckets of `width` (from `since`) in which it changed before `until`
    (each shard's last balance in a bucket, carried forward into the buckets it did not move
    in, summed). Two queries, whatever the number of shards."""
    account_ids = list(
        Account.objects.filter(code__in=shard_codes(code), user_id__isnull=True)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if not account_ids:
        raise Account.DoesNotExist(f"no system account {code!r}")
    with connection.cursor() as cursor:
        cursor.execute(BALANCE_BEFORE_SQL, [account_ids, since])
        before = {account_id: (seq, balance) for account_id, seq, balance in cursor.fetchall()}
        seqs = [before[account_id][0] for account_id in account_ids]
        cursor.execute(
            BALANCE_PER_BUCKET_SQL,
            [width, since, account_ids, seqs, account_ids, until],
        )
        rows = cursor.fetchall()
    current = {account_id: balance for account_id, (_, balance) in before.items()}
    opening = sum(current.values(), Decimal(0))
    per_bucket: dict = {}
    for account_id, bucket, balance in rows:
        per_bucket.setdefault(bucket, {})[account_id] = balance
    changed = {}
    for bucket in sorted(per_bucket):
        current.update(per_bucket[bucket])
        changed[bucket] = sum(current.values(), Decimal(0))
    return opening, changed


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


@dataclass(frozen=True)
class Snapshot:
    """A PostgreSQL snapshot (pg_current_snapshot()) and the rows written after it: by a
    transaction it does not see (one that began after it, or was in flight when it was taken).
    A row's 32-bit xmin is widened against the snapshot's xmin; a row older than that xmin
    (a frozen one too) counts as seen."""

    text: str
    xmin: int  # pg_snapshot_xmin, as an xid8

    def written_after(self, alias: str) -> str:
        """SQL: `alias`'s row was written after the snapshot (parameters from `params`). The
        cheap test first: a row older than the snapshot's xmin (by age(), frozen ones too)
        was seen; only the others are widened and looked up in the snapshot."""
        age = f"(({alias}.xmin::text::bigint - %(snapshot_xmin_low)s + 4294967296) & 4294967295)"
        return (
            f"(age({alias}.xmin) <= age(%(snapshot_xmin_low)s::text::xid) AND {age} < 2147483648"
            f" AND NOT pg_visible_in_snapshot((%(snapshot_xmin)s + {age})::text::xid8,"
            " %(snapshot)s::pg_snapshot))"
        )

    @property
    def params(self) -> dict:
        return {
            "snapshot": self.text,
            "snapshot_xmin": self.xmin,
            "snapshot_xmin_low": self.xmin & 0xFFFFFFFF,
        }


def snapshot_now() -> Snapshot:
    """The snapshot of the current statement (in REPEATABLE READ, of the transaction)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_current_snapshot()::text, pg_snapshot_xmin(pg_current_snapshot())::text"
        )
        text, xmin = cursor.fetchone()
    return Snapshot(text, int(xmin))


def user_balances_written_since(since: Snapshot) -> tuple[Decimal, int, list]:
    """The total of users' balance accounts, their count, and the users whose account was
    written (opened or moved) after `since`, in one pass."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT coalesce(sum(a.balance), 0), count(*),
                       coalesce(array_agg(a.user_id) FILTER (WHERE {since.written_after("a")}),
                                '{{}}')
                  FROM ledger_accounts a
                 WHERE a.user_id IS NOT NULL
                   AND a.account_type = ledger_user_account_type(a.currency)""",
            since.params,
        )
        return cursor.fetchone()


def ledger_integrity_checks(since: Snapshot | None = None) -> list[IntegrityCheck]:
    """Every rule of the ledger, re-checked from the stored rows in set-based SQL (seed 001
    "Verify double-entry integrity"). Called outside a transaction it reads one REPEATABLE READ
    snapshot, so postings committed meanwhile cannot produce false alarms.

    With `since` (a snapshot in which a full check was clean), only what was written after it:
    its transactions, each of its entries against the entry before it in its account's chain,
    and the head and cached balance of each account it touched. Entries and transactions are
    never changed once written (ledger.sql), so by induction the whole ledger is as clean as
    the full check: the final proof a gate takes under the write fence."""
    if connection.in_atomic_block:
        return _integrity_checks(since)
    with transaction.atomic():
        with connection.cursor() as cursor:
            # (read-write only for the temporary table of the entries written since)
            mode = "" if since else ", READ ONLY"
            cursor.execute(f"SET TRANSACTION ISOLATION LEVEL REPEATABLE READ{mode}")
        return _integrity_checks(since)


# What was written after a snapshot (ledger_integrity_checks(since=...)): each new entry against
# the entry before it in its account's chain, new transactions, and the accounts they touched
# (an account's balance, count and head move only with an entry: ledger_account_guard).
NEW_ENTRIES_SQL = "SELECT e.* FROM ledger_entries e WHERE {written}"
NEW_ENTRIES_GATHERED = "SELECT * FROM ledger_new_entries"
NEW_UNBALANCED_SQL = """
    WITH new AS (SELECT DISTINCT transaction_id FROM ({new}) n)
    SELECT e.transaction_id, e.currency,
           coalesce(sum(e.amount) FILTER (WHERE e.side = 'debit'), 0),
           coalesce(sum(e.amount) FILTER (WHERE e.side = 'credit'), 0)
      FROM ledger_entries e JOIN new USING (transaction_id)
     GROUP BY e.transaction_id, e.currency
    HAVING coalesce(sum(e.amount) FILTER (WHERE e.side = 'debit'), 0)
        <> coalesce(sum(e.amount) FILTER (WHERE e.side = 'credit'), 0)
     ORDER BY 1 LIMIT %(limit)s
"""
NEW_TOO_FEW_LEGS_SQL = """
    SELECT t.id, (SELECT count(*) FROM ledger_entries e WHERE e.transaction_id = t.id)
      FROM ledger_transactions t
     WHERE {written}
       AND (SELECT count(*) FROM ledger_entries e WHERE e.transaction_id = t.id) < 2
     ORDER BY t.id LIMIT %(limit)s
"""
NEW_CHAIN_SQL = """
    SELECT n.account_id, n.id, n.seq,
           CASE WHEN n.hash <> ledger_entry_hash(n.prev_hash, n.id, n.transaction_id,
                                                 n.account_id, n.currency, n.side, n.amount,
                                                 n.seq) THEN 'hash does not match the entry'
                WHEN n.prev_hash <> coalesce(p.hash, %(genesis)s)
                  OR (p.id IS NULL AND n.seq <> 1) THEN 'link to previous entry broken'
                ELSE 'balance_after does not match the running sum' END
      FROM ({new}) n
      JOIN ledger_accounts a ON a.id = n.account_id
      LEFT JOIN ledger_entries p ON p.account_id = n.account_id AND p.seq = n.seq - 1
     WHERE n.hash <> ledger_entry_hash(n.prev_hash, n.id, n.transaction_id, n.account_id,
                                       n.currency, n.side, n.amount, n.seq)
        OR n.prev_hash <> coalesce(p.hash, %(genesis)s) OR (p.id IS NULL AND n.seq <> 1)
        OR n.balance_after <> coalesce(p.balance_after, 0)
           + CASE WHEN n.side = a.normal_balance THEN n.amount ELSE -n.amount END
     ORDER BY 1, 3 LIMIT %(limit)s
"""
NEW_HEADS_SQL = """
    WITH touched AS (SELECT DISTINCT account_id FROM ({new}) n)
    SELECT a.id, a.balance, a.entry_count, a.last_hash,
           coalesce(l.balance_after, 0), coalesce(l.seq, 0), coalesce(l.hash, %(genesis)s)
      FROM touched t JOIN ledger_accounts a ON a.id = t.account_id
      LEFT JOIN LATERAL (SELECT e.balance_after, e.seq, e.hash FROM ledger_entries e
                          WHERE e.account_id = a.id ORDER BY e.seq DESC LIMIT 1) l ON true
     WHERE a.balance <> coalesce(l.balance_after, 0) OR a.entry_count <> coalesce(l.seq, 0)
        OR a.last_hash <> coalesce(l.hash, %(genesis)s)
     ORDER BY a.id LIMIT %(limit)s
"""


def _new_rows(sql: str, since: Snapshot, alias: str = "t") -> list[tuple]:
    """`sql` over what was written after `since`: {new} the new entries (gathered once by
    _new_entries_gather), {written} the snapshot's test on `alias`."""
    params = {**since.params, "limit": PROBLEM_LIMIT, "genesis": GENESIS_HASH}
    return _rows(sql.format(new=NEW_ENTRIES_GATHERED, written=since.written_after(alias)), params)


def _new_entries_gather(since: Snapshot) -> None:
    """The entries written after `since`, in a temporary table of this transaction: one pass
    over ledger_entries for every check that reads them."""
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS ledger_new_entries")
        cursor.execute(
            "CREATE TEMPORARY TABLE ledger_new_entries ON COMMIT DROP AS "
            + NEW_ENTRIES_SQL.format(written=since.written_after("e")),
            since.params,
        )


def _integrity_checks_since(since: Snapshot) -> list[IntegrityCheck]:
    balanced = IntegrityCheck(
        "balanced", "every new transaction's debits equal its credits per currency"
    )
    legs = IntegrityCheck("two_legs", "every new transaction has at least two entries")
    cached = IntegrityCheck(
        "cached_balances", "every touched account's cached balance is its last entry's"
    )
    chains = IntegrityCheck("hash_chains", "every new entry extends its account's chain")
    _new_entries_gather(since)
    for txn, currency, debits, credits in _new_rows(NEW_UNBALANCED_SQL, since):
        balanced.problems.append(
            f"transaction {txn}: {currency} debits {debits} != credits {credits}"
        )
    for txn, count in _new_rows(NEW_TOO_FEW_LEGS_SQL, since):
        legs.problems.append(f"transaction {txn}: {count} entries")
    for account, entry, seq, what in _new_rows(NEW_CHAIN_SQL, since):
        chains.problems.append(f"account {account}, entry {entry} (seq {seq}): {what}")
    for account, balance, count, head, last_balance, last_seq, last_hash in _new_rows(
        NEW_HEADS_SQL, since
    ):
        if (balance, count) != (last_balance, last_seq):
            cached.problems.append(
                f"account {account}: cached balance {balance} but its last entry says "
                f"{last_balance} ({count} recorded entries, last seq {last_seq})"
            )
        if head != last_hash:
            chains.problems.append(f"account {account}: last_hash is not its last entry's hash")
    return [balanced, legs, cached, chains]


def _integrity_checks(since: Snapshot | None = None) -> list[IntegrityCheck]:
    if since is not None:
        return _integrity_checks_since(since)
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

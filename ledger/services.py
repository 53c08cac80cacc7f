"""Writes to the ledger. `transaction_post` is the one posting path for money: everything that
moves money calls it (or `transaction_apply`, its form inside a caller's transaction)."""

import json
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import psycopg
from django.conf import settings
from django.db import DatabaseError, connection, transaction

from ledger import metrics
from ledger.exceptions import (
    InvalidPosting,
    UnbalancedTransaction,
    ledger_error_from,
    sqlstate_of,
)
from ledger.models import Account, Side
from ledger.money import CURRENCY_DECIMALS, amount_format, amount_parse
from ledger.selectors import equity_account_code, shard_codes, system_account

# Serialization failures and deadlocks: the posting is retried from the start.
RETRYABLE_SQLSTATES = {"40001", "40P01"}
MAX_REFERENCE_LENGTH = 255
MAX_NAME_LENGTH = 64
USER_ACCOUNT_NORMAL_BALANCE = Side.CREDIT  # what the company owes a user: a liability


@dataclass(frozen=True)
class Leg:
    account_id: int
    side: str
    amount: Decimal
    currency: str

    @classmethod
    def debit(cls, account: Account, amount: Decimal | str) -> "Leg":
        return cls(account.pk, Side.DEBIT, Decimal(amount), account.currency_id)

    @classmethod
    def credit(cls, account: Account, amount: Decimal | str) -> "Leg":
        return cls(account.pk, Side.CREDIT, Decimal(amount), account.currency_id)


@dataclass(frozen=True)
class PostingResult:
    transaction_id: int
    created: bool  # False: an idempotent replay of an earlier posting with the same reference


def _name_check(field: str, value: str, limit: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidPosting(f"{field} must be a non-empty string")
    if len(value) > limit:
        raise InvalidPosting(f"{field} is longer than {limit} characters")


def _legs_payload(legs: list[Leg]) -> str:
    """Validate the legs (shape, amounts, balance per currency) and encode them for the database."""
    if len(legs) < 2:
        raise InvalidPosting("a transaction needs at least two legs")
    totals: dict[str, Decimal] = defaultdict(Decimal)
    rows = []
    for index, leg in enumerate(legs):
        if leg.side not in Side.values:
            raise InvalidPosting(f"leg {index}: side must be debit or credit, not {leg.side!r}")
        if leg.currency not in CURRENCY_DECIMALS:
            raise InvalidPosting(f"leg {index}: unknown currency {leg.currency!r}")
        amount = amount_parse(leg.amount, leg.currency)
        totals[leg.currency] += amount if leg.side == Side.DEBIT else -amount
        rows.append(
            {
                "account_id": int(leg.account_id),
                "side": leg.side,
                "amount": amount_format(amount, leg.currency),
                "currency": leg.currency,
            }
        )
    for currency, difference in totals.items():
        if difference:
            raise UnbalancedTransaction(
                f"debits and credits differ by {abs(difference)} {currency}"
            )
    return json.dumps(rows)


POST_SQL = "SELECT transaction_id, created FROM ledger_post_transaction(%s, %s, %s, %s, %s)"


def _posting_execute(
    namespace: str, reference_id: str, kind: str, legs: list[Leg], metadata: dict | None
) -> PostingResult:
    _name_check("namespace", namespace, MAX_NAME_LENGTH)
    _name_check("reference_id", reference_id, MAX_REFERENCE_LENGTH)
    _name_check("kind", kind, MAX_NAME_LENGTH)
    payload = _legs_payload(legs)
    params = [namespace, reference_id, kind, json.dumps(metadata or {}), payload]
    # The driver's own cursor with a server-side prepared statement: the hottest statement of
    # the service skips Django's cursor wrappers and PostgreSQL's parse/plan on every call.
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(POST_SQL, params, prepare=True)
        transaction_id, created = cursor.fetchone()
    return PostingResult(transaction_id=transaction_id, created=created)


def transaction_apply(
    *,
    namespace: str,
    reference_id: str,
    kind: str,
    legs: list[Leg],
    metadata: dict[str, Any] | None = None,
) -> PostingResult:
    """Post inside the caller's database transaction (for example the savepoint of a dual write).

    Locks the legs' account rows, in account order, until the caller's transaction ends. The
    balance rule is checked again by PostgreSQL at the caller's COMMIT.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("transaction_apply must run inside transaction.atomic()")
    try:
        result = _posting_execute(namespace, reference_id, kind, legs, metadata)
    except DatabaseError as exc:
        raise (ledger_error_from(exc) or exc) from exc
    if result.created:
        transaction.on_commit(metrics.transaction_created.labels(kind=kind).inc)
    return result


def transaction_post(
    *,
    namespace: str,
    reference_id: str,
    kind: str,
    legs: list[Leg],
    metadata: dict[str, Any] | None = None,
) -> PostingResult:
    """Post a balanced transaction in a database transaction of its own; idempotent on
    (namespace, reference_id). Serialization failures and deadlocks are retried a bounded
    number of times (LEDGER_POSTING_MAX_ATTEMPTS).

    The posting is one statement run in autocommit mode, which PostgreSQL makes one
    transaction (deferred balance checks included): the guarantee of atomic(durable=True) in
    one round trip instead of three. Inside atomic(), use transaction_apply.
    """
    if connection.in_atomic_block:
        raise RuntimeError(
            "transaction_post commits on its own; inside transaction.atomic() use transaction_apply"
        )
    attempts = settings.LEDGER_POSTING_MAX_ATTEMPTS
    for attempt in range(1, attempts + 1):
        started = time.perf_counter()
        try:
            result = _posting_execute(namespace, reference_id, kind, legs, metadata)
        except DatabaseError as exc:
            error = ledger_error_from(exc)
            if error is not None:
                raise error from exc
            state = sqlstate_of(exc)
            if state in RETRYABLE_SQLSTATES and attempt < attempts:
                metrics.transaction_retried.labels(sqlstate=state).inc()
                time.sleep(random.uniform(0, 0.005 * 2**attempt))  # noqa: S311 (jitter)
                continue
            raise
        metrics.transaction_duration_ms.observe((time.perf_counter() - started) * 1000)
        if result.created:
            metrics.transaction_created.labels(kind=kind).inc()
        return result
    raise AssertionError("unreachable: the loop returns or raises")


def system_account_gather(*, code: str, also: Iterable[str] = ()) -> tuple[Account, Decimal]:
    """Bring a sharded system account's money back to its base, inside the caller's
    transaction, before a posting that takes from it (a credit leg on the USDC buffer: no shard
    may go below zero, so the base alone must hold what leaves).

    Locks the rows of the base, its shards and the system accounts `also` (the other accounts
    of the caller's posting) in id order, the one global order in which postings lock accounts:
    only system accounts, and every one the caller's posting will lock, so it cannot deadlock
    with a deposit (one shard and a user's account) nor with a posting holding one of `also`
    while it waits for a shard (a legacy mirror: equity, then a shard). Then, when any shard
    holds a balance, posts one balanced transaction (kind `shard_gather`) debiting the base what
    the shards hold and crediting each shard its balance. Returns the base and its balance, now
    the whole account's; both stay locked until the caller's transaction ends."""
    if not connection.in_atomic_block:
        raise RuntimeError("system_account_gather must run inside transaction.atomic()")
    shards = shard_codes(code)
    accounts = list(
        Account.objects.select_for_update()
        .filter(code__in=[*shards, *also], user_id__isnull=True)
        .order_by("pk")
    )
    base = next((account for account in accounts if account.code == code), None)
    if base is None:
        raise Account.DoesNotExist(f"no system account {code!r}")
    held = [a for a in accounts if a.code in shards and a is not base and a.balance]
    if held:
        total = sum((account.balance for account in held), Decimal(0))
        transaction_apply(
            namespace="ledger",
            reference_id=f"{code}:{uuid4()}",
            kind="shard_gather",
            legs=[Leg.debit(base, total)]
            + [Leg.credit(account, account.balance) for account in held],
            metadata={"gathered": {account.code: str(account.balance) for account in held}},
        )
        base.balance += total
    return base, base.balance


def opening_balance_post(
    *, namespace: str, account: Account, amount: Decimal, reference_id: str | None = None
) -> PostingResult:
    """Give an account its opening balance against the currency's opening-balance equity.
    Idempotent: one opening balance per account and namespace unless a reference is given."""
    equity = system_account(code=equity_account_code(account.currency_id))
    return transaction_post(
        namespace=namespace,
        reference_id=reference_id or f"opening-{account.pk}",
        kind="opening_balance",
        legs=[Leg.debit(equity, amount), Leg.credit(account, amount)],
    )


def account_open(*, user_id: UUID, account_type: str, currency: str) -> Account:
    """The user's account of this type and currency, created on first use (idempotent)."""
    _name_check("account_type", account_type, MAX_NAME_LENGTH)
    if currency not in CURRENCY_DECIMALS:
        raise InvalidPosting(f"unknown currency {currency!r}")
    # get_or_create falls back to a second read when a concurrent open wins the unique race.
    account, _ = Account.objects.get_or_create(
        user_id=user_id,
        account_type=account_type,
        currency_id=currency,
        defaults={"normal_balance": USER_ACCOUNT_NORMAL_BALANCE, "allow_negative": False},
    )
    return account


def user_accounts_open(*, user_ids: list[UUID], currency: str) -> int:
    """Open many users' balance accounts in `currency` in one statement
    (ledger_user_accounts_open; an account that exists, or that a unique rule refuses, is
    skipped): how many were opened."""
    if currency not in CURRENCY_DECIMALS:
        raise InvalidPosting(f"unknown currency {currency!r}")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT ledger_user_accounts_open(%s::uuid[], %s::text[])",
            [user_ids, [currency] * len(user_ids)],
        )
        return cursor.fetchone()[0]


def ledger_statistics_refresh() -> None:
    """ANALYZE the ledger's tables, for a caller that grows them many times over in minutes
    (the backfill into an empty ledger): the planner's estimates follow, and so do the plans
    every connection has cached for them (ANALYZE invalidates those), which were made when the
    tables were small (a sequential scan of a few rows, then of a million)."""
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE ledger_accounts, ledger_transactions, ledger_entries")

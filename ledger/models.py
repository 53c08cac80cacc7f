"""The double-entry ledger: currencies, accounts, transactions and their entries.

What PostgreSQL itself enforces (see ledger/sql/ledger.sql and the constraints below):
- every transaction has at least two entries and balances per currency: debits == credits
  (checked after the statement that inserts its entries, which must be all of them, and again
  at COMMIT by a deferred constraint trigger);
- an account's balance never goes below zero unless the account is declared `allow_negative`,
  and a user account can never be declared so (CHECK constraints);
- an entry's currency is its account's currency, and its amount is positive and no finer than
  the currency's decimal places;
- a reference is unique per namespace (the idempotency key of a posting);
- entries and transactions are never updated or deleted;
- each entry extends its account's hash chain and moves its cached balance, in the same
  statement that inserts it, under the account's row lock;
- nothing else moves them: an UPDATE of an account's balance, entry count or chain head that
  does not come from that entry-insert trigger is refused (LD009), and an account's currency
  and normal balance never change.
"""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

GENESIS_HASH = "0" * 64


class Side(models.TextChoices):
    DEBIT = "debit", "Debit"
    CREDIT = "credit", "Credit"


class Currency(models.Model):
    code = models.CharField(primary_key=True, max_length=8)
    decimals = models.PositiveSmallIntegerField()

    class Meta:
        db_table = "ledger_currencies"
        verbose_name_plural = "currencies"
        constraints = [
            models.CheckConstraint(
                condition=Q(decimals__lte=6), name="ledger_currencies_chk_decimals"
            ),
        ]

    def __str__(self) -> str:
        return self.code


class Account(models.Model):
    """A user account (`user_id` set) or a system account (`user_id` null, named by `code`)."""

    user_id = models.UUIDField(null=True, blank=True)
    # Unique through a constraint, not `unique=True`, and the currency's foreign key unindexed:
    # neither is searched by pattern or by currency alone, and every index here is one more
    # write when a posting's account update cannot stay on its page (ledger migration 0008).
    # NULL for user accounts (ledger_accounts_chk_user_or_system), which a unique rule allows
    # many of; an empty string would not be.
    code = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    account_type = models.CharField(max_length=64)
    currency = models.ForeignKey(
        Currency, on_delete=models.PROTECT, db_column="currency", db_index=False
    )
    normal_balance = models.CharField(max_length=6, choices=Side.choices)
    allow_negative = models.BooleanField(default=False)
    balance = models.DecimalField(max_digits=38, decimal_places=6, db_default=0)
    entry_count = models.BigIntegerField(db_default=0)
    last_hash = models.CharField(max_length=64, db_default=GENESIS_HASH)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "ledger_accounts"
        constraints = [
            models.UniqueConstraint(
                fields=["user_id", "account_type", "currency"],
                condition=Q(user_id__isnull=False),
                name="ledger_accounts_uniq_user_type_currency",
            ),
            models.UniqueConstraint(fields=["code"], name="ledger_accounts_uniq_code"),
            models.CheckConstraint(
                condition=Q(allow_negative=True) | Q(balance__gte=0),
                name="ledger_accounts_chk_non_negative",
            ),
            # The next three are held in PostgreSQL by the trigger ledger_accounts_rules
            # (ledger 0016: under these names, only when their columns are written), not as
            # CHECKs, which every account update would prepare again; declared here for
            # Django's validation and migration state.
            models.CheckConstraint(
                condition=Q(user_id__isnull=True) | Q(allow_negative=False),
                name="ledger_accounts_chk_user_never_negative",
            ),
            models.CheckConstraint(
                condition=(Q(user_id__isnull=True) & Q(code__isnull=False))
                | (Q(user_id__isnull=False) & Q(code__isnull=True)),
                name="ledger_accounts_chk_user_or_system",
            ),
            models.CheckConstraint(
                condition=Q(normal_balance__in=Side.values),
                name="ledger_accounts_chk_normal_balance",
            ),
        ]

    def __str__(self) -> str:
        owner = f"user {self.user_id}" if self.user_id else f"system {self.code}"
        return f"{owner} {self.account_type} {self.currency_id}"


class Transaction(models.Model):
    """A posting: two or more entries balancing per currency, unique by (namespace, reference)."""

    namespace = models.CharField(max_length=64)
    reference_id = models.CharField(max_length=255)
    kind = models.CharField(max_length=64)
    metadata = models.JSONField(default=dict, db_default={}, blank=True)
    # sha256 of the kind and the canonical legs: a replay must carry the same fingerprint.
    fingerprint = models.CharField(max_length=64)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "ledger_transactions"
        constraints = [
            models.UniqueConstraint(
                fields=["namespace", "reference_id"], name="ledger_transactions_uniq_reference"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.namespace}:{self.reference_id}"


class Entry(models.Model):
    """One leg of a transaction. Immutable; `seq`, `prev_hash`, `hash` and `balance_after` are
    set by the database when the row is inserted."""

    # No foreign keys in the database: the entry trigger (ledger_entry_apply, ledger/sql/
    # ledger.sql) checks the transaction, the account and its currency under the account's row
    # lock, and transactions and accounts with entries are never deleted or renumbered.
    # (account, seq) is unique and indexed, which serves every lookup by account.
    transaction = models.ForeignKey(
        Transaction, on_delete=models.PROTECT, related_name="entries", db_constraint=False
    )
    account = models.ForeignKey(
        Account,
        on_delete=models.PROTECT,
        related_name="entries",
        db_index=False,
        db_constraint=False,
    )
    currency = models.ForeignKey(
        Currency,
        on_delete=models.PROTECT,
        db_column="currency",
        db_index=False,
        db_constraint=False,
    )
    side = models.CharField(max_length=6, choices=Side.choices)
    amount = models.DecimalField(max_digits=38, decimal_places=6)
    seq = models.BigIntegerField()
    balance_after = models.DecimalField(max_digits=38, decimal_places=6)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "ledger_entries"
        verbose_name_plural = "entries"
        constraints = [
            models.UniqueConstraint(fields=["account", "seq"], name="ledger_entries_uniq_seq"),
            # Held in PostgreSQL by the entry trigger (ledger_entry_apply; ledger 0017), which
            # every entry passes, not as CHECKs, which every insert statement prepared again;
            # declared here for Django's validation and migration state.
            models.CheckConstraint(condition=Q(amount__gt=0), name="ledger_entries_chk_positive"),
            models.CheckConstraint(
                condition=Q(side__in=Side.values), name="ledger_entries_chk_side"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.side} {self.amount} {self.currency_id} on account {self.account_id}"

"""Cheaper account updates for the postings every shadow write makes.

- Each clearing account of ledger migration 0004 gets shards up to SHARDS (64: `<code>#16` ..
  `<code>#63` added to its 16): a posting holds its counterparty shard's row lock until COMMIT,
  so with 16 shards a few concurrent clients already queued on one another's shard.
  cutover_balance_mutate picks the shard by the same hash, modulo 64 (cutover migration 0017).
- ledger_accounts keeps room on each page (fillfactor 50), so that a posting's account update
  (balance, entry count, chain head: no indexed column) stays a HOT update on the same page and
  writes no index entry. Rows written before this migration move to roomy pages as they are
  updated; `VACUUM FULL ledger_accounts` applies it at once.
- The indexes nothing searches are dropped: `code`'s pattern index (the code stays unique by
  constraint) and the two on `currency` (the foreign key to a two-row table stays).
"""

from django.db import migrations, models

SHARDS = 64
FIRST_NEW_SHARD = 16  # migration 0004 made `code`, `code#1` .. `code#15`
SHARDED = [
    "deposits_clearing_usdc",
    "deposits_clearing_usd",
    "withdrawals_clearing_usdc",
    "withdrawals_clearing_usd",
]


def create(apps, schema_editor):
    """The new shards, like their shard 0, in one INSERT (also run before each transactional
    test, tests/data_migrations.py)."""
    Account = apps.get_model("ledger", "Account")
    Account.objects.bulk_create(
        [
            Account(
                code=f"{base.code}#{shard}",
                account_type=base.account_type,
                currency_id=base.currency_id,
                normal_balance=base.normal_balance,
                allow_negative=base.allow_negative,
            )
            for base in Account.objects.filter(code__in=SHARDED)
            for shard in range(FIRST_NEW_SHARD, SHARDS)
        ],
        ignore_conflicts=True,
    )


class Migration(migrations.Migration):
    dependencies = [("ledger", "0007_deployment_checklist")]

    operations = [
        migrations.AlterField(
            model_name="account",
            name="code",
            field=models.CharField(blank=True, max_length=64, null=True),
        ),
        migrations.AlterField(
            model_name="account",
            name="currency",
            field=models.ForeignKey(
                db_column="currency",
                db_index=False,
                on_delete=models.deletion.PROTECT,
                to="ledger.currency",
            ),
        ),
        migrations.AddConstraint(
            model_name="account",
            constraint=models.UniqueConstraint(fields=("code",), name="ledger_accounts_uniq_code"),
        ),
        migrations.RunSQL(
            sql="ALTER TABLE ledger_accounts SET (fillfactor = 50)",
            reverse_sql="ALTER TABLE ledger_accounts RESET (fillfactor)",
        ),
        # The way down keeps the new shards: postings may already sit on them (PROTECT), and
        # nothing reads a clearing account by its shard count (0004's 16 are picked again).
        migrations.RunPython(create, migrations.RunPython.noop),
    ]

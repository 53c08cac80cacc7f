"""Shards of the USDC buffer: `usdc_buffer#1` .. `usdc_buffer#63`, like their shard 0.

Every Circle deposit debits the buffer and credits the user; with one buffer row, its row lock
(held until COMMIT, WAL flush included) queued every deposit behind the one before it.
cutover_balance_mutate already picks the counterparty's shard by the user's hash, modulo 64,
when the shard exists (ledger migrations 0004 and 0008 for the clearing accounts), so
deposits now spread over 64 rows. The buffer's balance is the sum over its shards
(ledger.selectors.system_balance); a posting that takes from the buffer first gathers the
shards' money into the base (ledger.services.system_account_gather), since no shard may go
below zero.

The way down keeps the shards: postings may already sit on them (entries PROTECT their
accounts).
"""

from django.db import migrations

SHARDS = 64
SHARDED = ["usdc_buffer"]


def create(apps, schema_editor):
    """The shards, like their shard 0, in one INSERT (also run before each transactional test,
    tests/data_migrations.py)."""
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
            for base in Account.objects.filter(code__in=SHARDED, user_id__isnull=True)
            for shard in range(1, SHARDS)
        ],
        ignore_conflicts=True,
    )


class Migration(migrations.Migration):
    dependencies = [("ledger", "0009_account_opening")]

    operations = [
        # The way down keeps the shards: deposits may already sit on them (PROTECT). Unapplied,
        # they would still take deposits (cutover_balance_mutate finds them by name); a
        # reverted reader of the base alone would miss that money until it is gathered.
        migrations.RunPython(create, migrations.RunPython.noop),
    ]

"""Shards of opening-balance equity: `opening_balance_equity_<ccy>#1` .. `#63`, like their
shard 0 (debit-normal, allowed negative, as ledger migration 0003 made the base).

Every backfill chunk posts its users' total against equity, and every legacy mutation mirrored
once custody is open posts against it too; with one row per currency, its row lock (held until
COMMIT) queued parallel backfill chunks behind one another. Backfill chunks now post against
the shard of their user range (cutover migration 0019: the range's index modulo 64) and the
legacy mirror against the user's shard (hashtext(user_id) modulo 64, as the clearing accounts).
Equity's balance is the sum over its shards (ledger.selectors.system_balance); equity may go
negative, so nothing needs gathering before a posting takes from its base.

The way down keeps the shards: postings may already sit on them (entries PROTECT their
accounts), and every reader sums over them by name.
"""

from django.db import migrations

SHARDS = 64
SHARDED = ["opening_balance_equity_usdc", "opening_balance_equity_usd"]


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
    dependencies = [("ledger", "0010_buffer_shards")]

    operations = [
        migrations.RunPython(create, migrations.RunPython.noop),
    ]

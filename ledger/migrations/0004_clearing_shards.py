"""Shards of the clearing accounts that every user mutation touches.

Each posting locks its accounts' rows until commit, so one clearing account shared by all users
would serialize every deposit and withdrawal. Each clearing account gets SHARDS - 1 siblings
(`<code>#1` .. `<code>#15`, the account itself is shard 0) of the same type and currency; a
posting picks one by a hash of the user's id (cutover_balance_mutate). The clearing
balance of a type is the sum over its shards.
"""

from django.db import migrations

SHARDS = 16
SHARDED = [
    "deposits_clearing_usdc",
    "deposits_clearing_usd",
    "withdrawals_clearing_usdc",
    "withdrawals_clearing_usd",
]


def create(apps, schema_editor):
    Account = apps.get_model("ledger", "Account")
    for code in SHARDED:
        base = Account.objects.get(code=code)
        for shard in range(1, SHARDS):
            Account.objects.get_or_create(
                code=f"{code}#{shard}",
                defaults={
                    "account_type": base.account_type,
                    "currency_id": base.currency_id,
                    "normal_balance": base.normal_balance,
                    "allow_negative": base.allow_negative,
                },
            )


def remove(apps, schema_editor):
    Account = apps.get_model("ledger", "Account")
    Account.objects.filter(code__contains="#").delete()


class Migration(migrations.Migration):
    dependencies = [("ledger", "0003_system_accounts")]

    operations = [migrations.RunPython(create, remove)]

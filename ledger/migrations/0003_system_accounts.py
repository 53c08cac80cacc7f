"""Currencies and the system accounts.

Normal balances are chosen so that each system account reads positive in normal use:
buffers are assets (debit-normal) and may never go negative; clearing and opening-balance
accounts only pass money through and may; fees are revenue (credit-normal).
"""

from django.db import migrations

CURRENCIES = [("USD", 2), ("USDC", 6)]

# code, account_type, currency, normal_balance, allow_negative
SYSTEM_ACCOUNTS = [
    ("usdc_buffer", "usdc_buffer", "USDC", "debit", False),
    ("fiat_buffer", "fiat_buffer", "USD", "debit", False),
    ("opening_balance_equity_usdc", "opening_balance_equity", "USDC", "debit", True),
    ("opening_balance_equity_usd", "opening_balance_equity", "USD", "debit", True),
    ("deposits_clearing_usdc", "deposits_clearing", "USDC", "debit", True),
    ("deposits_clearing_usd", "deposits_clearing", "USD", "debit", True),
    ("withdrawals_clearing_usdc", "withdrawals_clearing", "USDC", "credit", True),
    ("withdrawals_clearing_usd", "withdrawals_clearing", "USD", "credit", True),
    ("withdrawals_pending_usdc", "withdrawals_pending", "USDC", "credit", True),
    ("conversion_clearing_usdc", "conversion_clearing", "USDC", "debit", True),
    ("conversion_clearing_usd", "conversion_clearing", "USD", "debit", True),
    ("fees_usdc", "fees", "USDC", "credit", False),
    ("fees_usd", "fees", "USD", "credit", False),
]


def create(apps, schema_editor):
    Currency = apps.get_model("ledger", "Currency")
    Account = apps.get_model("ledger", "Account")
    for code, decimals in CURRENCIES:
        Currency.objects.update_or_create(code=code, defaults={"decimals": decimals})
    for code, account_type, currency, normal_balance, allow_negative in SYSTEM_ACCOUNTS:
        Account.objects.get_or_create(
            code=code,
            defaults={
                "account_type": account_type,
                "currency_id": currency,
                "normal_balance": normal_balance,
                "allow_negative": allow_negative,
            },
        )


def remove(apps, schema_editor):
    Account = apps.get_model("ledger", "Account")
    Account.objects.filter(code__in=[row[0] for row in SYSTEM_ACCOUNTS]).delete()


class Migration(migrations.Migration):
    dependencies = [("ledger", "0002_database_rules")]

    operations = [migrations.RunPython(create, remove)]

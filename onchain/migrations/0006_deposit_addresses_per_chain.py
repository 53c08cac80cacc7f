"""Deposit addresses: one user per (chain, address) instead of per address string (the same EVM
address is an account on every EVM chain, each registered as its own row), and EVM hex addresses
in lower case so that uniqueness is case-insensitive for them (onchain/chains.py). Existing EVM hex
addresses are lower-cased first; a registered address differing only in case from another on the
same chain was always the same account, and fails the unique constraint here for an operator."""

import django.db.models.functions.text
from django.db import migrations, models

EVM_CHAINS = ["ARB", "AVAX", "BASE", "ETH", "MATIC", "OP"]


class Migration(migrations.Migration):
    dependencies = [
        ("onchain", "0005_unknown_signing_keys"),
    ]

    operations = [
        migrations.RunSQL(
            "UPDATE onchain_deposit_addresses SET address = lower(address)"
            " WHERE chain IN ('ARB', 'AVAX', 'BASE', 'ETH', 'MATIC', 'OP')"
            " AND address ~ '^0x[0-9a-fA-F]{40}$'",
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AlterField(
            model_name="depositaddress",
            name="address",
            field=models.CharField(max_length=128),
        ),
        migrations.AddConstraint(
            model_name="depositaddress",
            constraint=models.UniqueConstraint(
                fields=("chain", "address"), name="onchain_deposit_addresses_uniq_chain_address"
            ),
        ),
        migrations.AddConstraint(
            model_name="depositaddress",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("chain__in", EVM_CHAINS), _negated=True),
                    models.Q(("address__regex", "^0x[0-9a-fA-F]{40}$"), _negated=True),
                    ("address", django.db.models.functions.text.Lower("address")),
                    _connector="OR",
                ),
                name="onchain_deposit_addresses_chk_evm_lower_case",
            ),
        ),
    ]

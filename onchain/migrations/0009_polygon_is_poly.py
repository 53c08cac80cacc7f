"""Polygon is POLY, as Circle Mint names it in transfers and notifications (its API's `Chain`);
MATIC was our own name, which Circle refuses for a transfer and never sends in a notification.
Addresses registered on MATIC move to POLY (lower-cased, as EVM addresses are stored); a
withdrawal keeps the chain it was requested on (its held fields are immutable, OC001)."""

import django.db.models.functions.text
from django.db import migrations, models

EVM_CHAINS = ["ARB", "AVAX", "BASE", "ETH", "OP", "POLY"]


class Migration(migrations.Migration):
    dependencies = [
        ("onchain", "0008_transfer_discrepancies"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="depositaddress",
            name="onchain_deposit_addresses_chk_evm_lower_case",
        ),
        migrations.RunSQL(
            "UPDATE onchain_deposit_addresses SET chain = 'POLY',"
            " address = CASE WHEN address ~ '^0x[0-9a-fA-F]{40}$' THEN lower(address)"
            " ELSE address END WHERE chain = 'MATIC'",
            reverse_sql="UPDATE onchain_deposit_addresses SET chain = 'MATIC' WHERE chain = 'POLY'",
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

"""An index on deposit addresses by address alone: a notification without a chain is matched
by address on every deposit, which the unique (chain, address) index cannot serve."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("onchain", "0006_deposit_addresses_per_chain"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="depositaddress",
            index=models.Index(fields=["address"], name="onchain_depaddr_address"),
        ),
    ]

"""The `addresses` scope (deposit addresses, onchain.views), never held by a client scoped to one
user."""

import django.contrib.postgres.fields
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0001_initial"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="apiclient",
            name="cutover_api_clients_chk_scopes",
        ),
        migrations.AlterField(
            model_name="apiclient",
            name="scopes",
            field=django.contrib.postgres.fields.ArrayField(
                base_field=models.CharField(
                    choices=[
                        ("read", "Read balances"),
                        ("credit", "Credit balances"),
                        ("debit", "Debit balances"),
                        ("withdraw", "Withdraw on chain"),
                        ("addresses", "Register deposit addresses"),
                    ],
                    max_length=16,
                ),
                default=list,
                size=None,
            ),
        ),
        migrations.AddConstraint(
            model_name="apiclient",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("scopes__contained_by", ["read", "credit", "debit", "withdraw", "addresses"])
                ),
                name="cutover_api_clients_chk_scopes",
            ),
        ),
        migrations.AddConstraint(
            model_name="apiclient",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("user_id__isnull", True),
                    models.Q(("scopes__contains", ["addresses"]), _negated=True),
                    _connector="OR",
                ),
                name="cutover_api_clients_chk_user_never_addresses",
            ),
        ),
    ]

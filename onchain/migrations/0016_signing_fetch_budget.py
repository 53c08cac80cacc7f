"""The fetches of signing material we did not hold, counted against CIRCLE_KEY_FETCHES_PER_MINUTE
by every worker process, and the SNS certificate URLs that failed, remembered for
CIRCLE_UNKNOWN_KEY_TTL (found from outside: a fresh key id or certificate path per forged
delivery was fetched every time)."""

import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("onchain", "0015_deposit_plans"),
    ]

    operations = [
        migrations.CreateModel(
            name="SigningFetch",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("source", models.TextField()),
                (
                    "fetched_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
            ],
            options={
                "db_table": "onchain_signing_fetches",
            },
        ),
        migrations.CreateModel(
            name="SnsCertificateFailure",
            fields=[
                ("url_sha256", models.CharField(max_length=64, primary_key=True, serialize=False)),
                ("url", models.TextField()),
                ("rejected", models.BooleanField()),
                ("error", models.TextField()),
                ("checked_at", models.DateTimeField(db_index=True)),
            ],
            options={
                "db_table": "onchain_sns_certificate_failures",
            },
        ),
    ]

"""The jobs' state machine and v_buffer_status (treasury/sql/treasury.sql as it was
then, frozen in migrations/sql/); Due as the first
provider and the buffers' thresholds (USDC: seed 001's alarm is below 5,000)."""

from decimal import Decimal
from pathlib import Path

from django.db import migrations

SQL = (Path(__file__).resolve().parent / "sql" / "0002_rules_and_seed.sql").read_text()
THRESHOLDS = [
    # currency, minimum, target, maximum
    ("USDC", Decimal("5000"), Decimal("20000"), Decimal("100000")),
    ("USD", Decimal("10000"), Decimal("50000"), Decimal("500000")),
]


def seed(apps, schema_editor):
    provider = apps.get_model("treasury", "ConversionProvider")
    threshold = apps.get_model("treasury", "BufferThreshold")
    provider.objects.get_or_create(code="due", defaults={"name": "Due", "priority": 10})
    for currency, minimum, target, maximum in THRESHOLDS:
        threshold.objects.get_or_create(
            currency=currency,
            defaults={"minimum": minimum, "target": target, "maximum": maximum},
        )


def unseed(apps, schema_editor):
    apps.get_model("treasury", "BufferThreshold").objects.all().delete()
    apps.get_model("treasury", "ConversionProvider").objects.filter(code="due").delete()


class Migration(migrations.Migration):
    dependencies = [("treasury", "0001_initial"), ("ledger", "0004_clearing_shards")]

    operations = [
        migrations.RunSQL(
            sql=SQL,
            reverse_sql=(
                "DROP VIEW IF EXISTS v_buffer_status;"
                "DROP TRIGGER IF EXISTS treasury_job_transition ON treasury_conversion_jobs;"
                "DROP FUNCTION IF EXISTS treasury_job_transition();"
            ),
        ),
        migrations.RunPython(seed, unseed),
    ]

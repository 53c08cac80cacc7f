"""Re-installs treasury/sql/treasury.sql (frozen in migrations/sql/), which now also holds the
deployment checklist's names for the treasury's tables: the views conversion_providers,
buffer_thresholds and conversion_jobs."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("treasury", "0004_ledger_contract")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0005_deployment_checklist.sql").read_text(),
            reverse_sql=(
                "DROP VIEW IF EXISTS conversion_jobs;"
                "DROP VIEW IF EXISTS buffer_thresholds;"
                "DROP VIEW IF EXISTS conversion_providers;"
            ),
        ),
    ]

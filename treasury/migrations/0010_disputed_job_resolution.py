"""A disputed job is resolved by an operator with the provider's final answer: completed
(what the provider converted, booked) or failed (treasury/sql/treasury.sql, frozen in
migrations/sql/)."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("treasury", "0009_job_provider_checked_at")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0010_disputed_job_resolution.sql").read_text(),
            reverse_sql=(SQL_DIR / "0009_job_provider_checked_at.sql").read_text(),
        ),
    ]

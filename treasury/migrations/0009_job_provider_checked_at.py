"""A completed job keeps when the monitor last asked the provider about it (a refund after it
completed), which the final-job rule lets change (treasury/sql/treasury.sql, frozen in
migrations/sql/)."""

from pathlib import Path

from django.db import migrations, models

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("treasury", "0008_job_reversal")]

    operations = [
        migrations.AddField(
            model_name="conversionjob",
            name="provider_checked_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunSQL(
            sql=(SQL_DIR / "0009_job_provider_checked_at.sql").read_text(),
            reverse_sql=(SQL_DIR / "0008_job_reversal.sql").read_text(),
        ),
    ]

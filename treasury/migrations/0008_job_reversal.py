"""A completed conversion the provider refunded can be reversed by an operator (status
`reversed`, its posting's reversal in reversal_transaction_id), and a final job records the
provider's later status of its transfer (treasury/sql/treasury.sql, frozen in
migrations/sql/)."""

from pathlib import Path

from django.db import migrations, models

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [
        ("treasury", "0007_job_provider_status_and_funding"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="conversionjob",
            name="treasury_jobs_chk_status",
        ),
        migrations.AddField(
            model_name="conversionjob",
            name="reversal_transaction_id",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name="conversionjob",
            name="status",
            field=models.CharField(
                choices=[
                    ("pending", "Pending (to be submitted)"),
                    ("submitted", "Submitted to the provider"),
                    ("completed", "Completed (posted to the ledger)"),
                    ("failed", "Failed (the provider said so, or never received it)"),
                    (
                        "timed_out",
                        "Timed out (fate unknown: still asked until the provider answers)",
                    ),
                    ("cancelled", "Cancelled"),
                    ("disputed", "Disputed (the provider's amounts do not match: for an operator)"),
                    (
                        "reversed",
                        "Reversed (the provider refunded it; an operator reversed the posting)",
                    ),
                ],
                default="pending",
                max_length=12,
            ),
        ),
        migrations.AddConstraint(
            model_name="conversionjob",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    (
                        "status__in",
                        [
                            "pending",
                            "submitted",
                            "completed",
                            "failed",
                            "timed_out",
                            "cancelled",
                            "disputed",
                            "reversed",
                        ],
                    )
                ),
                name="treasury_jobs_chk_status",
            ),
        ),
        migrations.RunSQL(
            sql=(SQL_DIR / "0008_job_reversal.sql").read_text(),
            reverse_sql=(SQL_DIR / "0006_buffer_shards.sql").read_text(),
        ),
    ]

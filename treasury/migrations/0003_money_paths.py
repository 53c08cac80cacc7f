"""Issue 9's treasury changes: a job whose fate is unknown (`timed_out`) stays open (it holds
its buffer's slot) and may still complete or fail; `disputed` for a completion whose amounts do
not match; the jobs' state trigger re-run from treasury/sql/treasury.sql (as it
was then, frozen in migrations/sql/); a provider's host no
longer lives in the database (settings only); a cycle records why it created nothing."""

from pathlib import Path

from django.db import migrations, models

SQL = (Path(__file__).resolve().parent / "sql" / "0003_money_paths.sql").read_text()
# A timed-out job becomes open again: a buffer with both a timed-out job and a newer open job
# cannot take the one-open-job index. Say which, rather than a bare unique violation.
OPEN_CONFLICTS = """
DO $$
DECLARE conflict record;
BEGIN
    SELECT buffer_currency, string_agg(id::text, ', ') AS jobs INTO conflict
      FROM treasury_conversion_jobs
     WHERE status IN ('pending', 'submitted', 'timed_out')
     GROUP BY buffer_currency HAVING count(*) > 1 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'the % buffer has several open or timed-out conversion jobs (%): settle '
            'them with the provider first', conflict.buffer_currency, conflict.jobs;
    END IF;
END $$;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("treasury", "0002_rules_and_seed"),
        ("cutover", "0007_scopes_and_operator_audit"),
    ]

    operations = [
        migrations.RunSQL(OPEN_CONFLICTS, reverse_sql=migrations.RunSQL.noop),
        migrations.RemoveConstraint(
            model_name="conversionjob",
            name="treasury_jobs_chk_status",
        ),
        migrations.RemoveConstraint(
            model_name="conversionjob",
            name="treasury_jobs_one_open_per_buffer",
        ),
        migrations.RemoveField(
            model_name="conversionprovider",
            name="base_url",
        ),
        migrations.AddField(
            model_name="settlementcycle",
            name="note",
            field=models.CharField(blank=True, default="", max_length=200),
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
                        ],
                    )
                ),
                name="treasury_jobs_chk_status",
            ),
        ),
        migrations.AddConstraint(
            model_name="conversionjob",
            constraint=models.UniqueConstraint(
                condition=models.Q(("status__in", ["pending", "submitted", "timed_out"])),
                fields=("buffer_currency",),
                name="treasury_jobs_one_open_per_buffer",
            ),
        ),
        migrations.RunSQL(SQL, reverse_sql=migrations.RunSQL.noop),
    ]

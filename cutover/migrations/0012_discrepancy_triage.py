"""Discrepancies that can be worked: triage states (open, investigating, known difference,
repaired, resolved; one unresolved row per user and currency), known-difference rules, repair
requests approved by a second operator, the reconciliation's count of known differences, and
alert states logged on change; cutover/sql/cutover.sql (frozen in migrations/sql/) adds the
rules PostgreSQL holds for them. The way down is refused once anything was triaged or repaired
(the older schema cannot hold it)."""

from pathlib import Path

import django.db.models.deletion
import django.db.models.functions.datetime
from django.db import migrations, models

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0011_legacy_archive"),
    ]

    operations = [
        migrations.CreateModel(
            name="AlertState",
            fields=[
                ("name", models.CharField(max_length=64, primary_key=True, serialize=False)),
                ("firing", models.BooleanField()),
                (
                    "changed_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
            ],
            options={
                "db_table": "cutover_alert_states",
            },
        ),
        migrations.CreateModel(
            name="DiscrepancyRepair",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "side",
                    models.CharField(
                        choices=[
                            ("legacy", "Legacy store: set it to the ledger's balance"),
                            ("ledger", "Ledger: set it to the legacy balance"),
                        ],
                        max_length=8,
                    ),
                ),
                ("difference", models.DecimalField(decimal_places=6, max_digits=38)),
                (
                    "legacy_balance",
                    models.DecimalField(blank=True, decimal_places=6, max_digits=38, null=True),
                ),
                (
                    "ledger_balance",
                    models.DecimalField(blank=True, decimal_places=6, max_digits=38, null=True),
                ),
                ("reason", models.TextField()),
                ("requested_by", models.CharField(max_length=150)),
                (
                    "requested_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("requested", "Requested (waiting for a second operator)"),
                            ("applied", "Applied"),
                            ("lapsed", "Lapsed (not applied)"),
                        ],
                        default="requested",
                        max_length=12,
                    ),
                ),
                ("approved_by", models.CharField(blank=True, default="", max_length=150)),
                ("decided_at", models.DateTimeField(blank=True, null=True)),
                (
                    "legacy_after",
                    models.DecimalField(blank=True, decimal_places=6, max_digits=38, null=True),
                ),
                (
                    "ledger_after",
                    models.DecimalField(blank=True, decimal_places=6, max_digits=38, null=True),
                ),
                ("ledger_transaction_id", models.BigIntegerField(blank=True, null=True)),
                ("lapsed_why", models.TextField(blank=True, default="")),
            ],
            options={
                "db_table": "cutover_discrepancy_repairs",
            },
        ),
        migrations.CreateModel(
            name="KnownDifference",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("user_id", models.UUIDField()),
                ("currency", models.CharField(max_length=8)),
                ("difference", models.DecimalField(decimal_places=6, max_digits=38)),
                ("reason", models.TextField()),
                ("created_by", models.CharField(max_length=150)),
                (
                    "created_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
                ("expires_at", models.DateTimeField()),
            ],
            options={
                "db_table": "cutover_known_differences",
            },
        ),
        migrations.AlterModelOptions(
            name="discrepancy",
            options={
                "permissions": [
                    (
                        "triage_discrepancy",
                        "Can mark a discrepancy investigating or a known difference",
                    ),
                    ("request_discrepancy_repair", "Can request the repair of a discrepancy"),
                    (
                        "approve_discrepancy_repair",
                        "Can approve another operator's discrepancy repair",
                    ),
                ],
                "verbose_name_plural": "discrepancies",
            },
        ),
        migrations.RemoveConstraint(
            model_name="discrepancy",
            name="cutover_discrepancies_uniq_open",
        ),
        migrations.RemoveConstraint(
            model_name="discrepancy",
            name="cutover_discrepancies_chk_status",
        ),
        migrations.AddField(
            model_name="reconciliationrun",
            name="known_differences",
            field=models.BigIntegerField(db_default=0, default=0),
        ),
        migrations.AlterField(
            model_name="discrepancy",
            name="status",
            field=models.CharField(
                choices=[
                    ("open", "Open"),
                    ("investigating", "Investigating"),
                    ("known_difference", "Known difference"),
                    ("repaired", "Repaired"),
                    ("resolved", "Resolved (the stores agree again)"),
                ],
                default="open",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="discrepancyrepair",
            name="discrepancy",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.PROTECT,
                related_name="repairs",
                to="cutover.discrepancy",
            ),
        ),
        migrations.AddIndex(
            model_name="knowndifference",
            index=models.Index(fields=["user_id", "currency"], name="cutover_known_diff_user"),
        ),
        migrations.AddConstraint(
            model_name="knowndifference",
            constraint=models.CheckConstraint(
                condition=models.Q(("difference", 0), _negated=True),
                name="cutover_known_differences_chk_difference",
            ),
        ),
        migrations.AddConstraint(
            model_name="knowndifference",
            constraint=models.CheckConstraint(
                condition=models.Q(("reason", ""), _negated=True),
                name="cutover_known_differences_chk_reason",
            ),
        ),
        migrations.AddConstraint(
            model_name="knowndifference",
            constraint=models.CheckConstraint(
                condition=models.Q(("expires_at__gt", models.F("created_at"))),
                name="cutover_known_differences_chk_expiry",
            ),
        ),
        migrations.AddField(
            model_name="discrepancy",
            name="known_difference",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="cutover.knowndifference",
            ),
        ),
        migrations.AddConstraint(
            model_name="discrepancy",
            constraint=models.UniqueConstraint(
                condition=models.Q(("status__in", ["open", "investigating", "known_difference"])),
                fields=("user_id", "currency"),
                name="cutover_discrepancies_uniq_unresolved",
            ),
        ),
        migrations.AddConstraint(
            model_name="discrepancy",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    (
                        "status__in",
                        ["open", "investigating", "known_difference", "repaired", "resolved"],
                    )
                ),
                name="cutover_discrepancies_chk_status",
            ),
        ),
        migrations.AddConstraint(
            model_name="discrepancy",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("status", "known_difference"), _negated=True),
                    ("known_difference__isnull", False),
                    _connector="OR",
                ),
                name="cutover_discrepancies_chk_known_rule",
            ),
        ),
        migrations.AddConstraint(
            model_name="discrepancyrepair",
            constraint=models.CheckConstraint(
                condition=models.Q(("side__in", ["legacy", "ledger"])),
                name="cutover_repairs_chk_side",
            ),
        ),
        migrations.AddConstraint(
            model_name="discrepancyrepair",
            constraint=models.CheckConstraint(
                condition=models.Q(("status__in", ["requested", "applied", "lapsed"])),
                name="cutover_repairs_chk_status",
            ),
        ),
        migrations.AddConstraint(
            model_name="discrepancyrepair",
            constraint=models.CheckConstraint(
                condition=models.Q(("difference", 0), _negated=True),
                name="cutover_repairs_chk_difference",
            ),
        ),
        migrations.AddConstraint(
            model_name="discrepancyrepair",
            constraint=models.CheckConstraint(
                condition=models.Q(("reason", ""), _negated=True), name="cutover_repairs_chk_reason"
            ),
        ),
        migrations.AddConstraint(
            model_name="discrepancyrepair",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("approved_by", ""),
                    models.Q(("approved_by", models.F("requested_by")), _negated=True),
                    _connector="OR",
                ),
                name="cutover_repairs_chk_second_person",
            ),
        ),
        migrations.AddConstraint(
            model_name="discrepancyrepair",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(
                        ("decided_at__isnull", False),
                        ("status", "applied"),
                        models.Q(("approved_by", ""), _negated=True),
                    ),
                    models.Q(models.Q(("status", "applied"), _negated=True), ("approved_by", "")),
                    _connector="OR",
                ),
                name="cutover_repairs_chk_approved",
            ),
        ),
        migrations.AddConstraint(
            model_name="discrepancyrepair",
            constraint=models.UniqueConstraint(
                condition=models.Q(("status", "requested")),
                fields=("discrepancy",),
                name="cutover_repairs_uniq_requested",
            ),
        ),
        migrations.RunSQL(
            sql=(SQL_DIR / "0012_discrepancy_triage.sql").read_text(),
            reverse_sql=(SQL_DIR / "0012_discrepancy_triage_drop.sql").read_text()
            + (SQL_DIR / "0011_legacy_archive.sql").read_text(),
        ),
    ]

"""The operator audit (append-only, refused UPDATE/DELETE by the cutover's trigger function) and
API client scopes."""

import django.db.models.functions.datetime
from django.db import migrations, models

APPEND_ONLY = """
CREATE TRIGGER cutover_operator_audit_append_only BEFORE UPDATE OR DELETE ON cutover_operator_audit
    FOR EACH ROW EXECUTE FUNCTION cutover_refuse_change();
"""


class Migration(migrations.Migration):
    dependencies = [("cutover", "0006_money_rules")]

    operations = [
        migrations.CreateModel(
            name="OperatorAudit",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("at", models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
                ("actor", models.CharField(max_length=150)),
                ("action", models.CharField(max_length=64)),
                ("target", models.CharField(max_length=150)),
                ("before", models.JSONField(blank=True, default=dict)),
                ("after", models.JSONField(blank=True, default=dict)),
                ("reason", models.TextField(blank=True)),
            ],
            options={
                "db_table": "cutover_operator_audit",
                "ordering": ["-at", "-id"],
                "indexes": [
                    models.Index(fields=["target", "-at"], name="cutover_operator_audit_target")
                ],
            },
        ),
        migrations.RunSQL(
            APPEND_ONLY,
            reverse_sql="DROP TRIGGER cutover_operator_audit_append_only ON cutover_operator_audit",
        ),
    ]

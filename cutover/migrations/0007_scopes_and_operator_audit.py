"""The operator audit (append-only, refused UPDATE/DELETE by the cutover's trigger function),
API client scopes and limits (a user's client never credits), the clients' spend within their
rolling daily limit, and the owner token of an Idempotency-Key's claim."""

import django.contrib.postgres.fields
import django.db.models.deletion
import django.db.models.functions.datetime
from django.db import migrations, models

APPEND_ONLY = """
CREATE TRIGGER cutover_operator_audit_append_only BEFORE UPDATE OR DELETE ON cutover_operator_audit
    FOR EACH ROW EXECUTE FUNCTION cutover_refuse_change();
"""

# Clients made before scopes keep what they could do, except that a user's client never credits.
EXISTING_CLIENTS_SCOPES = """
UPDATE cutover_api_clients
   SET scopes = CASE WHEN user_id IS NULL THEN '{read,credit,debit,withdraw}'::varchar[]
                     ELSE '{read,debit,withdraw}'::varchar[] END
"""

SCOPES = [
    ("read", "Read balances"),
    ("credit", "Credit balances"),
    ("debit", "Debit balances"),
    ("withdraw", "Withdraw on chain"),
]


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
        migrations.AddField(
            model_name="apiclient",
            name="scopes",
            field=django.contrib.postgres.fields.ArrayField(
                base_field=models.CharField(choices=SCOPES, max_length=16),
                default=list,
                size=None,
            ),
        ),
        migrations.RunSQL(EXISTING_CLIENTS_SCOPES, reverse_sql=migrations.RunSQL.noop),
        migrations.AddField(
            model_name="apiclient",
            name="max_amount",
            field=models.DecimalField(blank=True, decimal_places=6, max_digits=38, null=True),
        ),
        migrations.AddField(
            model_name="apiclient",
            name="daily_limit",
            field=models.DecimalField(blank=True, decimal_places=6, max_digits=38, null=True),
        ),
        migrations.AddConstraint(
            model_name="apiclient",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("scopes__contained_by", ["read", "credit", "debit", "withdraw"])
                ),
                name="cutover_api_clients_chk_scopes",
            ),
        ),
        migrations.AddConstraint(
            model_name="apiclient",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("user_id__isnull", True),
                    models.Q(("scopes__contains", ["credit"]), _negated=True),
                    _connector="OR",
                ),
                name="cutover_api_clients_chk_user_never_credits",
            ),
        ),
        migrations.AddConstraint(
            model_name="apiclient",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("max_amount__isnull", True), ("max_amount__gt", 0), _connector="OR"
                ),
                name="cutover_api_clients_chk_max_amount",
            ),
        ),
        migrations.AddConstraint(
            model_name="apiclient",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("daily_limit__isnull", True), ("daily_limit__gt", 0), _connector="OR"
                ),
                name="cutover_api_clients_chk_daily_limit",
            ),
        ),
        migrations.AddField(
            model_name="idempotencyrecord",
            name="owner_token",
            field=models.UUIDField(null=True),
        ),
        migrations.CreateModel(
            name="ApiClientSpend",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "direction",
                    models.CharField(
                        choices=[("credit", "Credit"), ("debit", "Debit")], max_length=6
                    ),
                ),
                ("amount", models.DecimalField(decimal_places=6, max_digits=38)),
                ("currency", models.CharField(max_length=8)),
                ("at", models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
                (
                    "client",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, to="cutover.apiclient"
                    ),
                ),
                (
                    "idempotency_record",
                    models.OneToOneField(
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        to="cutover.idempotencyrecord",
                    ),
                ),
            ],
            options={
                "db_table": "cutover_api_client_spend",
                "indexes": [
                    models.Index(fields=["client", "direction", "at"], name="cutover_spend_window")
                ],
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("amount__gt", 0)), name="cutover_spend_chk_amount"
                    )
                ],
            },
        ),
    ]

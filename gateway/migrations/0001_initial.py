"""The API clients, their spend and the Idempotency-Keys, moved from the cutover app: state only.
The tables (cutover_api_clients, cutover_api_client_spend, cutover_idempotency_keys) and their
constraints were made by cutover 0004 and 0007 and stay as they are."""

import django.contrib.postgres.fields
import django.db.models.deletion
import django.db.models.functions.datetime
from django.db import migrations, models

SCOPES = [
    ("read", "Read balances"),
    ("credit", "Credit balances"),
    ("debit", "Debit balances"),
    ("withdraw", "Withdraw on chain"),
]


MODELS = [
    migrations.CreateModel(
        name="ApiClient",
        fields=[
            (
                "id",
                models.BigAutoField(
                    auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                ),
            ),
            ("name", models.CharField(max_length=100, unique=True)),
            ("token_sha256", models.CharField(max_length=64, unique=True)),
            ("user_id", models.UUIDField(blank=True, null=True)),
            (
                "scopes",
                django.contrib.postgres.fields.ArrayField(
                    base_field=models.CharField(choices=SCOPES, max_length=16),
                    default=list,
                    size=None,
                ),
            ),
            (
                "max_amount",
                models.DecimalField(blank=True, decimal_places=6, max_digits=38, null=True),
            ),
            (
                "daily_limit",
                models.DecimalField(blank=True, decimal_places=6, max_digits=38, null=True),
            ),
            ("active", models.BooleanField(default=True)),
            (
                "created_at",
                models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
            ),
        ],
        options={
            "db_table": "cutover_api_clients",
            "constraints": [
                models.CheckConstraint(
                    condition=models.Q(
                        ("scopes__contained_by", ["read", "credit", "debit", "withdraw"])
                    ),
                    name="cutover_api_clients_chk_scopes",
                ),
                models.CheckConstraint(
                    condition=models.Q(
                        ("user_id__isnull", True),
                        models.Q(("scopes__contains", ["credit"]), _negated=True),
                        _connector="OR",
                    ),
                    name="cutover_api_clients_chk_user_never_credits",
                ),
                models.CheckConstraint(
                    condition=models.Q(
                        ("max_amount__isnull", True), ("max_amount__gt", 0), _connector="OR"
                    ),
                    name="cutover_api_clients_chk_max_amount",
                ),
                models.CheckConstraint(
                    condition=models.Q(
                        ("daily_limit__isnull", True), ("daily_limit__gt", 0), _connector="OR"
                    ),
                    name="cutover_api_clients_chk_daily_limit",
                ),
            ],
        },
    ),
    migrations.CreateModel(
        name="IdempotencyRecord",
        fields=[
            (
                "id",
                models.BigAutoField(
                    auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                ),
            ),
            ("key", models.CharField(max_length=255)),
            ("request_sha256", models.CharField(max_length=64)),
            (
                "status",
                models.CharField(
                    choices=[("in_flight", "In flight"), ("completed", "Completed")],
                    max_length=12,
                ),
            ),
            ("response_status", models.PositiveSmallIntegerField(null=True)),
            ("response_body", models.JSONField(null=True)),
            ("locked_until", models.DateTimeField()),
            ("owner_token", models.UUIDField(null=True)),
            ("expires_at", models.DateTimeField(db_index=True)),
            (
                "created_at",
                models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
            ),
            (
                "client",
                models.ForeignKey(
                    on_delete=django.db.models.deletion.CASCADE, to="gateway.apiclient"
                ),
            ),
        ],
        options={
            "db_table": "cutover_idempotency_keys",
            "constraints": [
                models.UniqueConstraint(
                    fields=("client", "key"), name="cutover_idempotency_uniq_key"
                ),
                models.CheckConstraint(
                    condition=models.Q(("status__in", ["in_flight", "completed"])),
                    name="cutover_idempotency_chk_status",
                ),
            ],
        },
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
                models.CharField(choices=[("credit", "Credit"), ("debit", "Debit")], max_length=6),
            ),
            ("amount", models.DecimalField(decimal_places=6, max_digits=38)),
            ("currency", models.CharField(max_length=8)),
            ("at", models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
            (
                "client",
                models.ForeignKey(
                    on_delete=django.db.models.deletion.CASCADE, to="gateway.apiclient"
                ),
            ),
            (
                "idempotency_record",
                models.OneToOneField(
                    null=True,
                    on_delete=django.db.models.deletion.SET_NULL,
                    to="gateway.idempotencyrecord",
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


class Migration(migrations.Migration):
    initial = True

    dependencies = [("cutover", "0007_scopes_and_operator_audit")]

    operations = [migrations.SeparateDatabaseAndState(state_operations=MODELS)]

"""Key ids Circle does not know, remembered for CIRCLE_UNKNOWN_KEY_TTL (issue 11, item 6)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("onchain", "0004_ledger_contract"),
    ]

    operations = [
        migrations.CreateModel(
            name="CircleUnknownKey",
            fields=[
                ("key_id", models.CharField(max_length=64, primary_key=True, serialize=False)),
                ("checked_at", models.DateTimeField(db_index=True)),
            ],
            options={
                "db_table": "onchain_circle_unknown_keys",
            },
        ),
    ]

"""Installs the ledger's database rules (triggers, the posting function): ledger/sql/ledger.sql
as it was then (frozen in migrations/sql/)."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("ledger", "0001_initial")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0002_database_rules.sql").read_text(),
            reverse_sql=(SQL_DIR / "0002_database_rules_drop.sql").read_text(),
        ),
    ]

"""Installs the cutover's database rules: cutover/sql/cutover.sql as it was then (frozen in
migrations/sql/, so later edits of the living file never change what this migration does)."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("cutover", "0001_initial")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0002_database_rules.sql").read_text(),
            reverse_sql=(SQL_DIR / "0002_database_rules_drop.sql").read_text(),
        ),
    ]

"""Installs the cutover's database rules: cutover/sql/cutover.sql."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("cutover", "0001_initial")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "cutover.sql").read_text(),
            reverse_sql=(SQL_DIR / "cutover_drop.sql").read_text(),
        ),
    ]

"""Re-installs treasury/sql/treasury.sql (frozen in migrations/sql/): v_buffer_status sums
each buffer over its shards (the USDC buffer's, ledger migration 0010). The way down
re-installs the previous frozen file (v_buffer_status reading the base account alone)."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("treasury", "0005_deployment_checklist"), ("ledger", "0010_buffer_shards")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0006_buffer_shards.sql").read_text(),
            reverse_sql=(SQL_DIR / "0005_deployment_checklist.sql").read_text(),
        ),
    ]

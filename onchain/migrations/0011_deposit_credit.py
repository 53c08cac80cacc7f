"""Re-installs onchain/sql/onchain.sql (frozen in migrations/sql/): the deposit path's decisions
in one round trip, onchain_deposit_credit, and a plain deposit's notification stored and applied
in one statement, onchain_deposit_notification_accept."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("onchain", "0010_metrics_indexes"), ("cutover", "0010_deployment_checklist")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0011_deposit_credit.sql").read_text(),
            reverse_sql=(
                "DROP FUNCTION IF EXISTS onchain_deposit_notification_accept("
                "text, text, text, text, text, text, text, text, text[], text, numeric, text,"
                " text, text);"
                "DROP FUNCTION IF EXISTS onchain_deposit_credit("
                "text, text, text, text[], text, numeric, text, text, text, text);"
            ),
        ),
    ]

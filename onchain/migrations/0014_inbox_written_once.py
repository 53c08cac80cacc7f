"""Re-installs onchain/sql/onchain.sql (frozen in migrations/sql/): a deposit's notification is
inserted once with its outcome (it was inserted 'received' and updated in the same statement,
every index written twice), deliveries of one notification id wait for each other on an
advisory lock, onchain_deposit_credit calls the balance path without a subtransaction of its
own (the user's id now comes in cutover_balance_mutate's CU005 HINT, cutover 0020), and both
functions pass on cutover_balance_mutate's p_isolate_ledger (their signatures gain it). The
inbox loses the pattern indexes (`_like`) of notification_id and transfer_id: nothing searches
them by prefix (the admin's search is a contains); their plain and unique indexes stay."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"

LIKE_INDEXES = {
    "onchain_circle_notifications_notification_id_acc40eaa_like": "notification_id",
    "onchain_circle_notifications_transfer_id_7d02b526_like": "transfer_id",
}


class Migration(migrations.Migration):
    dependencies = [
        ("onchain", "0013_task_deliveries_to_cutover"),
        ("cutover", "0020_balance_path_fewer_statements"),
    ]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0014_inbox_written_once.sql").read_text(),
            reverse_sql="DROP FUNCTION IF EXISTS onchain_deposit_notification_accept("
            "text, text, text, text, text, text, text, text, text[], text, numeric, text, text,"
            " text, boolean);"
            "DROP FUNCTION IF EXISTS onchain_deposit_credit("
            "text, text, text, text[], text, numeric, text, text, text, text, boolean);"
            + (SQL_DIR / "0011_deposit_credit.sql").read_text(),
        ),
        *(
            migrations.RunSQL(
                sql=f"DROP INDEX IF EXISTS {name}",
                reverse_sql=(
                    f"CREATE INDEX IF NOT EXISTS {name}"
                    f" ON onchain_circle_notifications ({column} varchar_pattern_ops)"
                ),
            )
            for name, column in LIKE_INDEXES.items()
        ),
    ]

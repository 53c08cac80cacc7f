"""Re-installs cutover/sql/cutover.sql (frozen in migrations/sql/): the balance path's CU003
refusals name the argument they are about (COLUMN 'currency' for a currency other than the
user's, 'reference' for a reference used for another mutation), so that the API's 422 names the
field as every other refusal does."""

from pathlib import Path

from django.db import migrations

SQL_DIR = Path(__file__).resolve().parent / "sql"


class Migration(migrations.Migration):
    dependencies = [("cutover", "0021_balance_path_plans")]

    operations = [
        migrations.RunSQL(
            sql=(SQL_DIR / "0022_balance_path_refusals_name_the_field.sql").read_text(),
            reverse_sql=(SQL_DIR / "0021_balance_path_plans.sql").read_text(),
        ),
    ]

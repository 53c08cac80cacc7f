"""Issue 9's on-chain changes: re-installs onchain/sql/onchain.sql as it was then (frozen in
migrations/sql/), whose withdrawal rules now let a dead withdrawal become submitted (an
operator's cancel found the transfer Circle made)."""

from pathlib import Path

from django.db import migrations

SQL = (Path(__file__).resolve().parent / "sql" / "0003_money_paths.sql").read_text()


class Migration(migrations.Migration):
    dependencies = [("onchain", "0002_withdrawals"), ("cutover", "0007_scopes_and_operator_audit")]

    operations = [migrations.RunSQL(sql=SQL, reverse_sql=migrations.RunSQL.noop)]

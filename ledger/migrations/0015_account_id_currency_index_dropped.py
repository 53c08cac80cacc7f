"""Drops ledger_accounts_uniq_id_cur, the unique index on (id, currency): it was the target of
the entries' composite foreign key, which ledger 0012 replaced by the entry trigger's own check.
The primary key already makes (id, currency) unique, and every account update (two per posting)
opened and locked the index for nothing; look-ups by id read the primary key."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("ledger", "0014_commit_check_one_aggregate")]

    operations = [
        migrations.RemoveConstraint(model_name="account", name="ledger_accounts_uniq_id_cur"),
    ]

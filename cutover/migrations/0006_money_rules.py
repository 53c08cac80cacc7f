"""Slot for issue 9's cutover database rules."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("cutover", "0005_balance_path_function"), ("ledger", "0005_rules_held")]

    operations = []

"""Slot for issue 9's ledger rules (filled by the change that needs it)."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("ledger", "0004_clearing_shards")]

    operations = []

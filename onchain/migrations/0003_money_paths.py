"""Slot for issue 9's on-chain changes."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("onchain", "0002_withdrawals"), ("cutover", "0007_scopes_and_operator_audit")]

    operations = []

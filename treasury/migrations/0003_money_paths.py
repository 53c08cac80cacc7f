"""Slot for issue 9's treasury changes."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("treasury", "0002_rules_and_seed"),
        ("cutover", "0007_scopes_and_operator_audit"),
    ]

    operations = []

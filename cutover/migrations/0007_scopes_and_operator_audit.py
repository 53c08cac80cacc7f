"""Slot for issue 9's API scopes and operator audit."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("cutover", "0006_money_rules")]

    operations = []

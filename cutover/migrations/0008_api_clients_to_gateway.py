"""The API clients, their spend and the Idempotency-Keys now belong to the gateway app (its
0001): state only, the tables stay."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("cutover", "0007_scopes_and_operator_audit"),
        ("gateway", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name="ApiClientSpend"),
                migrations.DeleteModel(name="IdempotencyRecord"),
                migrations.DeleteModel(name="ApiClient"),
            ]
        )
    ]

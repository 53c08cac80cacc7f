"""celery_task_deliveries' model now lives in cutover (cutover 0013): drop it from this app's
state only; the table and its rows stay."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("onchain", "0012_task_deliveries"),
        ("cutover", "0013_task_deliveries"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="TaskDelivery")],
        ),
    ]

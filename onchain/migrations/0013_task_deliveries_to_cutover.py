"""celery_task_deliveries' model now lives in cutover (cutover 0013): drop it from this app's
state only; the table and its rows stay. Its content type here is stale from then on (the admin
lists it under cutover): removed with its permissions, so that no group keeps rights to a model
that is gone; the way down leaves it to Django to make again."""

from django.db import migrations


def stale_content_type_remove(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    stale = ContentType.objects.filter(app_label="onchain", model="taskdelivery")
    Permission.objects.filter(content_type__in=stale).delete()
    stale.delete()


class Migration(migrations.Migration):
    dependencies = [
        ("onchain", "0012_task_deliveries"),
        ("cutover", "0013_task_deliveries"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="TaskDelivery")],
        ),
        migrations.RunPython(stale_content_type_remove, migrations.RunPython.noop),
    ]

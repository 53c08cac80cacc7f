"""A job keeps Due's own status of its transfer and what Due says funds it."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("treasury", "0006_buffer_shards"),
    ]

    operations = [
        migrations.AddField(
            model_name="conversionjob",
            name="funding",
            field=models.JSONField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="conversionjob",
            name="provider_status",
            field=models.CharField(blank=True, db_default="", default="", max_length=64),
        ),
    ]

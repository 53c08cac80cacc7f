"""Partial indexes for what /metrics counts at every scrape: notifications parked or failed,
dead withdrawals. Both tables keep every row, so a count without them would read the table."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("onchain", "0009_polygon_is_poly"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="circlenotification",
            index=models.Index(
                condition=models.Q(status__in=["parked", "failed"]),
                fields=["status"],
                name="onchain_notifications_waiting",
            ),
        ),
        migrations.AddIndex(
            model_name="withdrawal",
            index=models.Index(
                condition=models.Q(status="dead"),
                fields=["status"],
                name="onchain_withdrawals_dead",
            ),
        ),
    ]

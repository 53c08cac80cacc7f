from django.apps import AppConfig


class AwsConfig(AppConfig):
    """AWS as seed 001's deployment checklist provisions it (secrets, log groups, CloudWatch
    alarms) and the metrics those alarms read, published from the database. Above the engines
    and custody, because its metrics read the cutover, the treasury and the ledger."""

    name = "aws"
    verbose_name = "AWS"

from django.apps import AppConfig


class TreasuryConfig(AppConfig):
    """Buffer thresholds, conversion providers and jobs, the settlement cycle."""

    name = "treasury"
    verbose_name = "Treasury"

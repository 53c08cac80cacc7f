from django.apps import AppConfig


class ConfigConfig(AppConfig):
    """The composition root; installed so that it can carry the cross-app commands
    (`rehearse`, `bench`)."""

    name = "config"
    verbose_name = "Configuration"

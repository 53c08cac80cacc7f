from django.apps import AppConfig


class ConfigConfig(AppConfig):
    """The composition root; installed so that it can carry the custody wiring's command
    (`custody`)."""

    name = "config"
    verbose_name = "Configuration"

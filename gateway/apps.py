from django.apps import AppConfig


class GatewayConfig(AppConfig):
    """The HTTP edge every app serves through: bearer API clients and their scopes, idempotency
    keys, token checks, JSON errors, and the base of the providers' sandbox servers."""

    name = "gateway"
    verbose_name = "Gateway"

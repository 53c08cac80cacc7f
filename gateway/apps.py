from django.apps import AppConfig


class GatewayConfig(AppConfig):
    """The edge every app works through: bearer API clients and their scopes, idempotency keys,
    token checks and JSON errors (inbound); the outbox loop and the provider call (outbound);
    the sandbox server base; operators' confirmation page and command argument types."""

    name = "gateway"
    verbose_name = "Gateway"

"""Refusals of the HTTP edge: API clients and Idempotency-Keys. Each message is fit for an
operator or an API client."""


class GatewayError(Exception):
    pass


class IdempotencyKeyReused(GatewayError):
    """The Idempotency-Key was used before with a different request."""


class IdempotencyKeyInFlight(GatewayError):
    """A request with this Idempotency-Key is still being processed."""


class ApiClientRefused(GatewayError):
    """An API client cannot be created as asked (unknown scope, credit for a user's client)."""


class ApiClientLimitExceeded(GatewayError):
    """The request is over one of its client's limits; nothing was applied."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit

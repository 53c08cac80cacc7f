"""Refusals of the HTTP edge: its input, API clients and Idempotency-Keys. Each message is fit
for an operator or an API client."""


class GatewayError(Exception):
    pass


class InputRefused(GatewayError):
    """A request's input refused at the boundary (gateway.boundary): its HTTP status (400, or
    413 for a body over its limit), error code and the field at fault."""

    def __init__(self, status: int, code: str, message: str, field: str):
        super().__init__(message)
        self.status, self.code, self.field = status, code, field


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

"""Domain errors of the treasury; each message is fit for an operator or an HTTP client."""


class TreasuryError(Exception):
    pass


class DueUnavailable(TreasuryError):
    """The provider could not be reached, timed out or answered 5xx/429: worth retrying."""


class DueRefused(TreasuryError):
    """The provider refused the request itself (4xx): final."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class JobRefused(TreasuryError):
    """The action is not possible for this job in its state."""


class ThresholdInvalid(TreasuryError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class CallbackRejected(TreasuryError):
    """A provider callback whose signature or body is not acceptable."""

    def __init__(self, message: str, field: str = "body"):
        super().__init__(message)
        self.field = field

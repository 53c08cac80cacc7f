"""Domain errors of the on-chain engine; each message is fit for an HTTP client or an operator."""


class OnchainError(Exception):
    pass


class SignatureRejected(OnchainError):
    """The notification's signature is missing, malformed or does not verify."""


class UnknownSigningKey(OnchainError):
    """Circle does not know the key id the notification names."""


class CircleUnavailable(OnchainError):
    """Circle could not be reached or answered with a server error."""


class MalformedNotification(OnchainError):
    """The body is not a notification we understand."""


class CircleRefused(OnchainError):
    """Circle refused the request itself (a final answer, not worth resending)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class WithdrawalRefused(OnchainError):
    """The withdrawal cannot be made as asked (bad address, amount, or state for the action)."""

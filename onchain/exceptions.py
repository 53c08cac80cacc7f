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

"""What an AWS call can end in, named by the service and the endpoint that was asked."""


class AwsError(Exception):
    """An AWS call did not do what was asked."""


class AwsUnavailable(AwsError):
    """The service could not be reached or asked (network, timeout, no region or credentials):
    a later attempt may succeed."""


class AwsRefused(AwsError):
    """The service answered with an error (`code`: AccessDenied, ResourceNotFoundException...)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code

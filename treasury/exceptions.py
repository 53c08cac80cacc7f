"""Domain errors of the treasury; each message is fit for an operator or an HTTP client. The
jobs' state trigger (SQLSTATE TR001) is translated here so callers never see a driver error."""

from contextlib import AbstractContextManager

from ledger.exceptions import database_errors_translated


class TreasuryError(Exception):
    pass


class DueUnavailable(TreasuryError):
    """The provider could not be reached, timed out or answered 5xx/429: worth retrying."""


class ConversionMalformed(DueUnavailable):
    """What the provider said of a conversion is not one we can read or record (`field` names
    what): taken as no answer, so the job is asked again (the next answer may be right); a
    callback carrying it is refused naming the field."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


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


class ProviderInvalid(TreasuryError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class CallbackRejected(TreasuryError):
    """A provider callback whose signature or body is not acceptable."""

    def __init__(self, message: str, field: str = "body"):
        super().__init__(message)
        self.field = field


class ConversionNotReversible(JobRefused):
    """A completed conversion's reversal that the ledger cannot take: the target buffer no
    longer holds what the conversion brought."""


class JobTransitionRefused(JobRefused):
    """PostgreSQL refused a job's change (TR001, treasury/sql/treasury.sql): an illegal state
    transition, a change of what the job converts, or a replaced provider reference."""


class ProviderNotConfigured(TreasuryError):
    """No API host is configured in the settings for this provider's code."""


# The SQLSTATEs raised by treasury/sql/treasury.sql.
SQLSTATE_ERRORS: dict[str, type[TreasuryError]] = {"TR001": JobTransitionRefused}


def treasury_rules() -> AbstractContextManager[None]:
    """Around a write to conversion jobs: the trigger's refusal (TR001) is raised as
    JobTransitionRefused; any other database error passes unchanged."""
    return database_errors_translated(SQLSTATE_ERRORS)

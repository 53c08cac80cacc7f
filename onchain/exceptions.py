"""Domain errors of the on-chain engine; each message is fit for an HTTP client or an operator."""

from contextlib import AbstractContextManager

from ledger.exceptions import database_errors_translated


class OnchainError(Exception):
    pass


class SignatureRejected(OnchainError):
    """The notification's signature is missing, malformed or does not verify."""


class UnknownSigningKey(OnchainError):
    """Circle does not know the key id the notification names."""


class CircleUnavailable(OnchainError):
    """Circle could not be reached or answered with a server error."""


class MalformedNotification(OnchainError):
    """The body is not a notification we understand; `field` names what is wrong (a key of
    the notification, or the body)."""

    def __init__(self, message: str, field: str = "body"):
        super().__init__(message)
        self.field = field


class SnsMalformed(OnchainError):
    """An Amazon SNS delivery that is not an SNS message we can read; `field` names what is
    wrong (a field of SNS's envelope, or the body)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class SnsRejected(OnchainError):
    """An Amazon SNS delivery we do not trust: not from a topic of ours, a certificate or
    confirmation URL off SNS's hosts, a signature that does not verify. Nothing is fetched
    after a URL is refused, nothing is stored. `field` names the envelope's field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class SnsUnavailable(OnchainError):
    """SNS's signing certificate or a subscription's confirmation URL could not be fetched:
    retryable (SNS redelivers)."""


class TransferRefused(OnchainError):
    """A verified notification's transfer that will not be credited or settled as it stands
    (a currency we do not hold, an amount we cannot read, another wallet's transfer): kept
    with why for an operator, and answered 200 (Circle's retry would bring the same)."""


class CircleRefused(OnchainError):
    """Circle refused the request itself (a final answer, not worth resending)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class WithdrawalRefused(OnchainError):
    """The withdrawal cannot be made as asked (bad address, amount, or state for the action)."""


class WithdrawalTransitionRefused(OnchainError):
    """PostgreSQL refused a change to a withdrawal (OC001, onchain/sql/onchain.sql): an illegal
    state transition, a change to what was held, or a delete."""


class CancelRefused(WithdrawalRefused):
    """Circle has, or may have, the withdrawal's transfer: cancelling would pay twice."""


class DepositAddressRefused(OnchainError):
    """PostgreSQL refused a deposit address (OC002, onchain/sql/onchain.sql): its user holds
    another currency, so its deposits could never be credited."""


class AddressInvalid(OnchainError):
    """An address cannot be registered or sent to as given; `field` names what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class DepositAddressTaken(OnchainError):
    """The address is registered on that chain for another user (one address, one user)."""


class DepositAddressUnknown(OnchainError):
    """No such deposit address is registered on that chain."""


# The SQLSTATEs raised by onchain/sql/onchain.sql.
SQLSTATE_ERRORS: dict[str, type[OnchainError]] = {
    "OC001": WithdrawalTransitionRefused,
    "OC002": DepositAddressRefused,
}


def onchain_rules() -> AbstractContextManager[None]:
    """Around the transaction that changes a withdrawal or a deposit address: the database's
    refusal (OC001, OC002) is raised as its domain error, with the trigger's message."""
    return database_errors_translated(SQLSTATE_ERRORS)

"""Domain errors of the on-chain engine; each message is fit for an HTTP client or an operator."""

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DatabaseError


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


class WithdrawalTransitionRefused(OnchainError):
    """PostgreSQL refused a change to a withdrawal (OC001, onchain/sql/onchain.sql): an illegal
    state transition, a change to what was held, or a delete."""


class CancelRefused(WithdrawalRefused):
    """Circle has, or may have, the withdrawal's transfer: cancelling would pay twice."""


# SQLSTATE raised by onchain/sql/onchain.sql.
WITHDRAWAL_RULE = "OC001"


@contextmanager
def withdrawal_rules() -> Iterator[None]:
    """Map the database's withdrawal rules (OC001) to WithdrawalTransitionRefused, with the
    trigger's message. Used around the transaction that changes a withdrawal, so the failed
    transaction is already rolled back when the domain error reaches the caller."""
    try:
        yield
    except DatabaseError as exc:
        cause = exc.__cause__
        if getattr(cause, "sqlstate", None) != WITHDRAWAL_RULE:
            raise
        raise WithdrawalTransitionRefused(cause.diag.message_primary or str(exc)) from exc

"""Domain errors of the ledger. Database rule violations (SQLSTATE LD001..LD009, raised by
ledger/sql/ledger.sql) are translated here so callers never see a driver error."""

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DatabaseError


class LedgerError(Exception):
    """Base class; `str()` is a message fit for an operator or an API client."""


class InvalidPosting(LedgerError):
    """The posting is malformed (legs, reference, kind)."""


class InvalidAmount(InvalidPosting):
    """An amount that is not a positive exact decimal within its currency's places."""


class UnbalancedTransaction(InvalidPosting):
    """Debits and credits differ in some currency."""


class IdempotencyConflict(LedgerError):
    """The reference was already posted with different legs."""


class InsufficientFunds(LedgerError):
    """The posting would take an account below zero that may not go there."""


class UnknownAccount(LedgerError):
    """A leg names an account that does not exist."""


class CurrencyMismatch(InvalidPosting):
    """A leg's currency is not its account's currency."""


class ImmutableRecord(LedgerError):
    """Entries and transactions are never updated or deleted; an account's balance, entry count
    and hash chain move only by posting entries, and its currency never changes."""


SQLSTATE_ERRORS: dict[str, type[LedgerError]] = {
    "LD001": IdempotencyConflict,
    "LD002": InsufficientFunds,
    "LD003": UnknownAccount,
    "LD004": CurrencyMismatch,
    "LD005": InvalidAmount,
    "LD006": UnbalancedTransaction,
    "LD007": ImmutableRecord,
    "LD008": UnbalancedTransaction,
    "LD009": ImmutableRecord,
}


def sqlstate_of(exc: BaseException) -> str | None:
    cause = exc.__cause__ if isinstance(exc, DatabaseError) else exc
    return getattr(cause, "sqlstate", None)


def database_error_from(exc: DatabaseError, errors: dict[str, type[Exception]]) -> Exception | None:
    """The domain error for a database error whose SQLSTATE `errors` maps (each app's
    SQLSTATE_ERRORS in its exceptions.py), carrying the rule's message; None for any other."""
    error_class = errors.get(sqlstate_of(exc) or "")
    if error_class is None:
        return None
    diag = getattr(exc.__cause__, "diag", None)
    message = getattr(diag, "message_primary", None) or str(exc)
    return error_class(message.removeprefix("ledger: "))


@contextmanager
def database_errors_translated(errors: dict[str, type[Exception]]) -> Iterator[None]:
    """Around a write: a database error whose SQLSTATE `errors` maps is raised as its domain
    error; any other passes unchanged. Put it outside the transaction, so the failed
    transaction is already rolled back when the domain error reaches the caller."""
    try:
        yield
    except DatabaseError as exc:
        error = database_error_from(exc, errors)
        if error is None:
            raise
        raise error from exc


def ledger_error_from(exc: DatabaseError) -> LedgerError | None:
    """The domain error for a database error raised by a ledger rule, or None."""
    return database_error_from(exc, SQLSTATE_ERRORS)

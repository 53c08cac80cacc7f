"""Domain errors of the cutover. Each message is fit for an operator or an API client. The
SQLSTATEs of cutover/sql/cutover.sql (CU001..CU009) are translated here."""

from django.db import DatabaseError

from ledger.exceptions import InsufficientFunds, sqlstate_of


class CutoverError(Exception):
    pass


class AppendOnlyRecord(CutoverError):
    """The audit trail and the balance path's journal are never updated or deleted."""


class KillSwitchEngaged(CutoverError):
    """Every money mutation is refused while the kill switch is on."""


class TransitionRefused(CutoverError):
    """The requested phase change is not legal from the current phase."""


class GateNotMet(CutoverError):
    def __init__(self, message: str, evidence: dict):
        super().__init__(message)
        self.evidence = evidence


class ReasonRequired(CutoverError):
    pass


class OperatorNotPermitted(CutoverError):
    pass


class MutationConflict(CutoverError):
    """A mutation that cannot be this user's: its reference was used for another one, or its
    currency is not the one the user holds. `field` names what is wrong, when it is the
    caller's (`reference`, `currency`, `direction`), for an API answer naming it."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class CurrencyNotHeld(CutoverError):
    """A user's balance asked for in a currency the user does not hold (a user has one)."""


class StrictLedgerFailure(CutoverError):
    """The ledger refused a write the phase requires (strict, cutover, or the legacy mirror
    once custody is open), so the whole request failed. Carries what a StrictFailure row
    records (cutover.balance_path.strict_failure_recorded)."""

    def __init__(self, message: str, *, phase: str, user_id, reference: str):
        super().__init__(message)
        self.phase = phase
        self.user_id = user_id
        self.reference = reference
        self.recorded = False


class NotApplicable(CutoverError):
    """The operation has no meaning in the current phase."""


class ReconciliationBusy(CutoverError):
    """Another reconciliation holds the single-leader lock."""


class ConcurrentDuplicate(CutoverError):
    """The same reference was committed by a concurrent request first; nothing was applied."""


class CustodyRefused(CutoverError):
    """A custody opening or reading that cannot be booked (already open, bad figure)."""


class ArchiveRefused(CutoverError):
    """The legacy store cannot be archived now (not in cutover, or not for long enough)."""


class LegacyStoreArchived(CutoverError):
    """The legacy store was archived: it is never written again and cutover is never left."""


class TriageRefused(CutoverError):
    """A discrepancy's triage or repair that its state does not allow (or that names nothing)."""


class SecondPersonRequired(TriageRefused):
    """A repair is approved by another operator than the one who requested it."""


class RepairLapsed(TriageRefused):
    """A repair that can no longer be applied as requested (the stores moved, the discrepancy
    ended, or a newer request replaced it): recorded as lapsed, nothing posted."""


# The SQLSTATEs raised by cutover/sql/cutover.sql (LD002: the ledger's refusal of a debit in
# phase cutover, passed through by cutover_balance_mutate).
SQLSTATE_ERRORS: dict[str, type[Exception]] = {
    "CU001": AppendOnlyRecord,
    "CU002": KillSwitchEngaged,
    "CU003": MutationConflict,
    "CU004": InsufficientFunds,
    "CU005": StrictLedgerFailure,
    "CU006": ConcurrentDuplicate,
    "CU007": ArchiveRefused,
    "CU008": LegacyStoreArchived,
    "CU009": TriageRefused,
    "LD002": InsufficientFunds,
}


def cutover_error_from(
    exc: DatabaseError, *, user_id=None, reference: str = ""
) -> Exception | None:
    """The domain error for a database error raised by a cutover rule, or None. A strict
    failure carries the mutation's user and reference, and its phase from the error's DETAIL."""
    error_class = SQLSTATE_ERRORS.get(sqlstate_of(exc) or "")
    if error_class is None:
        return None
    diag = exc.__cause__.diag
    message = (diag.message_primary or str(exc)).removeprefix("ledger: ")
    if error_class is MutationConflict:  # the database names the argument (COLUMN)
        return MutationConflict(message, diag.column_name)
    if error_class is StrictLedgerFailure:
        return StrictLedgerFailure(
            message, phase=diag.message_detail or "", user_id=user_id, reference=reference
        )
    return error_class(message)

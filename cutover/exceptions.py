"""Domain errors of the cutover. Each message is fit for an operator or an API client."""


class CutoverError(Exception):
    pass


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
    """The reference was already used for a different mutation."""


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

"""The migration's state: the legacy `balances` table, the phase, its audit trail, the balance
path's journal, discrepancies, reconciliation runs, strict-mode failures, and custody (the
opening of each system buffer and the custody discrepancies).

What PostgreSQL holds: one phase row (id = 1) with a legal phase and read percentage; legacy
balances never negative; one currency per user (one legacy row, at most one ledger balance
account, and cutover_balance_mutate refuses any other currency); one journal row per mutation
reference (exactly once), never updated or deleted; one open discrepancy per user and currency;
audit rows never updated or deleted (triggers in cutover/sql/cutover.sql); custody opened once
per currency, from a reported balance that is not negative; one open custody discrepancy per
currency and source; the legacy store archived once, only after its time in cutover, and never
left again (no phase but cutover once it is archived); a discrepancy's triage moves only as
cutover_discrepancy_transition allows (open -> investigating | known difference -> repaired |
resolved; repaired only by an applied repair, which another operator approved than the one who
requested it); known-difference rules never change except to end early; repair requests are
decided once; alert states change only when they flip; at most one reconciliation run running,
a run finished exactly when it is not running, and a difference listed once per run, user and
currency; at most one unfinished backfill run, its user ranges one per run and seq with low <
high, and a backfill posting once per state of a user's account.
"""

from cutover.models.backfill import BackfillPosting, BackfillRange, BackfillRun
from cutover.models.custody import CustodyDiscrepancy, CustodyOpening
from cutover.models.discrepancies import (
    UNRESOLVED,
    Discrepancy,
    DiscrepancyRepair,
    DiscrepancySource,
    DiscrepancyStatus,
    KnownDifference,
    RepairSide,
    RepairStatus,
    TriageStatus,
)
from cutover.models.mutations import BalanceMutation, LedgerStatus, StrictFailure
from cutover.models.phase import (
    PHASE_CHOICES,
    AuditAction,
    Direction,
    LegacyBalance,
    OperatorAudit,
    PhaseAudit,
    PhaseState,
)
from cutover.models.reconciliation import (
    ReconciliationChunk,
    ReconciliationDifference,
    ReconciliationRun,
    RunStatus,
)
from cutover.models.records import AlertState, LegacyArchive, TaskDelivery, TaskDeliveryStatus

__all__ = [
    "PHASE_CHOICES",
    "UNRESOLVED",
    "AlertState",
    "AuditAction",
    "BackfillPosting",
    "BackfillRange",
    "BackfillRun",
    "BalanceMutation",
    "CustodyDiscrepancy",
    "CustodyOpening",
    "Direction",
    "Discrepancy",
    "DiscrepancyRepair",
    "DiscrepancySource",
    "DiscrepancyStatus",
    "KnownDifference",
    "LedgerStatus",
    "LegacyArchive",
    "LegacyBalance",
    "OperatorAudit",
    "PhaseAudit",
    "PhaseState",
    "ReconciliationChunk",
    "ReconciliationDifference",
    "ReconciliationRun",
    "RepairSide",
    "RepairStatus",
    "RunStatus",
    "StrictFailure",
    "TaskDelivery",
    "TaskDeliveryStatus",
    "TriageStatus",
]

"""Every PostgreSQL advisory lock key the product takes, in one registry (tests check the keys
are unique). Keys are fixed 64-bit numbers: a job that reuses another's key would make each
skip or wait for the other, so a new lock gets a new line here, never a reused number."""

PHASE_LOCK = 7_401_001  # also written in cutover_balance_mutate (cutover/sql/cutover.sql)
# Exclusive (tried) by a reconciliation; shared by a discrepancy repair while it posts, so a
# reconciliation never compares a snapshot taken before a repair committed.
RECONCILE_LOCK = 7_401_002
SETTLEMENT_CYCLE_LOCK = 7_401_003
CUSTODY_RECONCILE_LOCK = 7_401_004
# With a second key, the transfer id's hash: pg_advisory_xact_lock(int, int) (a key space of
# its own): one credit decision per Circle transfer at a time.
CIRCLE_TRANSFER_LOCK = 7_401_005
# With a second key, the task id's hash, session-level for a task's whole run: one copy of a
# Celery message runs at a time (cutover.deliveries).
TASK_DELIVERY_LOCK = 7_401_006
# With a second key, the notification id's hash: one delivery of a Circle notification id is
# stored and applied at a time (onchain_deposit_notification_accept, onchain/sql/onchain.sql).
CIRCLE_NOTIFICATION_LOCK = 7_401_007
# Session-level, in a scratch database itself, by the session that made it, for as long as it
# is in use (rehearsal.runtime.scratch_database): free, the database is a killed run's orphan.
SCRATCH_DATABASE_LOCK = 7_401_008
# Transaction-level, around counting and recording one fetch of signing material we do not
# hold (onchain.signatures.signing_fetch_claim): concurrent deliveries cannot all pass.
SIGNING_FETCH_LOCK = 7_401_009
# With a second key, the conversion job's id's hash, session-level around asking the provider
# about a job and applying its answer (treasury.settlement.job_ask_settle): an answer read
# before another asker's newer one is never applied after it.
CONVERSION_ASK_LOCK = 7_401_010

REGISTRY = {
    "phase": PHASE_LOCK,
    "reconcile": RECONCILE_LOCK,
    "settlement_cycle": SETTLEMENT_CYCLE_LOCK,
    "custody_reconcile": CUSTODY_RECONCILE_LOCK,
    "circle_transfer": CIRCLE_TRANSFER_LOCK,
    "task_delivery": TASK_DELIVERY_LOCK,
    "circle_notification": CIRCLE_NOTIFICATION_LOCK,
    "scratch_database": SCRATCH_DATABASE_LOCK,
    "signing_fetch": SIGNING_FETCH_LOCK,
    "conversion_ask": CONVERSION_ASK_LOCK,
}

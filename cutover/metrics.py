"""The cutover's Prometheus metrics (names from seed 001)."""

from prometheus_client import Counter, Gauge

discrepancy_count = Gauge(
    "discrepancy_count",
    "Discrepancies recorded (dual writes and reconciliation)",
    multiprocess_mode="sum",
)
ledger_write_outcome = Counter(
    "cutover_ledger_write", "Ledger writes of the balance path by outcome", ["outcome"]
)
write_success_rate = Gauge(
    "write_success_rate",
    "Share of the balance path's ledger writes that succeeded (the last process to write)",
    multiprocess_mode="mostrecent",
)
strict_failures = Counter("cutover_strict_failures", "Requests failed by strict mode")
balance_mutations = Counter(
    "cutover_balance_mutations", "Balance mutations by phase and outcome", ["phase", "outcome"]
)
custody_discrepancies = Counter(
    "cutover_custody_discrepancies",
    "Custody discrepancies opened: a system buffer differs from its provider's balance",
)
task_deliveries_dead = Counter(
    "celery_task_deliveries_dead",
    "Celery messages given up: their process died at each of TASK_DELIVERY_MAX_ATTEMPTS starts",
)

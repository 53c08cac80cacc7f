"""The treasury's Prometheus metrics (names from seed 001)."""

from prometheus_client import Counter, Gauge, Histogram

buffer_check = Counter(
    "treasury_buffer_check", "Buffers checked by settlement cycles", ["currency", "state"]
)
jobs_created = Counter("treasury_conversion_jobs_created", "Conversion jobs created", ["currency"])
cycle_duration_ms = Histogram(
    "treasury_settlement_cycle_duration_ms",
    "Settlement cycle duration (ms)",
    buckets=(5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
jobs_failed = Counter("conversion_jobs_failed", "Conversion jobs failed or timed out")
jobs_contradicted = Counter(
    "treasury_conversion_jobs_contradicted",
    "Final conversion jobs the provider later contradicted (a completed one refunded, a failed "
    "one processed)",
    ["status"],
)
for _status in ("completed", "disputed", "failed", "cancelled"):  # exported from 0
    jobs_contradicted.labels(status=_status)
system_buffer_usdc = Gauge(
    "system_buffer_usdc",
    "The system USDC buffer, from the ledger",
    multiprocess_mode="mostrecent",
)

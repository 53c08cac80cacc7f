"""The ledger's Prometheus metrics (names from seed 001)."""

from prometheus_client import Counter, Histogram

transaction_created = Counter(
    "ledger_transaction_created",
    "Ledger transactions committed by the posting function",
    ["kind"],
)
transaction_duration_ms = Histogram(
    "ledger_transaction_duration_ms",
    "Time to post a ledger transaction, including commit, in milliseconds",
    buckets=(0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
account_balance_checked = Counter(
    "ledger_account_balance_checked",
    "Account balances read or verified",
    ["source"],
)
transaction_retried = Counter(
    "ledger_transaction_retried",
    "Postings retried after a serialization failure or deadlock",
    ["sqlstate"],
)

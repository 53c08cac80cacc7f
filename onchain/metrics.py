"""The on-chain engine's Prometheus metrics (names from seed 001)."""

from prometheus_client import Counter, Gauge

webhook_received = Counter(
    "circle_webhook_received", "Circle notifications received, by outcome", ["outcome"]
)
deposits_processed = Counter("onchain_deposits_processed", "Inbound transfers credited")
buffer_level = Gauge(
    "onchain_buffer_level",
    "The system USDC buffer, from the ledger",
    multiprocess_mode="mostrecent",
)
withdrawals_executed = Counter("onchain_withdrawals_executed", "Withdrawals Circle completed")
withdrawals_dead = Counter("onchain_withdrawals_dead", "Withdrawals whose sending gave up")
poll_transfers_malformed = Counter(
    "onchain_poll_transfers_malformed",
    "Transfers in Circle's list the poll could not read, parked in the inbox",
)
notifications_refused = Counter(
    "onchain_notifications_refused",
    "Verified Circle notifications kept but not credited (currency, amount, another wallet)",
)
transfer_discrepancies = Counter(
    "onchain_transfer_discrepancies",
    "Notifications contradicting a transfer already credited, recorded for an operator",
)

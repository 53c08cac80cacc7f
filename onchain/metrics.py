"""The on-chain engine's Prometheus metrics (names from seed 001)."""

from prometheus_client import Counter

webhook_received = Counter(
    "circle_webhook_received", "Circle notifications received, by outcome", ["outcome"]
)
deposits_processed = Counter("onchain_deposits_processed", "Inbound transfers credited")

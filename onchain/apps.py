from django.apps import AppConfig


class OnchainConfig(AppConfig):
    """Circle USDC deposits and withdrawals driven by signed webhooks."""

    name = "onchain"
    verbose_name = "On-chain"

from django.apps import AppConfig


class CustodyConfig(AppConfig):
    """Custody read from the custodians: what Circle (USDC) and Due (USD) report becomes the
    buffers' opening balances and is compared with them. Above both engines, because it reads
    both engines' providers and the engines never import each other."""

    name = "custody"
    verbose_name = "Custody"

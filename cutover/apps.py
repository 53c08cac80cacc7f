from django.apps import AppConfig


class CutoverConfig(AppConfig):
    """The migration from legacy balances to the ledger (phases, dual-write, reconciliation)."""

    name = "cutover"
    verbose_name = "Cutover"

import decimal

from django.apps import AppConfig

# Amounts live in numeric(38, 6) columns: up to 38 digits. Python's default decimal context
# keeps 28, so a balance past 10^22 was rounded by any sum in Python and could not be quantized
# to its currency's places at all (found from outside: every read of such a balance was a 500).
MONEY_DIGITS = 38


class LedgerConfig(AppConfig):
    name = "ledger"
    verbose_name = "Ledger"

    def ready(self) -> None:
        # Every thread's context starts as a copy of DefaultContext; this one is already made.
        decimal.DefaultContext.prec = MONEY_DIGITS
        decimal.getcontext().prec = MONEY_DIGITS

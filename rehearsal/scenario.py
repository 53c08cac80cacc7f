"""The rehearsal's fixed figures (currencies, the actor, the short gates, the synthetic custody)
and the users' totals in each store, which the drills and the report compare."""

from datetime import timedelta
from decimal import Decimal

from django.db import connection

from cutover.actors import Actor

CENT = Decimal("0.01")
ACTOR = Actor("rehearsal")
CURRENCIES = ("USDC", "USD")
# One legacy user in ten holds USD (the second of every ten, so that even two users have both).
USD_EVERY = 10
# Gates wait 48-72 h in production; the rehearsal shows the same gates with seconds.
REHEARSAL_MIN_DURATION = timedelta(seconds=1)
# A conversion's submit is retried twice, at once, instead of five times over minutes.
REHEARSAL_SUBMIT_ATTEMPTS = 2
# The company's fiat at Due in the rehearsal's synthetic custody (enough to refill USDC).
REHEARSAL_FIAT_CUSTODY = Decimal("200000.00")
PRE_SHADOW_WITHDRAWAL = Decimal("250.00")

USER_TOTALS_SQL = """
    SELECT currency, 'legacy', sum(buying_power) FROM balances GROUP BY currency
    UNION ALL
    SELECT currency, 'ledger', sum(balance) FROM ledger_user_balances GROUP BY currency
"""


def user_totals() -> dict[str, dict[str, Decimal]]:
    """Per currency, the users' total in each store: {"USDC": {"legacy": .., "ledger": ..}}."""
    totals = {currency: {"legacy": Decimal(0), "ledger": Decimal(0)} for currency in CURRENCIES}
    with connection.cursor() as cursor:
        cursor.execute(USER_TOTALS_SQL)
        for currency, store, total in cursor.fetchall():
            totals.setdefault(currency, {"legacy": Decimal(0), "ledger": Decimal(0)})[store] = total
    return totals

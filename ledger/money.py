"""Exact amounts per currency. The database holds the same table (ledger_currencies) and checks
it again; this copy gives a clear error before a round trip."""

import re
from decimal import Decimal, InvalidOperation

from ledger.exceptions import InvalidAmount

CURRENCY_DECIMALS = {"USD": 2, "USDC": 6}
# Amounts live in numeric(38, 6) columns; one amount is kept well inside them (so that sums of
# many still fit) and inside Python's default 28-digit decimal context.
MAX_AMOUNT = Decimal("1e20")
# What an amount written as text may look like. Decimal() alone would also read "1_000",
# Arabic-Indic digits, " 10 ", "+5", "1e1", ".5" and "5.": none of them is how anyone writes
# money, and each guess is a chance to move the wrong sum.
PLAIN_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)


def amount_parse(value: Decimal | str | int, currency: str) -> Decimal:
    """A positive Decimal with no more places than `currency` has. Text must be a plain
    decimal in ASCII digits ("10", "10.50"); floats are refused."""
    if currency not in CURRENCY_DECIMALS:
        raise InvalidAmount(f"unknown currency {currency!r}")
    if isinstance(value, float | bool):
        raise InvalidAmount(f"amount {value!r} must be an exact decimal (a string), not a float")
    if isinstance(value, str) and not PLAIN_DECIMAL.fullmatch(value):
        raise InvalidAmount(
            f'amount {value!r} must be a plain decimal in ASCII digits, such as "10.50"'
        )
    try:
        amount = Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise InvalidAmount(f"amount {value!r} is not a decimal number") from None
    if not amount.is_finite() or amount <= 0:
        raise InvalidAmount(f"amount {value!r} must be a positive number")
    if amount >= MAX_AMOUNT:
        raise InvalidAmount(f"amount {value} is too large (it must be below 10^20)")
    places = CURRENCY_DECIMALS[currency]
    if amount != amount.quantize(Decimal(1).scaleb(-places)):
        raise InvalidAmount(f"amount {value} has more than {places} decimal places for {currency}")
    return amount


def amount_format(amount: Decimal, currency: str) -> str:
    return str(amount.quantize(Decimal(1).scaleb(-CURRENCY_DECIMALS[currency])))

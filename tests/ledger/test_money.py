"""Amounts are plain ASCII decimals: what a person or a provider writes is read exactly, and
anything else is refused rather than guessed at."""

from decimal import Decimal

import pytest

from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse


@pytest.mark.parametrize(
    ("text", "currency", "expected"),
    [
        ("10", "USDC", Decimal("10")),
        ("10.5", "USD", Decimal("10.5")),
        ("0.000001", "USDC", Decimal("0.000001")),
        ("10.50", "USD", Decimal("10.50")),
        ("007.10", "USD", Decimal("7.10")),
    ],
)
def test_plain_decimals_are_read_exactly(text, currency, expected):
    assert amount_parse(text, currency) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1_000",  # Python's digit grouping
        "\u0661\u0660",  # Arabic-Indic digits (Decimal reads them as 10)
        "\uff11\uff10",  # full-width digits
        " 10 ",
        "10\n",
        "+5",
        "1e1",
        "1E+1",
        ".5",
        "5.",
        "",
        "1,000",
        "Infinity",
        "NaN",
        "0x10",
        "10\x00",
    ],
)
def test_anything_but_a_plain_ascii_decimal_is_refused(text):
    with pytest.raises(InvalidAmount, match="plain decimal"):
        amount_parse(text, "USDC")


def test_decimals_and_integers_from_code_are_still_taken():
    assert amount_parse(Decimal("2.5"), "USD") == Decimal("2.5")
    assert amount_parse(3, "USDC") == Decimal(3)
    with pytest.raises(InvalidAmount):
        amount_parse(True, "USDC")

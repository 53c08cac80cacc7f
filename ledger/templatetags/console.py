"""How the operators' console writes things for people, in one place: amounts with thousands
separators in their currency's scale, durations and ages in words, and stored data (gate
evidence, settlement decisions, audit values, metadata) as tables, never a Python repr or raw
JSON. Template filters (`{% load console %}`: `amount`, `duration`, `since`, `as_table`) and the
same functions for the admins' columns (`amount_column`, `moment_column`, `table_column`,
`duration_column`)."""

import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

from django import template
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from ledger.money import CURRENCY_DECIMALS

register = template.Library()

NOTHING = "—"
DECIMAL_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)
ISO_MOMENT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")
# Column names an operator reads better than the stored key.
KEY_LABELS = {"ok": "met", "id": "id"}


def _decimal(value) -> Decimal | None:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, str) and DECIMAL_TEXT.fullmatch(value):
        try:
            return Decimal(value)
        except InvalidOperation:
            return None
    return None


def amount_display(value, currency: str | None = None) -> str:
    """`1234.5`, "USDC" -> "1,234.500000 USDC"; in a currency we do not know (or a total over
    several), the value's own places with separators. None -> "—"."""
    amount = _decimal(value)
    if amount is None:
        return NOTHING if value is None else str(value)
    if currency in CURRENCY_DECIMALS:
        places = CURRENCY_DECIMALS[currency]
        return f"{amount.quantize(Decimal(1).scaleb(-places)):,.{places}f} {currency}"
    places = max(0, -amount.as_tuple().exponent)
    return f"{amount:,.{places}f}"


_UNITS = (("day", 86_400), ("hour", 3_600), ("minute", 60), ("second", 1))


def duration_display(value: timedelta | None) -> str:
    """A duration in words, its two largest units: "2 days 3 hours", "48 seconds",
    "350 ms"."""
    if value is None:
        return NOTHING
    seconds = abs(value.total_seconds())
    if seconds < 1:
        milliseconds = round(seconds * 1000)
        return f"{milliseconds} ms" if milliseconds else "less than 1 ms"
    parts = []
    left = int(seconds)
    for unit, size in _UNITS:
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count} {unit}{'' if count == 1 else 's'}")
    return " ".join(parts[:2])


def since_display(moment: datetime | None) -> str:
    """How long ago (or how far ahead) a moment is, in words: "3 hours ago", "in 7 days"."""
    if moment is None:
        return NOTHING
    delta = timezone.now() - moment
    if delta >= timedelta(0):
        return f"{duration_display(delta)} ago"
    return f"in {duration_display(-delta)}"


def moment_display(moment: datetime | None) -> str:
    if moment is None:
        return NOTHING
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M:%S %Z}"


def _label(key) -> str:
    key = str(key)
    return KEY_LABELS.get(key, key.replace("_", " "))


def _scalar(value, currency: str | None) -> str:
    if value is None or value == "":
        return NOTHING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        if ISO_MOMENT.match(value):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                return value
            return value if timezone.is_naive(moment) else moment_display(moment)
        if DECIMAL_TEXT.fullmatch(value):
            return amount_display(value, currency)
        return value
    if isinstance(value, Decimal):
        return amount_display(value, currency)
    return str(value)


def _cell(value, currency: str | None) -> SafeString:
    if isinstance(value, Mapping | list | tuple):
        return table_display(value, currency)
    return format_html("{}", _scalar(value, currency))


def table_display(data, currency: str | None = None) -> SafeString:
    """Stored data as HTML tables: a mapping as rows of label and value, a list of mappings
    as a table with a column per key, nested data as nested tables; decimal values as amounts
    of the mapping's `currency` (or of the currency a key names), moments as dates, booleans as
    yes/no. Everything escaped."""
    if isinstance(data, Mapping):
        if not data:
            return format_html("{}", NOTHING)
        currency = data.get("currency") if isinstance(data.get("currency"), str) else currency
        rows = format_html_join(
            "",
            "<tr><th scope='row'>{}</th><td>{}</td></tr>",
            (
                (_label(key), _cell(value, key if key in CURRENCY_DECIMALS else currency))
                for key, value in data.items()
            ),
        )
        return format_html("<table class='console-data'><tbody>{}</tbody></table>", rows)
    if isinstance(data, list | tuple):
        if not data:
            return format_html("{}", NOTHING)
        if all(isinstance(item, Mapping) for item in data):
            keys = list(dict.fromkeys(key for item in data for key in item))
            head = format_html_join("", "<th scope='col'>{}</th>", ((_label(k),) for k in keys))
            body = format_html_join(
                "",
                "<tr>{}</tr>",
                (
                    (
                        format_html_join(
                            "",
                            "<td>{}</td>",
                            ((_cell(item.get(k), item.get("currency", currency)),) for k in keys),
                        ),
                    )
                    for item in data
                ),
            )
            return format_html(
                "<table class='console-data'><thead><tr>{}</tr></thead><tbody>{}</tbody></table>",
                head,
                body,
            )
        return format_html_join(", ", "{}", ((_cell(item, currency),) for item in data))
    return _cell(data, currency)


@register.filter
def amount(value, currency: str | None = None) -> str:
    return amount_display(value, currency)


@register.filter
def duration(value: timedelta | None) -> str:
    return duration_display(value)


@register.filter
def since(value: datetime | None) -> str:
    return since_display(value)


@register.filter
def as_table(value, currency: str | None = None) -> SafeString:
    return table_display(value, currency)


def amount_column(
    field: str,
    description: str | None = None,
    *,
    currency: str | None = None,
    currency_field: str = "currency",
) -> Callable:
    """An admin column (list_display, readonly_fields) showing `field` as an amount: of the
    fixed `currency` ("" for none: a total over several), or of the row's `currency_field`."""

    def column(model_admin, obj) -> str:
        code = currency if currency is not None else getattr(obj, currency_field)
        return amount_display(getattr(obj, field), code)

    column.short_description = description or field.replace("_", " ")
    column.admin_order_field = field
    return column


def moment_column(field: str, description: str | None = None, *, ago: bool = False) -> Callable:
    """An admin column showing a moment compactly ("2026-12-02 03:50 UTC"), or `ago`, how long
    ago or ahead it is in words."""

    def column(model_admin, obj) -> str:
        moment = getattr(obj, field)
        if ago or moment is None:
            return since_display(moment)
        return f"{timezone.localtime(moment):%Y-%m-%d %H:%M %Z}"

    column.short_description = description or field.replace("_", " ")
    column.admin_order_field = field
    return column


def table_column(field: str, description: str | None = None) -> Callable:
    """An admin field showing stored data (a JSON field) as tables."""

    def column(model_admin, obj) -> SafeString:
        return table_display(getattr(obj, field))

    column.short_description = description or field.replace("_", " ")
    return column


def duration_column(
    description: str, value: Callable[[object], timedelta | None], order: str | None = None
) -> Callable:
    """An admin column showing the duration `value(row)` in words."""

    def column(model_admin, obj) -> str:
        return duration_display(value(obj))

    column.short_description = description
    if order:
        column.admin_order_field = order
    return column

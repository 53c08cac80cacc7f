"""Due's API, as far as the treasury uses it, over real HTTP (gateway.providers).

Due's, as it documents them (due.readme.io; the examples and their addresses in
tests/treasury/fixtures/due/SOURCES.md):

- the transfer object: `{"id", "ownerId", "status", "source": {"amount", "fee", "currency",
  "rail"}, "destination": {"amount", "fee", "currency", "rail", ...}, "fxRate", "createdAt",
  "expiresAt"}`, amounts as decimal strings; a job's conversion is one transfer. It is final
  when `payment_processed` (completed) or `failed`, `canceled`, `refund_processed` (failed);
  every other status (`awaiting_funds`, `funds_received`, `approved`, `manual_review`,
  `payment_submitted`, `refund_submitted`, or one Due adds) is in flight;
- `GET /v1/transfers/{id}` -> the transfer object (how jobs are polled, and how a webhook is
  acted on: treasury.settlement.callback_receive);
- errors `{"error_code", "message", "http_code"}`; `Authorization: Bearer DUE_API_KEY`.

Still ours, not Due's (open work, README "Due client and sandbox"): creating a conversion,
`POST /v1/conversions` with `Idempotency-Key` (the same key names the same transfer), body
`{"source": {"currency", "amount"}, "destination": {"currency"}, "reference"}` -> 201 (200 for
a repeat) `{"data": transfer}`; finding it by key, `GET /v1/conversions?idempotency_key=K` ->
`{"data": transfer}`, 404 when the provider never received a creation under K (how a lost
answer is resolved); `GET /v1/balances` -> `{"data": [{"currency", "amount"}, ...]}`; and the
HMAC-SHA256 of `<X-Due-Timestamp>.<body>` with DUE_API_SECRET in `X-Due-Signature` that every
request carries. A call is tried DUE_HTTP_ATTEMPTS times on 5xx, 429 or a timeout, with a
short doubling pause; 4xx is final.

Where each provider's API is comes from the settings, never from the database: `due` is at
DUE_API_BASE_URL, any other provider code at TREASURY_PROVIDER_BASE_URLS[code]
(`provider_base_urls`, read by the services' callers and passed down).
"""

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Mapping
from decimal import Decimal
from urllib.parse import quote

from django.conf import settings

from gateway.boundary import printable_ascii
from gateway.providers import error_message, provider_call
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from treasury.exceptions import (
    ConversionMalformed,
    DueRefused,
    DueUnavailable,
    ProviderNotConfigured,
)
from treasury.models import ConversionJob

log = logging.getLogger(__name__)

RETRY_PAUSE = 0.2  # seconds, doubled per attempt
REFUSALS = frozenset(range(400, 500)) - {429}
# Due's final transfer statuses, as a job's conversion ends; any other is in flight.
STATUSES = {
    "payment_processed": "completed",
    "failed": "failed",
    "canceled": "failed",
    "refund_processed": "failed",
}
IN_FLIGHT = frozenset(
    {
        "awaiting_funds",
        "funds_received",
        "approved",
        "manual_review",
        "payment_submitted",
        "refund_submitted",
    }
)
# The longest conversion id a job can record (treasury_conversion_jobs.provider_reference).
PROVIDER_REFERENCE_MAX = ConversionJob._meta.get_field("provider_reference").max_length


def provider_base_urls() -> dict[str, str]:
    """Where each provider answers, from the settings (so credentials only ever go to a host
    the deployment chose): read by the services' callers and passed down."""
    return {**settings.TREASURY_PROVIDER_BASE_URLS, "due": settings.DUE_API_BASE_URL}


def provider_base_url(code: str, base_urls: Mapping[str, str]) -> str:
    """Where the provider `code` answers, among `base_urls` (`provider_base_urls()`)."""
    url = base_urls.get(code, "")
    if not url:
        raise ProviderNotConfigured(
            f"no API host is configured for provider {code!r} (TREASURY_PROVIDER_BASE_URLS)"
        )
    return url.rstrip("/")


def signature(secret: str, timestamp: str, body: bytes) -> str:
    message = timestamp.encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _call(base_url: str, method: str, path: str, body: dict | None = None, key: str = "") -> dict:
    raw = json.dumps(body).encode() if body is not None else b""
    last = None
    for attempt in range(settings.DUE_HTTP_ATTEMPTS):
        if attempt:
            time.sleep(RETRY_PAUSE * 2 ** (attempt - 1))
        timestamp = str(int(time.time()))
        headers = {
            "Authorization": f"Bearer {settings.DUE_API_KEY}",
            "Accept": "application/json",
            "X-Due-Timestamp": timestamp,
            "X-Due-Signature": signature(settings.DUE_API_SECRET, timestamp, raw),
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        if key:
            headers["Idempotency-Key"] = key
        try:
            return provider_call(
                provider="Due",
                base_url=base_url,
                method=method,
                path=path,
                headers=headers,
                data=raw if body is not None else None,
                timeout=settings.DUE_HTTP_TIMEOUT,
                refusals=REFUSALS,
                refused=DueRefused,
                unavailable=DueUnavailable,
                error_text=_error_text,
            )
        except DueUnavailable as exc:
            last = str(exc).strip()
    raise DueUnavailable(f"{last} (after {settings.DUE_HTTP_ATTEMPTS} attempts)")


def _error_text(body: dict) -> str:
    """Due's error body: `{"error_code", "message", "http_code"}`."""
    code = body.get("error_code")
    message = error_message(body)
    return f"{code}: {message}" if isinstance(code, str) and code else message


def conversion_create(
    *,
    base_url: str,
    idempotency_key: str,
    source_currency: str,
    source_amount: Decimal,
    target_currency: str,
) -> dict:
    body = {
        "source": {"currency": source_currency, "amount": str(source_amount)},
        "destination": {"currency": target_currency},
        "reference": idempotency_key,
    }
    answer = _call(base_url, "POST", "/v1/conversions", body, key=idempotency_key)
    return conversion_parse(_data(answer))


def conversion_get(*, base_url: str, conversion_id: str) -> dict:
    """Due's transfer `conversion_id` as it is now (`GET /v1/transfers/{id}`)."""
    return conversion_parse(
        _call(base_url, "GET", f"/v1/transfers/{quote(conversion_id, safe='')}")
    )


def conversion_find(*, base_url: str, idempotency_key: str) -> dict | None:
    """The conversion the provider created under `idempotency_key`, or None when the provider
    says it never received one (404). DueUnavailable when it cannot say."""
    try:
        answer = _call(
            base_url, "GET", f"/v1/conversions?idempotency_key={quote(idempotency_key, safe='')}"
        )
    except DueRefused as exc:
        if exc.status == 404:
            return None
        raise
    return conversion_parse(_data(answer))


def balance_get(base_url: str, currency: str) -> Decimal:
    """What the provider reports holding for us in `currency` (0 when it lists none)."""
    answer = _call(base_url, "GET", "/v1/balances")
    rows = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise DueUnavailable("Due's balances are malformed")
    amounts = [row.get("amount") for row in rows if row.get("currency") == currency]
    if not amounts:
        return Decimal(0)
    if len(amounts) > 1 or not isinstance(amounts[0], str):
        raise DueUnavailable(f"Due's {currency} balance is malformed")
    raw = amounts[0]
    negative = raw.startswith("-")
    digits = raw.removeprefix("-")
    if re.fullmatch(r"0+(\.0+)?", digits):  # zero (the one parser takes positive amounts)
        return Decimal(0)
    try:
        amount = amount_parse(digits, currency)
    except InvalidAmount as exc:
        raise DueUnavailable(f"Due's {currency} balance is malformed: {exc}") from None
    return -amount if negative else amount


def _data(answer: dict) -> object:
    """The transfer our creation and look-up calls wrap in `data`."""
    return answer.get("data") if isinstance(answer, dict) else None


def conversion_parse(transfer: object) -> dict:
    """Due's transfer object, checked for what the treasury reads and records of it
    (ConversionMalformed naming the field otherwise), as a conversion: its id, `status`
    pending | completed | failed (Due's own in `due_status`), `source` and `destination`."""
    if not isinstance(transfer, dict):
        raise ConversionMalformed("Due's answer holds no transfer object", "data")
    # Its id is recorded as the job's provider reference and sent back in URLs.
    if not isinstance(transfer.get("id"), str) or not printable_ascii(
        transfer["id"], max_length=PROVIDER_REFERENCE_MAX
    ):
        raise ConversionMalformed(
            f"id is not 1..{PROVIDER_REFERENCE_MAX} printable ASCII characters: no transfer id "
            "we can record",
            "data.id",
        )
    due_status = transfer.get("status")
    if not isinstance(due_status, str) or not printable_ascii(due_status, max_length=64):
        raise ConversionMalformed("status is not a transfer status", "data.status")
    status = STATUSES.get(due_status, "pending")
    if due_status not in STATUSES and due_status not in IN_FLIGHT:
        log.warning(
            "treasury: Due's transfer %s is %r, read as in flight", transfer["id"], due_status
        )
    if status == "completed":
        destination = transfer.get("destination")
        amount = destination.get("amount") if isinstance(destination, dict) else None
        try:
            if not isinstance(amount, str) or Decimal(amount) <= 0:
                raise ArithmeticError
        except ArithmeticError:
            raise ConversionMalformed(
                "a processed transfer has no destination amount", "data.destination.amount"
            ) from None
    return {
        "id": transfer["id"],
        "status": status,
        "due_status": due_status,
        "source": transfer.get("source"),
        "destination": transfer.get("destination"),
    }

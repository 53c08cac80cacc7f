"""Due's API, as far as the treasury uses it, over real HTTP (gateway.providers).

As Due documents it (due.readme.io; the examples and their addresses, and what Due leaves out,
in tests/treasury/fixtures/due/SOURCES.md):

- a job's conversion is one of Due's *transfers*: `{"id", "ownerId", "status", "source":
  {"amount", "fee", "currency", "rail"}, "destination": {"amount", "fee", "currency", "rail",
  "id" (the recipient), ...}, "fxRate", "createdAt", "expiresAt"}`, amounts as decimal strings.
  It is final when `payment_processed` (completed) or `failed`, `canceled`, `refund_processed`
  (failed); every other status (`awaiting_funds`, `funds_received`, `approved`,
  `manual_review`, `payment_submitted`, `refund_submitted`, or one Due adds) is in flight;
- it is made from a quote: `POST /v1/transfers/quote {"source": {"rail", "currency",
  "amount"}, "destination": {"rail", "currency", "amount": "0"}}` -> `{"token", ...}` (valid 2
  minutes), then `POST /v1/transfers {"quote": token, "recipient": <our recipient id>,
  "externalId": <the job's key>}` -> the transfer. Due documents no idempotency for it: the
  creation is sent once, and a lost answer is looked for in `GET
  /v1/transfers?order=desc&limit=&startDate=[&next=]` -> `{"items": [...], "next"}`
  (conversion_find);
- `GET /v1/transfers/{id}` -> the transfer (how jobs are polled, and how a webhook is acted
  on: treasury.settlement.callback_receive);
- `Authorization: Bearer DUE_API_KEY`, `Due-Account-Id: DUE_ACCOUNT_ID` when set; errors
  `{"error_code", "message", "http_code"}`.

Still ours, not Due's (Due holds no balances for us; README "Due client and sandbox"): `GET
/v1/balances` -> `{"data": [{"currency", "amount"}, ...]}`, which custody reads, and the
HMAC-SHA256 of `<X-Due-Timestamp>.<body>` with DUE_API_SECRET in `X-Due-Signature` that every
request carries. A call is tried DUE_HTTP_ATTEMPTS times on 5xx, 429 or a timeout, with a
short doubling pause (a transfer's creation once); 4xx is final.

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
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import quote, urlencode

from django.conf import settings

from gateway.boundary import printable_ascii
from gateway.providers import error_message, provider_call
from ledger.exceptions import InvalidAmount
from ledger.money import amount_format, amount_parse
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
# A lost creation is looked for among at most LOOKUP_PAGES pages of LOOKUP_PAGE transfers.
LOOKUP_PAGE = 100
LOOKUP_PAGES = 50
# Due's final transfer statuses, as a job's conversion ends; any other is in flight.
STATUSES = {
    "payment_processed": "completed",
    "failed": "failed",
    "canceled": "failed",
    "refund_processed": "failed",
}
# Due taking back, or having taken back, a transfer's money (fixtures/due/SOURCES.md 2.5).
REFUNDED = "refund_processed"
REFUND_STATUSES = ("refund_submitted", REFUNDED)
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


def _call(
    base_url: str, method: str, path: str, body: dict | None = None, *, resend: bool = True
) -> dict:
    """One call, tried DUE_HTTP_ATTEMPTS times on 5xx, 429 or a timeout; once only when it must
    not be `resend` (a transfer's creation: Due documents no idempotency)."""
    raw = json.dumps(body).encode() if body is not None else b""
    last = None
    attempts = settings.DUE_HTTP_ATTEMPTS if resend else 1
    for attempt in range(attempts):
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
        if settings.DUE_ACCOUNT_ID:
            headers["Due-Account-Id"] = settings.DUE_ACCOUNT_ID
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
    raise DueUnavailable(f"{last} (after {attempts} attempt{'s' if attempts > 1 else ''})")


def _error_text(body: dict) -> str:
    """Due's error body: `{"error_code", "message", "http_code"}`."""
    code = body.get("error_code")
    message = error_message(body)
    return f"{code}: {message}" if isinstance(code, str) and code else message


def recipient(currency: str) -> str:
    """Where Due pays a transfer into `currency`: our bank account (USD) or our wallet (USDC),
    each registered at Due once (DUE_RECIPIENT_USD, DUE_RECIPIENT_USDC)."""
    found = settings.DUE_RECIPIENTS.get(currency, "")
    if not found:
        raise ProviderNotConfigured(f"DUE_RECIPIENT_{currency} is not configured")
    return found


def conversion_create(
    *,
    base_url: str,
    source_currency: str,
    source_amount: Decimal,
    target_currency: str,
    external_id: str,
) -> dict:
    """A quote (`POST /v1/transfers/quote`, 2 minutes) and the transfer on it (`POST
    /v1/transfers`) to our recipient in `target_currency`, carrying `external_id` (the job's
    key: Due's quickstart sends an `externalId`, what it guarantees of it is not published).
    The creation is sent once: Due documents no idempotency, so a lost answer is looked for
    (conversion_find), never resent blindly."""
    to = recipient(target_currency)
    side = {"rail": settings.DUE_RAILS[source_currency], "currency": source_currency}
    quote = _call(
        base_url,
        "POST",
        "/v1/transfers/quote",
        {
            "source": {**side, "amount": amount_format(source_amount, source_currency)},
            "destination": {
                "rail": settings.DUE_RAILS[target_currency],
                "currency": target_currency,
                "amount": "0",
            },
        },
    )
    token = quote.get("token") if isinstance(quote, dict) else None
    if not isinstance(token, str) or not token:
        raise DueUnavailable("Due's quote holds no token")
    answer = _call(
        base_url,
        "POST",
        "/v1/transfers",
        {"quote": token, "recipient": to, "externalId": external_id},
        resend=False,
    )
    return conversion_parse(answer)


def conversion_get(*, base_url: str, conversion_id: str) -> dict:
    """Due's transfer `conversion_id` as it is now (`GET /v1/transfers/{id}`). An answer about
    another transfer is no answer (found from outside: it was applied to the job asking)."""
    transfer = conversion_parse(
        _call(base_url, "GET", f"/v1/transfers/{quote(conversion_id, safe='')}")
    )
    if transfer["id"] != conversion_id:
        raise ConversionMalformed(
            f"Due answered about transfer {transfer['id']} when asked for {conversion_id}",
            "data.id",
        )
    return transfer


def conversion_find(
    *,
    base_url: str,
    source_currency: str,
    source_amount: Decimal,
    target_currency: str,
    since: datetime,
    taken: Collection[str],
    external_id: str,
) -> dict | None:
    """The transfer a job's creation made when its answer was lost: among Due's transfers
    created since `since` (`GET /v1/transfers`, newest first, page by page with `next`), the
    one of the job's source amount and currencies to our recipient that no other job holds
    (`taken`), the one carrying the job's `external_id` first; one carrying another key never
    is; one carrying the job's key but not its amount, currencies or recipient is for an
    operator. None when Due lists none: it never received the creation.
    DueUnavailable when Due cannot say, or when more than one would do (for an operator: which
    one is the job's is not ours to guess)."""
    to = recipient(target_currency)
    query = {"order": "desc", "limit": str(LOOKUP_PAGE), "startDate": since.isoformat()}
    found: dict[str, dict] = {}
    keyed: dict[str, dict] = {}  # of those, carrying the job's external id
    odd: dict[str, dict] = {}  # carrying the job's external id, of another amount
    for _ in range(LOOKUP_PAGES):
        page = _call(base_url, "GET", f"/v1/transfers?{urlencode(query)}")
        items = page.get("items") if isinstance(page, dict) else None
        if not isinstance(items, list):
            raise DueUnavailable("Due's list of transfers is malformed")
        for item in items:
            try:
                transfer = conversion_parse(item)
            except ConversionMalformed:
                continue  # not one our job could have made
            source, destination = (
                side if isinstance(side, dict) else {}
                for side in (transfer["source"], transfer["destination"])
            )
            theirs = item.get("externalId")
            if transfer["id"] in taken or theirs not in (None, "", external_id):
                continue
            matches = (
                source.get("currency") == source_currency
                and _amount(source.get("amount")) == source_amount
                and destination.get("currency") == target_currency
                and destination.get("id", to) == to
                and _moment(item.get("createdAt")) >= since  # not trusting startDate alone
            )
            if matches:
                found[transfer["id"]] = transfer  # (pages shift as transfers are created)
                if theirs == external_id:
                    keyed[transfer["id"]] = transfer
            elif theirs == external_id:  # made by the job's creation, not as it asked
                odd[transfer["id"]] = transfer
        cursor = page.get("next")
        if cursor in (None, ""):
            break
        if not isinstance(cursor, str):  # not the end of the list: a list we cannot read
            raise DueUnavailable(f"Due's list of transfers has a `next` of {cursor!r}")
        if not items:
            break
        query["next"] = cursor
    else:  # a list that never ends (or a cursor that never moves) is not an answer
        raise DueUnavailable(
            f"Due lists more than {LOOKUP_PAGES * LOOKUP_PAGE} transfers since {since}; "
            "the job's is for an operator to find"
        )
    if odd:  # the job's creation made it, not as asked: neither taken nor made again
        raise DueUnavailable(
            f"transfer(s) {', '.join(odd)} at Due carry this job's key but not its amount, "
            "currencies or recipient; for an operator"
        )
    if len(keyed) == 1:
        found = keyed
    if len(found) > 1:
        raise DueUnavailable(
            f"{len(found)} transfers at Due could be this job's: {', '.join(found)}; "
            "for an operator"
        )
    return next(iter(found.values()), None)


def _moment(raw: object) -> datetime:
    """A listed transfer's `createdAt` (ISO 8601); the earliest moment when it is unreadable,
    so that such a transfer is never taken for a job's."""
    try:
        moment = datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        return datetime.min.replace(tzinfo=UTC)
    return moment


def _amount(raw: object) -> Decimal | None:
    """A listed transfer's amount, to compare (None when it is no finite decimal string)."""
    try:
        value = Decimal(raw) if isinstance(raw, str) else None
    except ArithmeticError:
        return None
    return value if value is not None and value.is_finite() else None


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
        "instructions": transfer.get("transferInstructions"),
    }


def funding_address_request(*, base_url: str, transfer_id: str) -> dict:
    """Where to send a USDC-funded transfer's source amount (`POST
    /v1/transfers/{id}/funding_address`), as Due answers it: kept and shown to an operator as
    given, not read (Due publishes no example of it)."""
    path = f"/v1/transfers/{quote(transfer_id, safe='')}/funding_address"
    answer = _call(base_url, "POST", path, {})
    if not isinstance(answer, dict) or not answer:
        raise DueUnavailable("Due's funding address answer is not an object")
    return answer

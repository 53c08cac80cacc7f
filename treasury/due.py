"""Due's conversion API, as far as the treasury uses it, over real HTTP (urllib).

Requests carry `Authorization: Bearer DUE_API_KEY` and an HMAC-SHA256 of
`<X-Due-Timestamp>.<body>` with DUE_API_SECRET in `X-Due-Signature`; conversions are created
with an `Idempotency-Key` (the same key names the same conversion). A call is tried
DUE_HTTP_ATTEMPTS times on 5xx, 429 or a timeout, with a short doubling pause; 4xx is final.
"""

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from decimal import Decimal
from urllib.parse import quote

from django.conf import settings

from treasury.exceptions import DueRefused, DueUnavailable

RETRY_PAUSE = 0.2  # seconds, doubled per attempt


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
        request = urllib.request.Request(  # noqa: S310 (settings allow only http and https)
            f"{base_url}{path}",
            data=raw if body is not None else None,
            method=method,
            headers=headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=settings.DUE_HTTP_TIMEOUT) as response:  # noqa: S310
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("message", "")
            except (ValueError, AttributeError):
                message = ""
            if 400 <= exc.code < 500 and exc.code != 429:
                raise DueRefused(
                    exc.code, f"Due refused {method} {path}: {exc.code} {message}"
                ) from None
            last = f"Due answered {exc.code} to {method} {path} {message}".strip()
        except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as exc:
            last = f"{method} {path} failed: {exc}"
    raise DueUnavailable(f"{last} (after {settings.DUE_HTTP_ATTEMPTS} attempts)")


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
    return conversion_parse(_call(base_url, "POST", "/v1/conversions", body, key=idempotency_key))


def conversion_get(*, base_url: str, conversion_id: str) -> dict:
    return conversion_parse(
        _call(base_url, "GET", f"/v1/conversions/{quote(conversion_id, safe='')}")
    )


def conversion_parse(answer: dict) -> dict:
    """Due's conversion object, checked for what the treasury reads of it."""
    conversion = answer.get("data") if isinstance(answer, dict) else None
    if (
        not isinstance(conversion, dict)
        or not isinstance(conversion.get("id"), str)
        or not conversion["id"]
        or conversion.get("status") not in ("pending", "processing", "completed", "failed")
    ):
        raise DueUnavailable("Due's conversion object is malformed")
    if conversion["status"] == "completed":
        amount = (conversion.get("destination") or {}).get("amount")
        try:
            if not isinstance(amount, str) or Decimal(amount) <= 0:
                raise ArithmeticError
        except ArithmeticError:
            raise DueUnavailable("Due's completed conversion has no destination amount") from None
    return conversion

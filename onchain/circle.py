"""Circle's HTTP API, as far as the engine uses it, over real HTTP (gateway.providers), at the
base URL each call is given (CIRCLE_API_BASE_URL, read by the services' callers).

Errors: 4xx that says the request itself is wrong (400, 404 for a transfer, 422) raises
CircleRefused, which is final; anything else (timeouts, 5xx, 429, 401/403 from our own bad
key) raises CircleUnavailable, which a caller may retry.
"""

import json
import logging
import re
from datetime import datetime
from decimal import Decimal
from urllib.parse import quote, urlencode

from django.conf import settings

from gateway.providers import provider_call
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from onchain.exceptions import CircleRefused, CircleUnavailable, UnknownSigningKey

log = logging.getLogger(__name__)

REFUSALS = {400, 404, 409, 422}


def _call(
    base_url: str,
    method: str,
    path: str,
    body: dict | None = None,
    *,
    idempotency_key: str = "",
    listed: str | None = None,
) -> dict:
    headers = {"Authorization": f"Bearer {settings.CIRCLE_API_KEY}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return provider_call(
        provider="Circle",
        base_url=base_url,
        method=method,
        path=path,
        headers=headers,
        data=data,
        timeout=settings.CIRCLE_HTTP_TIMEOUT,
        refusals=REFUSALS,
        refused=CircleRefused,
        unavailable=CircleUnavailable,
        error_text=error_describe,
        listed=listed,
    )


def error_describe(body: dict) -> str:
    """Circle's documented error body: `code` (Circle's own, not the HTTP status), `message`,
    and for an invalid request `errors` naming each wrong field (`location`)."""
    text = f"{body.get('message', '')} (Circle code {body.get('code')})"
    errors = body.get("errors")
    if isinstance(errors, list):
        named = [
            f"{error.get('location')}: {error.get('message')}"
            for error in errors
            if isinstance(error, dict)
        ]
        text += "".join(f"; {entry}" for entry in named)
    return text


def public_key_fetch(*, base_url: str, key_id: str) -> tuple[str, str]:
    """(algorithm, base64 DER public key) of a notification-signing key."""
    try:
        data = _call(base_url, "GET", f"/v2/notifications/publicKey/{quote(key_id, safe='')}")[
            "data"
        ]
        algorithm, public_key = data["algorithm"], data["publicKey"]
        if not (isinstance(algorithm, str) and 0 < len(algorithm) <= 32):
            raise TypeError("algorithm")
        if not isinstance(public_key, str):
            raise TypeError("publicKey")
        return algorithm, public_key
    except CircleRefused as exc:
        if exc.status == 404:
            raise UnknownSigningKey(f"Circle does not know the key id {key_id}") from None
        raise CircleUnavailable(str(exc)) from None
    except (KeyError, TypeError):
        raise CircleUnavailable(f"Circle's public key answer for {key_id} is malformed") from None


def transfer_create(
    *, base_url: str, idempotency_key: str, amount: Decimal, address: str, chain: str
) -> dict:
    """Send USDC from our wallet to a blockchain address; Circle's transfer object. The same
    idempotency key always names the same transfer, so a resend after any failure is safe."""
    body = {
        "idempotencyKey": idempotency_key,
        "source": {"type": "wallet", "id": settings.CIRCLE_WALLET_ID},
        "destination": {"type": "blockchain", "address": address, "chain": chain},
        "amount": {"amount": str(amount), "currency": "USD"},
    }
    return _transfer(
        _call(base_url, "POST", "/v1/transfers", body, idempotency_key=idempotency_key)
    )


def transfer_get(*, base_url: str, transfer_id: str) -> dict:
    return _transfer(_call(base_url, "GET", f"/v1/transfers/{quote(transfer_id, safe='')}"))


def transfers_inbound(*, base_url: str, since: datetime, page_size: int = 50) -> list:
    """Every transfer into our wallet created at or after `since`, newest first, all pages;
    each item as Circle listed it. A malformed item is the caller's to record and skip: one
    bad transfer must not hide the others."""
    return _transfers_all(
        base_url, {"destinationWalletId": settings.CIRCLE_WALLET_ID}, since, page_size
    )


def transfers_outbound(*, base_url: str, since: datetime, page_size: int = 50) -> list[dict]:
    """Every transfer out of our wallet created at or after `since`, newest first, all pages.
    Circle's list transfers (GET /v1/transfers, `sourceWalletId`, `from`, `pageSize`,
    `pageAfter`) is the only documented way to find a transfer whose create answer was lost:
    the transfer object does not carry its idempotencyKey, and a POST with the same key would
    create the transfer if Circle did not have it. One malformed item makes the whole list
    CircleUnavailable: a transfer left out here would let a cancel pay twice."""
    listed = _transfers_all(
        base_url, {"sourceWalletId": settings.CIRCLE_WALLET_ID}, since, page_size
    )
    return [_transfer({"data": item}) for item in listed]


def _transfers_all(base_url: str, params: dict, since: datetime, page_size: int) -> list:
    """Circle's transfer list, newest first, paged older with `pageAfter=<the id of a page's
    last transfer>` (an exclusive bound) until a page is short or reaches past `since`. The
    `from` filter asks Circle for the same bound; the dates are checked too, so a filter
    Circle ignored still ends the paging."""
    params = {**params, "from": _iso(since), "pageSize": page_size}
    found: list = []
    relisted: list = []
    while True:
        # One transfer we could not store (a NUL in any of its strings) is an unreadable item
        # of the page, not an unreadable page: the others are still credited.
        page = _transfer_page(
            _call(base_url, "GET", f"/v1/transfers?{urlencode(params)}", listed="data")
        )
        # The items after the previous page's cursor head this page again: kept once (found
        # in the full run: a malformed transfer ending a page was recorded twice).
        if relisted and page[: len(relisted)] == relisted:
            found.extend(page[len(relisted) :])
        else:
            found.extend(page)
        if len(page) < page_size or any(_created_before(item, since) for item in page):
            return found
        # The cursor is the last listed id: a malformed item has none, so the last one that
        # has (the items after it are listed again).
        at = next((i for i in range(len(page) - 1, -1, -1) if _transfer_id(page[i])), None)
        if at is None or page[at]["id"] == params.get("pageAfter"):
            log.error("ALERT Circle's transfer list cannot be paged past %s", params)
            return found
        params["pageAfter"], relisted = page[at]["id"], page[at + 1 :]


def _transfer_page(answer: dict) -> list:
    if not isinstance(answer.get("data"), list):
        raise CircleUnavailable("Circle's transfer list is malformed")
    return answer["data"]


def _transfer_id(item) -> bool:
    return isinstance(item, dict) and isinstance(item.get("id"), str) and bool(item["id"])


def _created_before(item, since: datetime) -> bool:
    created = transfer_created(item)
    return created is not None and created < since


def transfer_created(item) -> datetime | None:
    """A listed transfer's createDate (ISO 8601 UTC), or None when it has none readable."""
    raw = item.get("createDate") if isinstance(item, dict) else None
    try:
        created = datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return created if created is not None and created.tzinfo is not None else None


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def wallet_balance(*, base_url: str) -> Decimal:
    """Our wallet's USDC balance as Circle reports it (Circle Mint's get a wallet,
    GET /v1/wallets/{walletId}: `balances`, USDC named "USD" as in every Circle money object;
    no entry means 0)."""
    path = f"/v1/wallets/{quote(settings.CIRCLE_WALLET_ID, safe='')}"
    wallet = _call(base_url, "GET", path).get("data")
    balances = wallet.get("balances") if isinstance(wallet, dict) else None
    if not isinstance(balances, list):
        raise CircleUnavailable("Circle's wallet answer is malformed")
    amounts = [
        entry.get("amount")
        for entry in balances
        if isinstance(entry, dict) and entry.get("currency") == "USD"
    ]
    if not amounts or (isinstance(amounts[0], str) and re.fullmatch(r"0+(\.0+)?", amounts[0])):
        return Decimal(0)
    try:
        return amount_parse(amounts[0], "USDC")
    except InvalidAmount as exc:
        raise CircleUnavailable(f"Circle's wallet balance {amounts[0]!r}: {exc}") from None


def _transfer(answer: dict) -> dict:
    transfer = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(transfer, dict) or not transfer.get("id") or not transfer.get("status"):
        raise CircleUnavailable("Circle's transfer object is malformed")
    return transfer

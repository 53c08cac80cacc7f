"""Circle's HTTP API, as far as the engine uses it, over real HTTP (gateway.providers), at the
base URL each call is given (CIRCLE_API_BASE_URL, read by the services' callers).

Errors: 4xx that says the request itself is wrong (400, 404 for a transfer, 422) raises
CircleRefused, which is final; anything else (timeouts, 5xx, 429, 401/403 from our own bad
key) raises CircleUnavailable, which a caller may retry.
"""

import json
import re
from decimal import Decimal
from urllib.parse import quote, urlencode

from django.conf import settings

from gateway.providers import provider_call
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from onchain.exceptions import CircleRefused, CircleUnavailable, UnknownSigningKey

REFUSALS = {400, 404, 409, 422}


def _call(
    base_url: str, method: str, path: str, body: dict | None = None, *, idempotency_key: str = ""
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
    )


def public_key_fetch(*, base_url: str, key_id: str) -> tuple[str, str]:
    """(algorithm, base64 DER public key) of a notification-signing key."""
    try:
        data = _call(base_url, "GET", f"/v2/notifications/publicKey/{quote(key_id, safe='')}")[
            "data"
        ]
        return data["algorithm"], data["publicKey"]
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


def transfers_inbound(*, base_url: str, since: str, page_size: int = 50) -> list[dict]:
    """Every transfer into our wallet created at or after `since` (ISO 8601), newest first,
    all pages."""
    return _transfers_all(
        base_url,
        {"destinationWalletId": settings.CIRCLE_WALLET_ID, "from": since, "pageSize": page_size},
    )


def transfers_outbound(*, base_url: str, since: str, page_size: int = 50) -> list[dict]:
    """Every transfer out of our wallet created at or after `since` (ISO 8601), newest first,
    all pages. Circle's list transfers (GET /v1/transfers, `sourceWalletId`, `from`,
    `pageSize`, `pageAfter`) is the only documented way to find a transfer whose create
    answer was lost: the transfer object does not carry its idempotencyKey, and a POST with
    the same key would create the transfer if Circle did not have it."""
    return _transfers_all(
        base_url,
        {"sourceWalletId": settings.CIRCLE_WALLET_ID, "from": since, "pageSize": page_size},
    )


def _transfers_all(base_url: str, params: dict) -> list[dict]:
    found: list[dict] = []
    while True:
        page = _transfer_page(_call(base_url, "GET", f"/v1/transfers?{urlencode(params)}"))
        found.extend(page)
        if len(page) < params["pageSize"]:
            return found
        params["pageAfter"] = page[-1]["id"]


def _transfer_page(answer: dict) -> list[dict]:
    if not isinstance(answer.get("data"), list):
        raise CircleUnavailable("Circle's transfer list is malformed")
    return [_transfer({"data": item}) for item in answer["data"]]


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

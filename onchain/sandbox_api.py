"""The Circle sandbox's API over HTTP: the request handler of onchain.sandbox.CircleSandbox,
answering from its state (under its lock) as Circle documents its API: the notification public
key (`GET /v2/notifications/publicKey/{id}`), transfers (`POST /v1/transfers` with an
idempotencyKey, `GET /v1/transfers/{id}`, `GET /v1/transfers?destinationWalletId=...` or
`?sourceWalletId=...` with `from`, `to`, `pageSize`, `pageAfter`, `pageBefore`), the wallet
(`GET /v1/wallets/{walletId}`), all bearer-authenticated; SNS's side (no bearer) is
onchain.sandbox_sns's."""

import json
import threading
import time
import uuid
from datetime import datetime
from urllib.parse import parse_qs, urlsplit

from gateway.sandbox import SandboxHandler
from onchain.sandbox_sns import sandbox_now


def _instant(value: str | None) -> datetime | None:
    """An ISO 8601 instant with its offset (Circle's dates, `from`, `to`), or ValueError."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset")
    return moment


def circle_api_handler(sandbox) -> type[SandboxHandler]:
    """The request handler class serving `sandbox` (a CircleSandbox)."""

    class Handler(SandboxHandler):
        def do_GET(self):
            if sandbox.sns_get(self):  # SNS's certificate and confirmations: no bearer
                return None
            if not self._authorised():
                return None
            url = urlsplit(self.path)
            if url.path.startswith("/v2/notifications/publicKey/"):
                return self._public_key(url.path.rsplit("/", 1)[1])
            if url.path == "/v1/transfers":
                return self._list(parse_qs(url.query))
            if url.path.startswith("/v1/wallets/"):
                return self._wallet(url.path.rsplit("/", 1)[1])
            if url.path.startswith("/v1/transfers/"):
                transfer = sandbox.transfers.get(url.path.rsplit("/", 1)[1])
                if transfer is None:
                    return self._json(404, {"code": 404, "message": "Transfer not found."})
                return self._json(200, {"data": transfer})
            return self._json(404, {"code": 404, "message": "Not found."})

        def do_POST(self):
            if not self._authorised():
                return None
            if urlsplit(self.path).path != "/v1/transfers":
                return self._json(404, {"code": 404, "message": "Not found."})
            raw = self._body()
            with sandbox.lock:
                sandbox.create_calls += 1
                failure = sandbox.fail_next.pop(0) if sandbox.fail_next else None
            if sandbox.delay:
                time.sleep(sandbox.delay)
            if failure is not None:
                return self._json(failure, {"code": failure, "message": "Injected failure."})
            try:
                body = json.loads(raw)
                key = str(uuid.UUID(body["idempotencyKey"]))
                address = body["destination"]["address"]
                chain = body["destination"]["chain"]
                amount = body["amount"]["amount"]
                if body["source"] != {"type": "wallet", "id": sandbox.wallet_id}:
                    raise ValueError("unknown source wallet")
            except (ValueError, KeyError, TypeError) as exc:
                return self._json(400, {"code": 2, "message": f"Invalid request: {exc}"})
            if address.startswith("0xbad"):  # a destination Circle refuses, as documented
                why = "destination.address is not a valid address for the chain"
                return self._json(
                    400,
                    {
                        "code": 2,
                        "message": f"Invalid entity. {why}",
                        "errors": [
                            {
                                "error": "invalid_value",
                                "location": "destination.address",
                                "message": why,
                            }
                        ],
                    },
                )
            with sandbox.lock:
                known = sandbox.by_key.get(key)
                if known is not None and known[1] != body:
                    return self._json(409, {"code": 409, "message": "Idempotency key reused."})
                if known is None:
                    transfer = {
                        "id": str(uuid.uuid4()),
                        "source": {"type": "wallet", "id": sandbox.wallet_id},
                        "destination": {
                            "type": "blockchain",
                            "address": address,
                            "chain": chain,
                        },
                        "amount": {"amount": amount, "currency": "USD"},
                        "status": "pending",
                        "createDate": sandbox_now(),
                    }
                    sandbox.transfers[transfer["id"]] = transfer
                    sandbox.by_key[key] = (transfer["id"], body)
                transfer = dict(sandbox.transfers[sandbox.by_key[key][0]])
            if known is None:
                if sandbox.on_created is not None:
                    sandbox.on_created(transfer)
                if sandbox.answer_delay:  # created; the caller times out before the answer
                    time.sleep(sandbox.answer_delay)
                if sandbox.settle and sandbox.subscriber:
                    threading.Thread(
                        target=sandbox.transfer_finish,
                        args=(transfer["id"], sandbox.settle),
                        daemon=True,
                    ).start()
            return self._json(201 if known is None else 200, {"data": transfer})

        def _authorised(self) -> bool:
            if not self.headers.get("Authorization", "").startswith("Bearer "):
                self._json(401, {"code": 401, "message": "Malformed authorization."})
                return False
            return True

        def _public_key(self, key_id: str) -> None:
            with sandbox.lock:
                sandbox.key_requests.append(key_id)
            if key_id != sandbox.key_id:
                return self._json(404, {"code": 404, "message": "Public key not found."})
            sandbox.key_fetches += 1
            return self._json(
                200,
                {
                    "data": {
                        "id": sandbox.key_id,
                        "algorithm": "ECDSA_SHA_256",
                        "publicKey": sandbox.public_key_b64,
                        "createDate": "2026-01-01T00:00:00Z",
                    }
                },
            )

        def _wallet(self, wallet_id: str) -> None:
            """Circle Mint's wallet object; USDC is "USD" in Circle's money objects."""
            if wallet_id != sandbox.wallet_id:
                return self._json(404, {"code": 404, "message": "Wallet not found."})
            with sandbox.lock:
                balance = sandbox.wallet_balance
            return self._json(
                200,
                {
                    "data": {
                        "walletId": sandbox.wallet_id,
                        "entityId": "fc988ed5-c129-4f70-a064-e5beb7eb8e32",
                        "type": "merchant",
                        "description": "Master Wallet",
                        "balances": [{"amount": f"{balance:f}", "currency": "USD"}],
                    }
                },
            )

        def _list(self, query: dict) -> None:
            """Circle's list transfers: into (`destinationWalletId`) or out of
            (`sourceWalletId`) the wallet, `from` / `to` bounding createDate (both
            inclusive), newest first, at most `pageSize` (at most 50); `pageAfter` /
            `pageBefore` are transfer ids, exclusive bounds (the older / the newer page),
            not to be used together (refused here)."""

            def one(name: str) -> str | None:
                return query.get(name, [None])[0]

            with sandbox.lock:
                sandbox.list_requests.append({name: one(name) for name in query})

            try:
                size = min(int(one("pageSize") or 50), 50)
                since, until = _instant(one("from")), _instant(one("to"))
                if sandbox.ignore_from:
                    since = None
                if size < 1:
                    raise ValueError("pageSize must be at least 1")
                if one("pageAfter") is not None and one("pageBefore") is not None:
                    raise ValueError("pageBefore and pageAfter cannot be used together")
            except ValueError as exc:
                return self._json(400, {"code": 2, "message": f"Invalid request: {exc}"})
            if one("destinationWalletId") == sandbox.wallet_id:
                direction = "destination"
            elif one("sourceWalletId") == sandbox.wallet_id:
                direction = "source"
            else:
                return self._json(200, {"data": []})
            with sandbox.lock:
                dated = [
                    (_instant(t["createDate"]), order, t)
                    for order, t in enumerate(sandbox.transfers.values())
                    if isinstance(t.get(direction), dict) and t[direction].get("type") == "wallet"
                ]
            # Newest first; transfers of the same millisecond in the order they were made.
            dated.sort(key=lambda entry: entry[:2], reverse=True)
            matching = [
                t
                for created, _, t in dated
                if (since is None or created >= since) and (until is None or created <= until)
            ]
            ids = [t.get("id") for t in matching]
            if one("pageAfter") is not None:
                after = one("pageAfter")
                matching = matching[ids.index(after) + 1 :][:size] if after in ids else []
            elif one("pageBefore") is not None:
                before = one("pageBefore")
                matching = matching[: ids.index(before)][-size:] if before in ids else []
            return self._json(200, {"data": matching[:size]})

    return Handler

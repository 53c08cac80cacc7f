"""A Circle sandbox shipped with the product, for development, tests and the rehearsal.

It speaks Circle's wire format for what the engine uses: the notification public-key endpoint
(`GET /v2/notifications/publicKey/{id}`), transfers (`POST /v1/transfers` with an
idempotencyKey, `GET /v1/transfers/{id}`, `GET /v1/transfers?destinationWalletId=...` or
`?sourceWalletId=...` with `from`, `to`, `pageSize`, `pageAfter`, `pageBefore` as documented),
the wallet (`GET /v1/wallets/{walletId}`, its balance), all bearer-authenticated, and signed
notifications posted to a subscriber with `X-Circle-Signature` (base64 ECDSA-SHA256 over the
raw body) and `X-Circle-Key-Id`. Nothing in the engine knows it is a sandbox: it is just a base URL.

The wallet keeps its USDC balance (`wallet_balance`, set by a test or the rehearsal to start
from): a deposit it delivers adds, an outbound transfer it completes subtracts.

Knobs for tests and the rehearsal: `fail_next` (answer the next transfer creations with an
error status), `delay` (seconds before answering them: timeouts before anything is created),
`ignore_from` (list transfers as a Circle that does not filter on `from`),
`answer_delay` (seconds between recording a new transfer and answering: a timeout after Circle
created the transfer, whose answer the caller never hears), `on_created` (called after a
transfer is recorded and before the answer is sent: a caller killed there has been accepted
but never heard it), `subscriber` + `settle` (notify a subscriber of transfers and complete or
fail new outbound transfers on their own).

It also plays Amazon SNS, as it delivers Circle Mint v1 notifications (onchain.sandbox_sns).
"""

import base64
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.sandbox import SandboxHandler, SandboxServer
from onchain.notifications import CHECKLIST_ALIASES
from onchain.sandbox_sns import SnsSandbox, answer_json, sandbox_now

# How the sandbox notifies a deposit: Circle Mint v2 (`custody.transfer`, the default),
# Programmable Wallets (`transactions.inbound`) or Circle Mint v1 through SNS (`sns`).
DEPOSIT_NOTIFICATIONS = ("custody.transfer", "transactions.inbound", "sns")
# The sandbox's USDC token for Wallets notifications (a real one is per blockchain; tests and
# the rehearsal put it in CIRCLE_WALLETS_TOKENS).
USDC_TOKEN_ID = "5797fbd6-3795-519d-84ca-ec4c5f80c3b1"  # noqa: S105 (a token, not a secret)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _instant(value: str | None) -> datetime | None:
    """An ISO 8601 instant with its offset (Circle's dates, `from`, `to`), or ValueError."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset")
    return moment


class CircleSandbox(SnsSandbox, SandboxServer):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        wallet_id: str = "1000000001",
        subscriber: str | None = None,
        settle: str | None = None,
    ):
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.key_id = str(uuid.uuid4())
        public_der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key_b64 = base64.b64encode(public_der).decode()
        self.key_fetches = 0  # the key served
        self.key_requests: list[str] = []  # every key id asked for, known or not
        self.list_requests: list[dict] = []  # the query of every transfer list asked for
        self.ignore_from = False  # list as if `from` were not understood
        self.wallet_id = wallet_id
        self.subscriber = subscriber
        self.settle = settle  # None, "complete" or "failed": what happens to new outbound transfers
        self.transfers: dict[str, dict] = {}  # id -> Circle's transfer object
        self.by_key: dict[str, tuple[str, dict]] = {}  # idempotencyKey -> (id, request body)
        self.create_calls = 0
        self.fail_next: list[int] = []  # statuses for the next transfer creations
        self.delay = 0.0
        self.answer_delay = 0.0
        self.on_created = None
        self.wallet_balance = Decimal(0)  # USDC in the wallet
        self.deposit_notifications = "custody.transfer"  # one of DEPOSIT_NOTIFICATIONS
        self.sns_certificate_fetches = 0  # SNS: the signing certificate served
        self.sns_tokens: dict[str, str] = {}  # SNS: confirmation token -> its topic
        self.sns_confirmed: list[dict] = []  # SNS: {TopicArn, Token} of each confirmation
        self._serve(host, port)

    # What Circle does on its side --------------------------------------------------------

    def deposit(
        self,
        *,
        address: str,
        amount: str,
        transfer_id: str | None = None,
        notify: bool = True,
        created: datetime | None = None,
    ) -> dict:
        """USDC arrives at one of our deposit addresses: a completed inbound transfer (made now
        unless `created` says when), notified to the subscriber unless told otherwise (a
        webhook that never came)."""
        transfer = {
            "id": transfer_id or str(uuid.uuid4()),
            "source": {"type": "blockchain", "chain": "ETH"},
            "destination": {
                "type": "wallet",
                "id": self.wallet_id,
                "address": address,
                "chain": "ETH",
            },
            "amount": {"amount": amount, "currency": "USD"},
            "transactionHash": "0x" + uuid.uuid4().hex,
            "status": "complete",
            "createDate": sandbox_now() if created is None else _iso(created),
        }
        with self.lock:
            self.transfers[transfer["id"]] = transfer
            self.wallet_balance += Decimal(amount)
        if notify and self.subscriber:
            self.deposit_notify(transfer)
        return transfer

    def deposit_notify(self, transfer: dict) -> tuple[int, dict]:
        """Notify the subscriber of a deposit as `deposit_notifications` says Circle does."""
        if self.deposit_notifications == "transactions.inbound":
            return self.deliver(
                self.subscriber,
                self.notification("transactions.inbound", wallets_inbound(transfer)),
            )
        if self.deposit_notifications == "sns":
            return self.deliver_sns(self.subscriber, self.sns_envelope(mint_v1_message(transfer)))
        return self.deliver(self.subscriber, self.notification("custody.transfer", transfer))

    def transfer_finish(self, transfer_id: str, status: str, *, notify: bool = True) -> dict:
        """An outbound transfer completes ("complete") or fails ("failed") on chain."""
        with self.lock:
            transfer = self.transfers[transfer_id]
            if status == "complete" and transfer["status"] != "complete":
                self.wallet_balance -= Decimal(transfer["amount"]["amount"])
            transfer["status"] = status
            if status == "failed":
                transfer["errorCode"] = "transfer_failed"
        if notify and self.subscriber:
            self.deliver(self.subscriber, self.notification("custody.transfer", transfer))
        return transfer

    # The wire -----------------------------------------------------------------------------

    def _handler(self):
        sandbox = self

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
                        if isinstance(t.get(direction), dict)
                        and t[direction].get("type") == "wallet"
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

    # Notifications ------------------------------------------------------------------------

    def sign(self, body: bytes) -> str:
        return base64.b64encode(self.private_key.sign(body, ec.ECDSA(hashes.SHA256()))).decode()

    @staticmethod
    def notification(
        notification_type: str, transfer: dict, notification_id: str | None = None
    ) -> bytes:
        return json.dumps(
            {
                "subscriptionId": "00000000-0000-0000-0000-000000000001",
                "notificationId": notification_id or str(uuid.uuid4()),
                "notificationType": notification_type,
                "notification": transfer,
                "timestamp": sandbox_now(),
                "version": 2,
            }
        ).encode()

    @classmethod
    def transfer_notification(
        cls,
        *,
        transfer_id: str,
        address: str,
        amount: str,
        notification_type: str = "custody.transfer",
        status: str | None = None,
        currency: str = "USD",
        notification_id: str | None = None,
        wallet_id: str = "1000000001",
    ) -> bytes:
        """A Circle Mint v2 notification (or one of the checklist's aliases, whose name gives
        the status) of an inbound transfer into `wallet_id`, as Circle documents it."""
        transfer = {
            "id": transfer_id,
            "source": {"type": "blockchain", "chain": "ETH"},
            "destination": {"type": "wallet", "id": wallet_id, "address": address, "chain": "ETH"},
            "amount": {"amount": amount, "currency": currency},
            "transactionHash": "0x" + uuid.uuid4().hex,
            "status": status or CHECKLIST_ALIASES.get(notification_type, "complete"),
            "createDate": "2026-11-24T00:00:00Z",
        }
        return cls.notification(notification_type, transfer, notification_id)

    def deliver(
        self, url: str, body: bytes, *, signature: str | None = None, key_id: str | None = None
    ) -> tuple[int, dict]:
        """POST a notification as Circle does (signed unless told otherwise); the response."""
        request = urllib.request.Request(  # noqa: S310 (the subscriber's http URL)
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "X-Circle-Signature": self.sign(body) if signature is None else signature,
                "X-Circle-Key-Id": self.key_id if key_id is None else key_id,
            },
        )
        return answer_json(request)


def wallets_inbound(transfer: dict) -> dict:
    """A Mint-shaped inbound transfer as Programmable Wallets reports it in a
    `transactions.inbound` notification (no currency code: the token id)."""
    state = {"complete": "COMPLETE", "failed": "FAILED"}.get(transfer["status"], "CONFIRMED")
    return {
        "id": transfer["id"],
        "blockchain": "ETH-SEPOLIA",
        "tokenId": USDC_TOKEN_ID,
        "walletId": transfer["destination"].get("id", ""),
        "sourceAddress": "0x" + "5" * 40,
        "destinationAddress": transfer["destination"]["address"],
        "transactionType": "INBOUND",
        "custodyType": "DEVELOPER",
        "state": state,
        "amounts": [transfer["amount"]["amount"]],
        "nfts": None,
        "txHash": transfer.get("transactionHash", ""),
        "networkFee": "0.000021",
        "createDate": transfer["createDate"],
        "updateDate": transfer["createDate"],
    }


def mint_v1_message(transfer: dict) -> dict:
    """A transfer as Circle Mint v1 reports it (the JSON SNS carries in `Message`)."""
    client_id = "00000000-0000-0000-0000-000000000001"
    return {
        "clientId": client_id,
        "notificationType": "transfers",
        "version": 1,
        "customAttributes": {"clientId": client_id},
        "transfer": transfer,
    }

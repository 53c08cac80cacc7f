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

Its API's request handler is onchain.sandbox_api's; it also plays Amazon SNS, as it delivers
Circle Mint v1 notifications (onchain.sandbox_sns).
"""

import base64
import json
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from decimal import Decimal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.sandbox import SandboxServer
from onchain.notifications import CHECKLIST_ALIASES
from onchain.sandbox_api import circle_api_handler
from onchain.sandbox_sns import SnsSandbox, answer_json, sandbox_now

# How the sandbox notifies a deposit: Circle Mint v2 (`custody.transfer`, the default),
# Programmable Wallets (`transactions.inbound`) or Circle Mint v1 through SNS (`sns`).
DEPOSIT_NOTIFICATIONS = ("custody.transfer", "transactions.inbound", "sns")
# The sandbox's USDC token for Wallets notifications (a real one is per blockchain; tests and
# the rehearsal put it in CIRCLE_WALLETS_TOKENS).
USDC_TOKEN_ID = "5797fbd6-3795-519d-84ca-ec4c5f80c3b1"  # noqa: S105 (a token, not a secret)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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

    # The wire ----------------------------------------------------------------------------

    def _handler(self):
        return circle_api_handler(self)

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

"""A Due sandbox shipped with the product, for development, tests and the rehearsal.

It speaks what the treasury's client uses (treasury/due.py), Due's parts as Due documents them:
quotes (`POST /v1/transfers/quote`, 1:1 without fee, a token valid 2 minutes), transfers
(`POST /v1/transfers {quote, recipient}`: a new transfer at each call, as nothing in Due's
documentation promises otherwise; `GET /v1/transfers/{id}`; `POST
/v1/transfers/{id}/funding_address` while it awaits funds, shaped as the third-party spec in
tests/treasury/fixtures/due/SOURCES.md has it; `GET /v1/transfers?order=desc&
limit=&startDate=&next=` -> `{"items", "next"}`), bearer DUE_API_KEY, error bodies
`{"error_code", "message", "http_code"}` and webhooks (`{"id", "type":
"transfer.status_changed", "data": transfer, "occurredAt", "attemptedAt"}`, Ed25519 over the
raw body, hex in `X-Webhook-Signature`, by the sandbox's own key pair: its `public_key_pem` is
what Due's `POST /v1/webhook_endpoints` would answer); and what is still ours, `GET
/v1/balances` (with our HMAC-SHA256 signature by DUE_API_SECRET).

A transfer is created `awaiting_funds`; `finish(id, "completed" | "failed")` makes it
`payment_processed` or `failed`, as Due would once it was funded and paid out (or not).

Balances: `balances` (per currency, settable; 0 unless set) are what we hold at the provider; a
processed transfer takes its source amount from one and adds its destination amount to the
other. The sandbox does not refuse a conversion for want of balance (a balance may go negative),
so tests see exactly what the conversions did.

Knobs on transfer creations: `fail_next` (statuses for the next ones), `delay` (seconds before
answering: timeouts), `lose_answers` (how many next ones are recorded and then answered with
nothing: the connection closes, as when a timeout cuts it), `on_created` (called with the answer
after the transfer is recorded, before it is sent); `unavailable` (every call 503); `settle`
("completed" or "failed": what a transfer becomes when it is next read, or at once when
`callback` is set), `callback` + `callback_copies` (the same event delivered again);
`finish(id, outcome, destination_amount=...)` settles one transfer by hand (a destination
amount other than 1:1 on demand). `create_calls` counts the creations received. On reads:
`slow_reads` (how many next `GET /v1/transfers/{id}` answers are held `delay` seconds after
the transfer is read: an answer that arrives after a newer one was given), `reads` counts them.
"""

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.sandbox import SandboxHandler, SandboxServer
from treasury.due import signature

# What a finished transfer is at Due, by the outcome a test or the rehearsal asks for.
OUTCOMES = {"completed": "payment_processed", "failed": "failed"}
OPEN = "awaiting_funds"


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class DueSandbox(SandboxServer):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str,
        api_secret: str,
        settle: str | None = "completed",
        callback: str | None = None,
    ):
        self.api_key, self.api_secret = api_key, api_secret
        self.settle = settle
        self.callback = callback
        self.callback_copies = 1
        self.conversions: dict[str, dict] = {}
        self.quotes: dict[str, dict] = {}
        self.create_calls = 0
        self.fail_next: list[int] = []
        self.delay = 0.0
        self.lose_answers = 0
        self.slow_reads = 0
        self.reads = 0
        self.unavailable = False
        self.balances: dict[str, Decimal] = {}
        self.on_created = None
        self.signing_key = Ed25519PrivateKey.generate()
        self.public_key_pem = (
            self.signing_key.public_key()
            .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        self._serve(host, port)

    def finish(
        self, conversion_id: str, outcome: str, destination_amount: str | None = None
    ) -> dict:
        """The provider settles a transfer ("completed": `payment_processed`, or "failed"),
        calling back if asked. A completion pays `destination_amount` (1:1 unless given) and
        moves the balances."""
        with self.lock:
            transfer = self.conversions[conversion_id]
            if transfer["status"] == OPEN:
                transfer["status"] = OUTCOMES[outcome]
                if outcome == "completed":
                    source, destination = transfer["source"], transfer["destination"]
                    destination["amount"] = destination_amount or source["amount"]
                    for currency, change in (
                        (source["currency"], -Decimal(source["amount"])),
                        (destination["currency"], Decimal(destination["amount"])),
                    ):
                        self.balances[currency] = self.balances.get(currency, Decimal(0)) + change
            answer = json.loads(json.dumps(transfer))
        if self.callback:
            event = self.event(answer)
            for _ in range(self.callback_copies):
                self.call_back(event)
        return answer

    def event(self, transfer: dict) -> bytes:
        """Due's webhook about `transfer`, as sent (each redelivery the same bytes)."""
        at = iso(datetime.now(UTC))
        return json.dumps(
            {
                "id": f"wh_evt_{uuid.uuid4().hex[:16]}",
                "type": "transfer.status_changed",
                "data": transfer,
                "occurredAt": at,
                "attemptedAt": at,
            }
        ).encode()

    def sign(self, body: bytes) -> str:
        return self.signing_key.sign(body).hex()

    def call_back(self, body: bytes) -> int:
        request = urllib.request.Request(  # noqa: S310 (the subscriber's http URL)
            self.callback,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "X-Webhook-Signature": self.sign(body)},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def _handler(self):
        sandbox = self

        class Handler(SandboxHandler):
            def _error(self, status: int, code: str, message: str) -> None:
                self._json(status, {"error_code": code, "message": message, "http_code": status})

            def _authorised(self, raw: bytes, *, signed: bool = True) -> bool:
                """Due's bearer key; on our own calls (`signed`), our HMAC too."""
                timestamp = self.headers.get("X-Due-Timestamp", "")
                expected = signature(sandbox.api_secret, timestamp, raw)
                if self.headers.get("Authorization") != f"Bearer {sandbox.api_key}":
                    self._error(401, "err_unauthorized", "Unknown API key.")
                    return False
                if signed and self.headers.get("X-Due-Signature") != expected:
                    self._error(401, "err_bad_signature", "Bad signature.")
                    return False
                return True

            def do_GET(self):
                url = urlsplit(self.path)
                path = url.path
                if not self._authorised(b"", signed=path == "/v1/balances"):
                    return None
                if sandbox.unavailable:
                    return self._error(503, "err_unavailable", "Try later.")
                if path == "/v1/balances":
                    with sandbox.lock:
                        rows = [
                            {"currency": currency, "amount": str(amount)}
                            for currency, amount in sorted(sandbox.balances.items())
                        ]
                    return self._json(200, {"data": rows})
                if path == "/v1/transfers":
                    return self._list(parse_qs(url.query))
                transfer_id = path.removeprefix("/v1/transfers/")
                if transfer_id == path or transfer_id not in sandbox.conversions:
                    return self._error(404, "err_transfer_not_found", "No transfer.")
                if sandbox.settle and not sandbox.callback:
                    sandbox.finish(transfer_id, sandbox.settle)
                with sandbox.lock:
                    answer = json.loads(json.dumps(sandbox.conversions[transfer_id]))
                    sandbox.reads += 1
                    slow = sandbox.slow_reads > 0
                    sandbox.slow_reads -= slow
                if slow:
                    time.sleep(sandbox.delay)
                return self._json(200, answer)

            def _list(self, query: dict):
                """Transfers created since `startDate`, newest first, `limit` a page; `next`
                names the following page."""
                try:
                    since = datetime.fromisoformat(query.get("startDate", ["1970-01-01"])[0])
                    limit = int(query.get("limit", ["20"])[0])
                    start = int(query.get("next", ["0"])[0])
                except ValueError as exc:
                    return self._error(400, "err_invalid_request", str(exc))
                if since.tzinfo is None:
                    since = since.replace(tzinfo=UTC)
                with sandbox.lock:
                    listed = [
                        json.loads(json.dumps(t))
                        for t in reversed(sandbox.conversions.values())
                        if datetime.fromisoformat(t["createdAt"]) >= since
                    ]
                page = listed[start : start + limit]
                more = start + limit < len(listed)
                return self._json(200, {"items": page, "next": str(start + limit) if more else ""})

            def do_POST(self):
                raw = self._body()
                path = urlsplit(self.path).path
                if not self._authorised(raw, signed=False):
                    return None
                try:
                    body = json.loads(raw)
                    if not isinstance(body, dict):
                        raise TypeError("the body is not an object")
                except (ValueError, TypeError) as exc:
                    return self._error(400, "err_invalid_request", str(exc))
                if path == "/v1/transfers/quote":
                    return self._quote(body)
                if path.endswith("/funding_address"):
                    return self._funding_address(path.split("/")[-2])
                if path != "/v1/transfers":
                    return self._error(404, "err_not_found", "Not found.")
                with sandbox.lock:
                    sandbox.create_calls += 1
                    failure = sandbox.fail_next.pop(0) if sandbox.fail_next else None
                    if sandbox.unavailable:
                        failure = 503
                if sandbox.delay:
                    time.sleep(sandbox.delay)
                if failure is not None:
                    return self._error(failure, "err_injected", "Injected.")
                with sandbox.lock:
                    quote = sandbox.quotes.get(body.get("quote"))
                    if quote is None or quote["expires"] < time.monotonic():
                        return self._error(400, "err_quote_not_found", "No such quote.")
                    if not isinstance(body.get("recipient"), str) or not body["recipient"]:
                        return self._error(400, "err_recipient_required", "Recipient required.")
                    created = datetime.now(UTC)
                    transfer = {
                        "id": f"tf_{uuid.uuid4().hex[:20]}",
                        "ownerId": "acct_sandbox",
                        "status": OPEN,
                        "source": {**quote["source"]},
                        "destination": {**quote["destination"], "id": body["recipient"]},
                        "externalId": body.get("externalId"),
                        "fxRate": 1,
                        "createdAt": iso(created),
                        "expiresAt": iso(created + timedelta(minutes=30)),
                    }
                    sandbox.conversions[transfer["id"]] = transfer
                    answer = json.loads(json.dumps(transfer))
                    lost = sandbox.lose_answers > 0
                    sandbox.lose_answers -= lost
                if sandbox.on_created is not None:
                    sandbox.on_created(answer)
                if sandbox.settle and sandbox.callback:
                    threading.Thread(
                        target=sandbox.finish, args=(answer["id"], sandbox.settle), daemon=True
                    ).start()
                if lost:  # accepted, but the answer never reaches the caller
                    self.close_connection = True
                    return None
                return self._json(200, answer)

            def _funding_address(self, transfer_id: str):
                """Where a transfer's USDC is to be sent: an address of its own (the shape of
                the third-party spec's TransferInstructionsDisposableAccount; Due publishes no
                example)."""
                with sandbox.lock:
                    transfer = sandbox.conversions.get(transfer_id)
                if transfer is None:
                    return self._error(404, "err_transfer_not_found", "No transfer.")
                if transfer["status"] != OPEN:
                    return self._error(
                        422,
                        "err_transfer_not_awaiting_funds",
                        "The transfer is not awaiting funds.",
                    )
                address = "0x" + hashlib.sha256(transfer_id.encode()).hexdigest()[:40]
                details = {"schema": "evm", "address": address}
                return self._json(
                    200, {"kind": "disposable_account", "details": details, "memo": ""}
                )

            def _quote(self, body: dict):
                """A quote at 1:1 without fee, valid 2 minutes, named by its token."""
                try:
                    source, destination = body["source"], body["destination"]
                    pair = (source["currency"], destination["currency"])
                    if pair not in (("USD", "USDC"), ("USDC", "USD")):
                        raise ValueError(f"no channel from {pair[0]} to {pair[1]}")
                    amount = source["amount"]
                    if not isinstance(amount, str) or Decimal(amount) <= 0:
                        raise ValueError("source.amount is not a positive amount")
                    rails = (source["rail"], destination["rail"])
                except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
                    return self._error(400, "err_invalid_request", str(exc))
                token = f"qt_{uuid.uuid4().hex}"
                sides = [
                    {"rail": rail, "currency": currency, "amount": amount, "fee": "0"}
                    for rail, currency in zip(rails, pair, strict=True)
                ]
                with sandbox.lock:
                    sandbox.quotes[token] = {
                        "source": sides[0],
                        "destination": sides[1],
                        "expires": time.monotonic() + 120,
                    }
                expires = iso(datetime.now(UTC) + timedelta(minutes=2))
                return self._json(
                    200,
                    {
                        "token": token,
                        "source": sides[0],
                        "destination": sides[1],
                        "fxRate": 1,
                        "fxMarkup": 0,
                        "expiresAt": expires,
                    },
                )

        return Handler

"""A Due sandbox shipped with the product, for development, tests and the rehearsal.

It speaks the wire format the treasury's client uses (documented in treasury/due.py; ours):
`POST /v1/conversions` (bearer DUE_API_KEY, HMAC-SHA256 signature with DUE_API_SECRET,
`Idempotency-Key`: the same key and body name the same conversion, another body under the key is
409), `GET /v1/conversions/{id}`, `GET /v1/conversions?idempotency_key=K` (404 when no creation
under K was received) and `GET /v1/balances`; completions may also be called back to a
subscriber, signed the same way. Rate 1:1 between USD and USDC.

Balances: `balances` (per currency, settable; 0 unless set) are what we hold at the provider; a
completed conversion takes its source amount from one and adds its destination amount to the
other. The sandbox does not refuse a conversion for want of balance (a balance may go negative),
so tests see exactly what the conversions did.

Knobs: `fail_next` (statuses for the next creations), `delay` (seconds before answering a
creation: timeouts), `lose_answers` (how many next creations are recorded and then answered with
nothing: the connection closes, as when a timeout cuts it), `unavailable` (every call 503),
`on_created` (called after a conversion is recorded, before the answer), `settle` ("completed" or
"failed": what a conversion becomes when it is next read, or at once when `callback` is set),
`callback` + `callback_copies` (duplicate callbacks); `finish(id, status, destination_amount=...)`
settles one conversion by hand (a destination amount other than 1:1 on demand).
"""

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

from gateway.sandbox import SandboxHandler, SandboxServer
from treasury.due import signature


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
        self.by_key: dict[str, tuple[str, dict]] = {}
        self.create_calls = 0
        self.fail_next: list[int] = []
        self.delay = 0.0
        self.lose_answers = 0
        self.unavailable = False
        self.balances: dict[str, Decimal] = {}
        self.on_created = None
        self._serve(host, port)

    def finish(
        self, conversion_id: str, status: str, destination_amount: str | None = None
    ) -> dict:
        """The provider settles a conversion ("completed" or "failed"), calling back if asked. A
        completion pays `destination_amount` (1:1 unless given) and moves the balances."""
        with self.lock:
            conversion = self.conversions[conversion_id]
            if conversion["status"] in ("pending", "processing"):
                conversion["status"] = status
                if status == "completed":
                    source, destination = conversion["source"], conversion["destination"]
                    destination["amount"] = destination_amount or source["amount"]
                    for currency, change in (
                        (source["currency"], -Decimal(source["amount"])),
                        (destination["currency"], Decimal(destination["amount"])),
                    ):
                        self.balances[currency] = self.balances.get(currency, Decimal(0)) + change
            answer = json.loads(json.dumps(conversion))
        if self.callback:
            for _ in range(self.callback_copies):
                self.call_back(answer)
        return answer

    def call_back(self, conversion: dict) -> int:
        body = json.dumps({"type": f"conversion.{conversion['status']}", "data": conversion})
        timestamp = str(int(time.time()))
        request = urllib.request.Request(  # noqa: S310 (the subscriber's http URL)
            self.callback,
            data=body.encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "X-Due-Timestamp": timestamp,
                "X-Due-Signature": signature(self.api_secret, timestamp, body.encode()),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def _handler(self):
        sandbox = self

        class Handler(SandboxHandler):
            def _authorised(self, raw: bytes) -> bool:
                timestamp = self.headers.get("X-Due-Timestamp", "")
                expected = signature(sandbox.api_secret, timestamp, raw)
                if self.headers.get("Authorization") != f"Bearer {sandbox.api_key}":
                    self._json(401, {"code": "unauthorized", "message": "Unknown API key."})
                    return False
                if self.headers.get("X-Due-Signature") != expected:
                    self._json(401, {"code": "bad_signature", "message": "Bad signature."})
                    return False
                return True

            def do_GET(self):
                if not self._authorised(b""):
                    return None
                if sandbox.unavailable:
                    return self._json(503, {"code": "unavailable", "message": "Try later."})
                url = urlsplit(self.path)
                path = url.path
                if path == "/v1/balances":
                    with sandbox.lock:
                        rows = [
                            {"currency": currency, "amount": str(amount)}
                            for currency, amount in sorted(sandbox.balances.items())
                        ]
                    return self._json(200, {"data": rows})
                if path == "/v1/conversions":
                    key = parse_qs(url.query).get("idempotency_key", [""])[0]
                    with sandbox.lock:
                        known = sandbox.by_key.get(key)
                    if not key or known is None:
                        return self._json(404, {"code": "not_found", "message": "No conversion."})
                    conversion_id = known[0]
                else:
                    conversion_id = path.removeprefix("/v1/conversions/")
                if conversion_id == path or conversion_id not in sandbox.conversions:
                    return self._json(404, {"code": "not_found", "message": "No conversion."})
                if sandbox.settle and not sandbox.callback:
                    sandbox.finish(conversion_id, sandbox.settle)
                with sandbox.lock:
                    answer = json.loads(json.dumps(sandbox.conversions[conversion_id]))
                return self._json(200, {"data": answer})

            def do_POST(self):
                raw = self._body()
                if not self._authorised(raw):
                    return None
                if urlsplit(self.path).path != "/v1/conversions":
                    return self._json(404, {"code": "not_found", "message": "Not found."})
                with sandbox.lock:
                    sandbox.create_calls += 1
                    failure = sandbox.fail_next.pop(0) if sandbox.fail_next else None
                    if sandbox.unavailable:
                        failure = 503
                if sandbox.delay:
                    time.sleep(sandbox.delay)
                if failure is not None:
                    return self._json(failure, {"code": "injected", "message": "Injected."})
                key = self.headers.get("Idempotency-Key", "")
                try:
                    body = json.loads(raw)
                    source = body["source"]
                    pair = (source["currency"], body["destination"]["currency"])
                    if pair not in (("USD", "USDC"), ("USDC", "USD")) or not key:
                        raise ValueError("unsupported pair or no Idempotency-Key")
                    amount = source["amount"]
                except (ValueError, KeyError, TypeError) as exc:
                    return self._json(400, {"code": "invalid", "message": str(exc)})
                with sandbox.lock:
                    known = sandbox.by_key.get(key)
                    if known is not None and known[1] != body:
                        return self._json(409, {"code": "conflict", "message": "Key reused."})
                    if known is None:
                        conversion = {
                            "id": f"conv_{uuid.uuid4().hex[:20]}",
                            "status": "pending",
                            "source": {"currency": pair[0], "amount": amount},
                            "destination": {"currency": pair[1], "amount": None},
                            "rate": "1",
                            "fee": "0",
                            "reference": body.get("reference", ""),
                            "createdAt": datetime.now(UTC).isoformat(),
                        }
                        sandbox.conversions[conversion["id"]] = conversion
                        sandbox.by_key[key] = (conversion["id"], body)
                    answer = json.loads(json.dumps(sandbox.conversions[sandbox.by_key[key][0]]))
                    lost = sandbox.lose_answers > 0
                    sandbox.lose_answers -= lost
                if known is None:
                    if sandbox.on_created is not None:
                        sandbox.on_created(answer)
                    if sandbox.settle and sandbox.callback:
                        threading.Thread(
                            target=sandbox.finish, args=(answer["id"], sandbox.settle), daemon=True
                        ).start()
                if lost:  # accepted, but the answer never reaches the caller
                    self.close_connection = True
                    return None
                return self._json(201 if known is None else 200, {"data": answer})

        return Handler

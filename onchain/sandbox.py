"""A Circle sandbox shipped with the product, for development, tests and the rehearsal.

It speaks Circle's wire format for what the engine uses: the notification public-key endpoint
(`GET /v2/notifications/publicKey/{id}`, bearer-authenticated) and signed notifications posted
to a subscriber with `X-Circle-Signature` (base64 ECDSA-SHA256 over the raw body) and
`X-Circle-Key-Id`. Nothing in the engine knows it is a sandbox: it is just a base URL.
"""

import base64
import json
import threading
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


class CircleSandbox:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.key_id = str(uuid.uuid4())
        public_der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key_b64 = base64.b64encode(public_der).decode()
        self.key_fetches = 0
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "CircleSandbox":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        sandbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                prefix = "/v2/notifications/publicKey/"
                if not self.headers.get("Authorization", "").startswith("Bearer "):
                    return self._json(401, {"code": 401, "message": "Malformed authorization."})
                if not self.path.startswith(prefix):
                    return self._json(404, {"code": 404, "message": "Not found."})
                key_id = self.path[len(prefix) :]
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

            def _json(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args) -> None:  # quiet: tests and rehearsals print reports
                pass

        return Handler

    def sign(self, body: bytes) -> str:
        return base64.b64encode(self.private_key.sign(body, ec.ECDSA(hashes.SHA256()))).decode()

    @staticmethod
    def transfer_notification(
        *,
        notification_type: str,
        transfer_id: str,
        address: str,
        amount: str,
        notification_id: str | None = None,
    ) -> bytes:
        """A notification about an inbound USDC transfer, in Circle's shape."""
        status = {
            "transfers.created": "pending",
            "transfers.completed": "complete",
            "transfers.failed": "failed",
        }[notification_type]
        return json.dumps(
            {
                "subscriptionId": "00000000-0000-0000-0000-000000000001",
                "notificationId": notification_id or str(uuid.uuid4()),
                "notificationType": notification_type,
                "notification": {
                    "id": transfer_id,
                    "source": {"type": "blockchain", "chain": "ETH"},
                    "destination": {"type": "blockchain", "address": address, "chain": "ETH"},
                    "amount": {"amount": amount, "currency": "USD"},
                    "transactionHash": "0x" + uuid.uuid4().hex,
                    "status": status,
                    "createDate": "2026-11-24T00:00:00Z",
                },
                "timestamp": "2026-11-24T00:00:01Z",
                "version": 2,
            }
        ).encode()

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
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

"""What the product's HTTP sandboxes (Circle's, Due's) share: a threaded server on a loopback
port of their own, started and stopped as a context manager, and the JSON plumbing of their
request handlers."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class SandboxHandler(BaseHTTPRequestHandler):
    """The base of a sandbox's request handler: read the body, answer JSON, log nothing."""

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args) -> None:  # quiet: tests and rehearsals print reports
        pass


class SandboxServer:
    """Subclasses set their state, then call `_serve(host, port)`; their `_handler()` returns
    the request handler class (a SandboxHandler)."""

    def _serve(self, host: str, port: int) -> None:
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.handle_error = lambda request, address: None  # a caller that hung up
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

"""What the product's HTTP sandboxes (Circle's, Due's) share: a threaded server on a loopback
port of their own, started and stopped as a context manager."""

import threading
from http.server import ThreadingHTTPServer
from typing import Self


class SandboxServer:
    """Subclasses set their state, then call `_serve(host, port)`; their `_handler()` returns
    the request handler class."""

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

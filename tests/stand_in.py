"""A stand-in HTTP peer for the answers our sandboxes never give (a provider's answer gone
wrong): a loopback server whose GETs and POSTs are answered by `answer(method, path) ->
(status, body)`, every path asked for kept in `asked` and every request body in `bodies`, in
order."""

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandIn(ThreadingHTTPServer):
    def __init__(self, answer: Callable[[str, str], tuple[int, bytes]]):
        self.asked: list[str] = []
        self.bodies: list[bytes] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                server.bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                server.asked.append(self.path)
                status, body = answer(self.command, self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __exit__(self, *exc_info):
        self.shutdown()
        super().__exit__(*exc_info)

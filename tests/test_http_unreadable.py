"""Requests that gunicorn itself refuses before Django sees them (a request line or a header it
cannot parse, headers over its limits, a transfer coding it does not take) are answered in the
API's JSON error shape, as everything Django answers is (gateway/errors.py): found from outside,
they were gunicorn's HTML pages. Sent over a real socket to gunicorn as deploy/ runs it."""

import json
import socket

import pytest
from django.db import connection

from rehearsal.bench_http import api_server

pytestmark = pytest.mark.django_db(transaction=True)

HEAD = b"Host: 127.0.0.1\r\nX-Forwarded-Proto: https\r\n"
UNREADABLE = {
    "a request line that is not one": (b"GARBAGE\r\n" + HEAD + b"\r\n", 400),
    "a method of control characters": (b"G\x01T /healthz HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
    "an HTTP version that does not exist": (b"GET /healthz HTTP/9.9\r\n" + HEAD + b"\r\n", 400),
    "a request line over 4094 bytes": (
        b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n" + HEAD + b"\r\n",
        400,
    ),
    "a header name with a space": (
        b"GET /healthz HTTP/1.1\r\n" + HEAD + b"Bad Name: x\r\n\r\n",
        400,
    ),
    "a header over 8190 bytes": (
        b"GET /healthz HTTP/1.1\r\n" + HEAD + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",
        431,
    ),
    "more than 100 headers": (
        b"GET /healthz HTTP/1.1\r\n"
        + HEAD
        + b"".join(b"X-H%d: v\r\n" % i for i in range(120))
        + b"\r\n",
        431,
    ),
    "a NUL in a header value": (b"GET /healthz HTTP/1.1\r\n" + HEAD + b"X-A: a\x00b\r\n\r\n", 400),
    "an unknown transfer coding": (
        b"POST /healthz HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: brotli\r\n\r\n",
        501,
    ),
}


def _send(port: int, raw: bytes) -> tuple[int, bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    head, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), head.lower(), body


def test_what_gunicorn_cannot_read_is_answered_as_a_json_error():
    connection.close()  # gunicorn's workers use the same test database
    answers = {}
    with api_server(connection.settings_dict["NAME"]) as port:
        for name, (raw, _) in UNREADABLE.items():
            answers[name] = _send(port, raw)
        # ... and the server still answers what it can read.
        status, _, body = _send(
            port, b"GET /healthz HTTP/1.1\r\n" + HEAD + b"Connection: close\r\n\r\n"
        )
        assert status == 200, body
    for name, (_, expected) in UNREADABLE.items():
        status, head, body = answers[name]
        assert status == expected, (name, status, body[:300])
        assert b"content-type: application/json" in head, (name, head)
        assert int(head.split(b"content-length: ")[1].split(b"\r\n")[0]) == len(body), name
        error = json.loads(body)["error"]
        assert set(error) <= {"code", "message", "field"} and error["message"], (name, error)
        assert (
            error["code"]
            == {400: "bad_request", 431: "too_large", 501: "not_implemented"}[expected]
        ), (name, error)
        assert "<html" not in body.decode("ascii"), name

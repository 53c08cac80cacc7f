"""One HTTP call to a provider's JSON API (Circle, Due), over real HTTP (urllib): the request,
its timeout, the JSON answer, and every failure mapped to the caller's own exceptions. A status
in `refusals` says the request itself is wrong and raises `refused(status, message)`, which is
final; anything else (timeouts, transport errors, 5xx, 429, an answer that is not a JSON object
we could store: NaN, a NUL or an unpaired surrogate in a string, nesting deeper than the input
boundary's) raises `unavailable(message)`, which a caller may retry. A provider's answer is read
as strictly as a request to us (gateway.boundary.json_object): found from outside, a NUL in a
Due answer reached a row PostgreSQL refused, and every monitor run died on it. Each provider
keeps its own wire format, headers and retry policy."""

import urllib.error
import urllib.request
from collections.abc import Callable, Container

from gateway.boundary import json_object
from gateway.exceptions import InputRefused


def error_message(body: dict) -> str:
    """An error body's `message` (Circle's and Due's both carry one)."""
    message = body.get("message")
    return message if isinstance(message, str) else ""


def provider_call(
    *,
    provider: str,
    base_url: str,
    method: str,
    path: str,
    headers: dict[str, str],
    data: bytes | None,
    timeout: float,
    refusals: Container[int],
    refused: type[Exception],
    unavailable: type[Exception],
    error_text: Callable[[dict], str] = error_message,
    listed: str | None = None,
) -> dict:
    """`method base_url+path` with `headers` and body `data`; the decoded JSON answer. An
    error's JSON body is told in the exception's message by `error_text`. `listed`: the key of
    the answer's list whose items are read one by one (gateway.boundary.json_object)."""
    request = urllib.request.Request(  # noqa: S310 (settings allow only http and https)
        f"{base_url}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            raw = response.read()
    except urllib.error.HTTPError as exc:
        try:
            message = error_text(json_object(exc.read(), field="answer"))
        except InputRefused:
            message = ""
        if exc.code in refusals:
            raise refused(
                exc.code, f"{provider} refused {method} {path}: {exc.code} {message}"
            ) from None
        raise unavailable(f"{provider} answered {exc.code} to {method} {path} {message}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as exc:
        raise unavailable(f"{method} {path} failed: {exc}") from None
    try:
        return json_object(raw, field="answer", listed=listed)
    except InputRefused as exc:
        raise unavailable(f"{provider}'s answer to {method} {path}: {exc}") from None

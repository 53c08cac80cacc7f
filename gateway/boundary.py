"""The input boundary of every HTTP entry (the API, Circle's and Due's webhooks, the internal
endpoints, /metrics; the admin console's is gateway.console_boundary): what any sender may put
in a request is checked here, before it is parsed, trusted or written, and refused as
InputRefused naming the field.

- A body is read only up to its endpoint's limit, judged by its declared Content-Length before
  a byte is read (413); Django's own limit (DATA_UPLOAD_MAX_MEMORY_SIZE) stays behind it.
- JSON is UTF-8 (RFC 8259), one value per key, no NaN or Infinity, nested at most
  MAX_JSON_DEPTH levels, and its strings (keys too) hold no NUL and no unpaired surrogate:
  PostgreSQL refuses both in text, so such a request could only end in a 500 further in.
- Header values we read (tokens, ids) are printable ASCII of a bounded length; a secret is
  compared in constant time on bytes, whatever the sender's characters.
"""

import hmac
import json
import re

from django.http import HttpRequest

from gateway.exceptions import InputRefused

# Our requests are flat and providers' notifications a few levels deep: deeper is an attack on
# the parser, not a request. (Python's parser stops itself near 1000 levels: RecursionError.)
MAX_JSON_DEPTH = 16
# Tokens, ids and keys: printable ASCII without spaces.
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
MAX_TOKEN_LENGTH = 512  # ours are 43 characters; a longer header is not a token


def unstorable(text: str) -> bool:
    """`text` holds a NUL or an unpaired surrogate: PostgreSQL stores neither in text."""
    return bool(_UNSTORABLE.search(text))


def printable_ascii(value: str, *, max_length: int) -> bool:
    """1..max_length printable ASCII characters without spaces."""
    return 0 < len(value) <= max_length and bool(_PRINTABLE_ASCII.fullmatch(value))


def body_read(request: HttpRequest, *, limit: int) -> bytes:
    """The request's body, refused (413) when its declared length is over `limit` before any
    of it is read, so a sender cannot make us wait for or hold what we will refuse."""
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0  # Django reads no body then either
    if declared > limit:
        raise InputRefused(413, "too_large", f"the body is over {limit} bytes", "body")
    body = request.body
    if len(body) > limit:
        raise InputRefused(413, "too_large", f"the body is over {limit} bytes", "body")
    return body


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # Two values for one key: which one a reader takes is the reader's guess (Python's is the
    # last, others the first), so the document is refused instead.
    document = dict(pairs)
    if len(document) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return document


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def json_object(raw: bytes | str, *, field: str = "body", listed: str | None = None) -> dict:
    """The JSON object `raw` holds (UTF-8 bytes, or text already decoded), every string in it
    storable and nested at most MAX_JSON_DEPTH levels; else InputRefused (400) naming the key
    at fault (the top-level key holding it) or `field` for the document as a whole.
    `listed`: the key of a list whose items are read one by one (a provider's list of
    transfers): an item that cannot be stored does not make the whole list unreadable; it is
    replaced by `{"unreadable": why, "listed": the item as ASCII JSON}`, which no reader takes
    for a transfer, for the caller to record and skip."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise InputRefused(400, "invalid_json", f"the {field} is not UTF-8", field) from None
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise InputRefused(
            400, "invalid_json", f"the {field} is nested too deeply", field
        ) from None
    except _DuplicateKey as exc:
        raise InputRefused(
            400, "invalid_json", f"{exc.key} appears more than once", exc.key
        ) from None
    except ValueError:
        raise InputRefused(400, "invalid_json", f"the {field} is not valid JSON", field) from None
    if not isinstance(document, dict):
        raise InputRefused(400, "invalid_json", f"the {field} must be a JSON object", field)
    items = document.get(listed) if listed is not None else None
    if isinstance(items, list):  # (read here, item by item: not again below)
        document[listed] = [_item_readable(listed, item) for item in items]
    for key, value in document.items():
        # A key that cannot be stored is named escaped: echoed raw, its unpaired surrogate made
        # the error body itself JSON that strict parsers refuse (found from outside).
        name = key.encode("unicode_escape").decode("ascii") if unstorable(key) else key
        _storable(name, key, 1)
        if not (key == listed and isinstance(items, list)):
            _storable(name, value, 1)
    return document


def _item_readable(field: str, item: object) -> object:
    try:
        _storable(field, item, 2)
    except InputRefused as exc:
        return {"unreadable": str(exc), "listed": json.dumps(item, ensure_ascii=True)}
    return item


def _storable(field: str, value, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise InputRefused(
            400, "invalid_json", f"{field} is nested deeper than {MAX_JSON_DEPTH} levels", field
        )
    if isinstance(value, str):
        if unstorable(value):
            raise InputRefused(
                400, "invalid", f"{field} holds a NUL character or an unpaired surrogate", field
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(field, key, depth + 1)
            _storable(field, item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _storable(field, item, depth + 1)


def bearer_token(request: HttpRequest) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None when the header is missing or
    malformed (our tokens are printable ASCII: anything else cannot match one)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip(" \t")  # HTTP whitespace only: str.strip() would eat U+00A0
    if scheme.lower() != "bearer" or not printable_ascii(token, max_length=MAX_TOKEN_LENGTH):
        return None
    return token


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of a token someone sent with ours. As bytes: compare_digest
    refuses str with non-ASCII characters (a TypeError, a 500) and a header may hold any,
    unpaired surrogates included (hence backslashreplace)."""
    if not expected:
        return False
    return hmac.compare_digest(
        given.encode("utf-8", "backslashreplace"), expected.encode("utf-8", "backslashreplace")
    )

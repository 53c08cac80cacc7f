"""One input boundary for every HTTP entry (issue 15, item 1). Each bad input of the outside
test, sent to every endpoint it reaches (the API, the Circle webhook in both its forms, Due's
callback, the internal endpoints, /metrics), is answered with our JSON error naming the field,
a 4xx (413 for a body over its limit), and writes nothing: no row anywhere, no balance moved, no
Idempotency-Key claimed. A Circle notification we will never act on is recorded as refused and
answered 200 (a 5xx would be retried by Circle forever). What Django answers itself (a wrong
method, a CSRF check, an unknown path, a body over its limit) is the same JSON error."""

import json
import re
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.apps import apps
from django.db import connection
from django.http import HttpResponse
from django.test import Client

from cutover.actors import Actor
from cutover.operators import api_client_issue
from ledger.models import Account
from onchain.models import CircleNotification, DepositAddress, SigningFetch
from onchain.sandbox import CircleSandbox, wallets_inbound
from onchain.signatures import signature_verify
from rehearsal.bench_http import api_server
from tests.cutover.factories import legacy_user, phase_set

pytestmark = pytest.mark.django_db

ADMIN_TOKEN = "Kq7-admin-token-3Vx9wLp2"
METRICS_TOKEN = "Zt4-metrics-token-8Nm1rQs6"
WEBHOOK_SECRET = "Hy2-webhook-secret-5Bd7kRn4"
DUE_SECRET = "Pw6-due-secret-1Jc8tGv3"
DUE_WEBHOOK_KEY = Ed25519PrivateKey.generate()
DUE_WEBHOOK_PUBLIC_KEY = (
    DUE_WEBHOOK_KEY.public_key()
    .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
DEPOSIT_ADDRESS = "0x" + "ab" * 20  # registered for the user: a deposit to it is credited
WITHDRAWAL_ADDRESS = "0x" + "cd" * 20
NEW_ADDRESS = "0x" + "ef" * 20

# Every app whose tables a request could write.
WRITABLE_APPS = ("ledger", "gateway", "cutover", "onchain", "treasury", "custody")


@dataclass
class World:
    http: Client
    user: uuid.UUID
    token: str
    circle: CircleSandbox


@pytest.fixture(scope="module")
def circle_sandbox():
    """Circle's public-key endpoint and SNS's certificate, over HTTP; its keys sign here."""
    with CircleSandbox() as sandbox:
        yield sandbox


@pytest.fixture
def world(settings, circle_sandbox) -> World:
    settings.ADMIN_TOKEN, settings.METRICS_TOKEN = ADMIN_TOKEN, METRICS_TOKEN
    settings.CIRCLE_WEBHOOK_SECRET, settings.DUE_API_SECRET = WEBHOOK_SECRET, DUE_SECRET
    settings.DUE_WEBHOOK_PUBLIC_KEY = DUE_WEBHOOK_PUBLIC_KEY
    settings.CIRCLE_API_BASE_URL = circle_sandbox.base_url
    port = circle_sandbox.server.server_address[1]
    settings.CIRCLE_SNS_URL_PATTERN = re.compile(rf"http://127\.0\.0\.1:{port}")
    # The legacy phase: an input that got through would move money in one table, visibly.
    phase_set("legacy")
    user = legacy_user("100")
    DepositAddress.objects.create(address=DEPOSIT_ADDRESS, chain="ETH", user_id=user)
    _, token = api_client_issue(
        name=f"boundary-{uuid.uuid4().hex[:8]}",
        scopes=["read", "credit", "debit", "withdraw", "addresses"],
        actor=Actor("test"),
    )
    # The signing key known before the snapshot: fetching it once is Circle's, not the input's.
    signature_verify(
        body=b"{}",
        signature=circle_sandbox.sign(b"{}"),
        key_id=circle_sandbox.key_id,
        base_url=circle_sandbox.base_url,
    )
    # As production answers: an unhandled error is a response, not an exception in the test.
    return World(Client(raise_request_exception=False), user, token, circle_sandbox)


def written() -> dict:
    """Every table's row count and every account's balance: what a request could change. (Not
    the count of fetches of signing material, which a delivery spends before its body can be
    trusted: a rate limit's ledger, onchain.signatures.signing_fetch_claim.)"""
    models = [model for app in WRITABLE_APPS for model in apps.get_app_config(app).get_models()]
    tables = sorted({model._meta.db_table for model in models} - {SigningFetch._meta.db_table})
    with connection.cursor() as cursor:
        cursor.execute("SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in tables))
        counts = dict(zip(tables, cursor.fetchone(), strict=True))
    balances = dict(Account.objects.values_list("pk", "balance"))
    return {"rows": counts, "balances": balances}


# --- how each endpoint is called ----------------------------------------------------------


def _json(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def api(method: str, endpoint: str, body=None, *, user=None, query: str = "", **headers):
    """A request of the API client (bearer token, an Idempotency-Key) for the world's user;
    `headers` replace the client's own (None drops one)."""

    def send(w: World) -> HttpResponse:
        # A key of its own: an input that got through must not make the next one a replay.
        sent = {"Authorization": f"Bearer {w.token}", "Idempotency-Key": str(uuid.uuid4())}
        sent.update({name.replace("_", "-"): value for name, value in headers.items()})
        extra = {
            "HTTP_" + name.upper().replace("-", "_"): value
            for name, value in sent.items()
            if value is not None
        }
        path = f"/api/v1/users/{user or w.user}/{endpoint}{query}"
        if method == "get":
            return w.http.get(path, **extra)
        return w.http.post(path, data=_json(body), content_type="application/json", **extra)

    return send


def circle(body, *, signed: bool = True, token: str = WEBHOOK_SECRET, **headers):
    """A Circle v2 delivery to the webhook: `body` signed by the sandbox's key unless told."""

    def send(w: World) -> HttpResponse:
        raw = _json(body)
        extra = {
            "HTTP_X_CIRCLE_SIGNATURE": w.circle.sign(raw) if signed else "c2lnbmF0dXJl",
            "HTTP_X_CIRCLE_KEY_ID": w.circle.key_id,
        }
        extra.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
        return w.http.post(
            f"/webhooks/circle/transfers?token={token}",
            data=raw,
            content_type="application/json",
            **extra,
        )

    return send


def sns(message: dict | str, *, signed: bool = True, **fields):
    """Circle Mint v1 through SNS: `message` (Circle's JSON, or text as it is) in an envelope
    with `fields` set, signed by the sandbox's SNS key (a lone surrogate cannot be signed: SNS
    signs UTF-8, so such an envelope goes unsigned and must be refused before its signature)."""

    def send(w: World) -> HttpResponse:
        envelope = w.circle.sns_envelope("{}")
        envelope.update(
            fields, Message=message if isinstance(message, str) else json.dumps(message)
        )
        if signed:
            w.circle.sns_sign(envelope)
        return w.http.post(
            f"/webhooks/circle/transfers?token={WEBHOOK_SECRET}",
            data=json.dumps(envelope).encode(),
            content_type="text/plain; charset=utf-8",
            HTTP_X_AMZ_SNS_MESSAGE_TYPE="Notification",
        )

    return send


def sns_raw(body: bytes):
    def send(w: World) -> HttpResponse:
        return w.http.post(
            f"/webhooks/circle/transfers?token={WEBHOOK_SECRET}",
            data=body,
            content_type="text/plain; charset=utf-8",
            HTTP_X_AMZ_SNS_MESSAGE_TYPE="Notification",
        )

    return send


def due(body, *, signature: str | None = None):
    """Due's webhook, signed as Due signs it (Ed25519 over the raw body, hex)."""

    def send(w: World) -> HttpResponse:
        raw = _json(body)
        return w.http.post(
            "/webhooks/due/conversions",
            data=raw,
            content_type="application/json",
            HTTP_X_WEBHOOK_SIGNATURE=DUE_WEBHOOK_KEY.sign(raw).hex()
            if signature is None
            else signature,
        )

    return send


def internal(method: str, path: str, authorization: str):
    def send(w: World) -> HttpResponse:
        return getattr(w.http, method)(path, HTTP_AUTHORIZATION=authorization)

    return send


# --- the inputs -------------------------------------------------------------------------

MUTATION = {"direction": "credit", "amount": "10", "currency": "USDC", "reason": "test"}
WITHDRAWAL = {"amount": "10", "address": WITHDRAWAL_ADDRESS, "chain": "ETH"}
REGISTRATION = {"address": NEW_ADDRESS, "chain": "ETH", "currency": "USDC"}
POSTS = {
    "balance-mutations": MUTATION,
    "withdrawals": WITHDRAWAL,
    "deposit-addresses": REGISTRATION,
}
GETS = ("balance", "deposit-addresses")

DEEP_ARRAY = b"[" * 15000  # the outside test's ~15 KB
DEEP_OBJECT = b'{"a": ' * 2000 + b"1" + b"}" * 2000
NUL, SURROGATE, LOW_SURROGATE = "a\x00b", "\ud800", "x\udc00y"
# Each was applied as money once: Decimal() reads them all.
LENIENT_AMOUNTS = [
    "1_000",
    "\u0661\u0660",  # Arabic-Indic 10
    "\uff11\uff10",  # fullwidth 10
    " 10 ",
    "10\u00a0",
    "+5",
    "-5",
    "1e1",
    "1E+1",
    ".5",
    "5.",
    "0",
    "0.000",
    "NaN",
    "Infinity",
    "0x10",
    "1,000",
    "",
    "1.1234567",  # more places than USDC has
    "1" * 30,
]
BAD_HEADERS = {
    "X-Correlation-Id": ["c" * 129, "caf\u00e9", "caf\u00c3\u00a9", "a\x00b", "\ud800", "a b"],
    "Authorization": [
        "Bearer t\u00f6ken",
        "Bearer t\u00c3\u00b6ken",  # UTF-8 bytes as WSGI hands them over (latin-1)
        "Bearer tok\x00en",
        "Bearer \ud800",
        "Bearer " + "x" * 10000,
        "Bearer",
        "Basic dXNlcjpwYXNz",
    ],
    "Idempotency-Key": ["k" * 201, "k\x00", "\ud800", "k\u00e9", "", " "],
}
STATUS_OF_HEADER = {"X-Correlation-Id": 400, "Authorization": 401, "Idempotency-Key": 400}


@dataclass(frozen=True)
class Case:
    send: Callable[[World], HttpResponse]
    status: int
    field: str | None
    recorded: bool = False  # a Circle notification kept as refused (200), nothing else


def _api_body_cases():
    """The bodies of the API's POST endpoints, one bad field at a time."""
    for endpoint, good in POSTS.items():
        yield f"{endpoint}:deep-array", Case(api("post", endpoint, DEEP_ARRAY), 400, "body")
        yield f"{endpoint}:deep-object", Case(api("post", endpoint, DEEP_OBJECT), 400, "body")
        for raw, name in (
            (b"{not json", "not-json"),
            (b"\xff\xfe{}", "not-utf8"),
            (json.dumps(good).encode("utf-16"), "utf16"),
            (b"\xef\xbb\xbf" + _json(good), "utf8-bom"),
            (b"[]", "array"),
            (b'"text"', "string"),
            (b"null", "null"),
            (b"", "empty"),
            (_json(good)[:-1] + b', "n": NaN}', "nan"),
            (_json(good)[:-1] + b', "n": 1' + b"0" * 5000 + b"}", "huge-int"),
            (_json({**good, "pad": "x" * 20000}), "over-16k"),
        ):
            status = 413 if name == "over-16k" else 400
            yield f"{endpoint}:{name}", Case(api("post", endpoint, raw), status, "body")
        for field in good:
            for value, name in (
                ([[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]], "nested"),
                (NUL, "nul"),
                (SURROGATE, "surrogate"),
                (LOW_SURROGATE, "low-surrogate"),
                ([good[field]], "list"),
                ({"v": good[field]}, "object"),
                (10, "number"),
                (None, "null"),
                (True, "bool"),
            ):
                body = {**good, field: value}
                yield f"{endpoint}:{field}:{name}", Case(api("post", endpoint, body), 400, field)
            raw = _json(good).replace(
                json.dumps(good[field]).encode(), b'"a\xed\xa0\x80b"'
            )  # a surrogate's bytes: not UTF-8
            yield f"{endpoint}:{field}:raw-surrogate", Case(api("post", endpoint, raw), 400, "body")
            raw = _json(good).replace(json.dumps(good[field]).encode(), b'"a\x00b"')
            yield f"{endpoint}:{field}:raw-nul", Case(api("post", endpoint, raw), 400, "body")
        first = next(iter(good))
        duplicate = _json(good)[:-1] + f', "{first}": {json.dumps(good[first])}}}'.encode()
        yield f"{endpoint}:duplicate-key", Case(api("post", endpoint, duplicate), 400, first)
        yield (
            f"{endpoint}:key-nul",
            Case(api("post", endpoint, {**good, "x\u0000": 1}), 400, "x\\x00"),
        )
        yield (  # named escaped: a lone surrogate echoed made the error body unparseable
            f"{endpoint}:key-surrogate",
            Case(api("post", endpoint, {**good, "k\udfff": 1}), 400, "k\\udfff"),
        )
        yield (
            f"{endpoint}:bad-user",
            Case(api("post", endpoint, good, user="not-a-uuid"), 400, "user_id"),
        )
    for endpoint in ("balance-mutations", "withdrawals"):
        for amount in LENIENT_AMOUNTS:
            body = {**POSTS[endpoint], "amount": amount}
            yield f"{endpoint}:amount={amount!r}", Case(api("post", endpoint, body), 400, "amount")


def _api_header_cases():
    """The headers, path and query of every API endpoint."""
    endpoints = [("post", endpoint, body) for endpoint, body in POSTS.items()]
    endpoints += [("get", endpoint, None) for endpoint in GETS]
    for method, endpoint, body in endpoints:
        for header, values in BAD_HEADERS.items():
            if header == "Idempotency-Key" and method == "get":
                continue
            for value in values:
                name = header.replace("-", "_")
                send = api(method, endpoint, body, **{name: value})
                label = f"{method}-{endpoint}:{header}={value[:12]!r}"
                yield label, Case(send, STATUS_OF_HEADER[header], header)
        yield (
            f"{method}-{endpoint}:no-authorization",
            Case(api(method, endpoint, body, Authorization=None), 401, "Authorization"),
        )
    for query in ("?currency=US%00DC", "?currency=%ED%A0%80", "?currency=usdc"):
        yield f"balance:{query}", Case(api("get", "balance", query=query), 400, "currency")
    yield "balance:bad-user", Case(api("get", "balance", user="not-a-uuid"), 400, "user_id")


def _due_cases():
    """Due's webhook: signed with the endpoint's key, yet unreadable or unstorable."""
    event = {"type": "transfer.status_changed", "data": {"id": "tf_1", "status": "failed"}}
    yield "due:deep-array", Case(due(DEEP_ARRAY), 400, "body")
    yield "due:deep-object", Case(due(DEEP_OBJECT), 400, "body")
    yield "due:not-utf8", Case(due(b'{"data": {"id": "\xed\xa0\x80"}}'), 400, "body")
    yield "due:over-limit", Case(due(b"{" + b" " * 70000 + b"}"), 413, "body")
    for value, name in ((NUL, "nul"), (SURROGATE, "surrogate"), (LOW_SURROGATE, "low")):
        body = {**event, "data": {"id": value}}
        yield f"due:id:{name}", Case(due(body), 400, "data")
        yield f"due:type:{name}", Case(due({**event, "type": value}), 400, "type")
    for data in ("tf_1", ["tf_1"], {"id": 7}, {"id": "tf 1"}, {"id": "t" * 65}):
        body = {**event, "data": data}
        yield f"due:data={str(data)[:12]!r}", Case(due(body), 400, "data.id")
    for kind in (7, None, ["transfer.status_changed"]):
        yield f"due:type={kind!r}", Case(due({**event, "type": kind}), 400, "type")
    for signature in ("sig-\u00e9", "\u20ac" * 64, "a\x00b", "\ud800", "x" * 5000, "00" * 64):
        yield (
            f"due:signature={signature[:12]!r}",
            Case(due(event, signature=signature), 400, "X-Webhook-Signature"),
        )


def _internal_cases():
    """The internal endpoints and /metrics: tokens of any bytes."""
    for method, path in (
        ("get", "/internal/onchain/buffer-status"),
        ("post", "/internal/treasury/trigger-cycle"),
        ("get", "/metrics"),
    ):
        for authorization in BAD_HEADERS["Authorization"]:
            yield (
                f"{path}:{authorization[:16]!r}",
                Case(internal(method, path, authorization), 401, "Authorization"),
            )


def deposit(**fields) -> dict:
    """Circle Mint v2's notification of a completed deposit to the user's address, `fields`
    set on its transfer."""
    notification = json.loads(
        CircleSandbox.transfer_notification(
            transfer_id=str(uuid.uuid4()), address=DEPOSIT_ADDRESS, amount="10"
        )
    )
    notification["notification"].update(fields)
    return notification


def wallets_deposit(**fields) -> dict:
    """Programmable Wallets' notification of the same deposit, `fields` set on its
    transaction."""
    transaction = {**wallets_inbound(deposit()["notification"]), **fields}
    return json.loads(CircleSandbox.notification("transactions.inbound", transaction))


def _circle_cases():
    """Circle's webhook, v2 and through SNS: the signature is good, what it signs is not."""
    yield "circle:deep-array", Case(circle(DEEP_ARRAY), 400, "body")
    yield "circle:deep-object", Case(circle(DEEP_OBJECT), 400, "body")
    nested = deposit()
    for _ in range(40):
        nested["notification"] = {"n": nested["notification"]}
    yield "circle:nested-notification", Case(circle(nested), 400, "notification")
    yield "circle:not-utf8", Case(circle(b'{"notificationId": "\xed\xa0\x80"}'), 400, "body")
    yield "circle:over-limit", Case(circle(b"{" + b" " * 70000 + b"}"), 413, "body")
    for value, name in ((NUL, "nul"), (SURROGATE, "surrogate"), (LOW_SURROGATE, "low")):
        yield (
            f"circle:notificationId:{name}",
            Case(circle({**deposit(), "notificationId": value}), 400, "notificationId"),
        )
        yield (
            f"circle:notificationType:{name}",
            Case(circle({**deposit(), "notificationType": value}), 400, "notificationType"),
        )
        yield f"circle:id:{name}", Case(circle(deposit(id=value)), 400, "notification")
        destination = {"type": "wallet", "id": "1000000001", "address": value, "chain": "ETH"}
        yield (
            f"circle:address:{name}",
            Case(circle(deposit(destination=destination)), 400, "notification"),
        )
    for value in ("x" * 300, "x" * 65):
        yield f"circle:id-of-{len(value)}", Case(circle(deposit(id=value)), 200, None, True)
    for amount in LENIENT_AMOUNTS:
        body = deposit(amount={"amount": amount, "currency": "USD"})
        yield f"circle:amount={amount!r}", Case(circle(body), 200, None, True)
    for amount in (10, ["10"], None, {"amount": "10"}):
        body = deposit(amount={"amount": amount, "currency": "USD"})
        yield f"circle:amount-{type(amount).__name__}", Case(circle(body), 200, None, True)
    body = deposit(amount={"amount": "10", "currency": ["USD"]})
    yield "circle:currency-list", Case(circle(body), 200, None, True)
    # Programmable Wallets: a state or blockchain that is no string (once a TypeError, a 500)
    for field in ("state", "blockchain"):
        for value in (["COMPLETE"], {"v": "ETH"}):
            body = wallets_deposit(**{field: value})
            yield f"wallets:{field}-{type(value).__name__}", Case(circle(body), 200, None, True)
    for token in ("t%C3%B6ken", "%E9", "%FF", "a%00b", "%ED%A0%80", "x" * 5000, ""):
        yield f"circle:token={token[:12]!r}", Case(circle(deposit(), token=token), 401, "token")
    for key_id in ("k" * 300, "k\x00", "\ud800", "cl\u00e9", "a b"):
        send = circle(deposit(), X_CIRCLE_KEY_ID=key_id)
        yield f"circle:key-id={key_id[:12]!r}", Case(send, 400, "X-Circle-Key-Id")
    for signature in ("sig-\u00e9", "\u20ac" * 64, "a\x00b", "\ud800", "not base64!"):
        send = circle(deposit(), X_CIRCLE_SIGNATURE=signature)
        yield f"circle:signature={signature[:12]!r}", Case(send, 401, "X-Circle-Signature")

    # Circle Mint v1 through SNS: the envelope is signed by the sandbox's SNS key.
    mint = {"notificationType": "transfers", "transfer": deposit()["notification"]}
    yield "sns:deep-array", Case(sns_raw(DEEP_ARRAY), 400, "body")
    yield "sns:not-utf8", Case(sns_raw(b'{"Type": "\xed\xa0\x80"}'), 400, "body")
    for value, name, signed in ((NUL, "nul", True), (SURROGATE, "surrogate", False)):
        send = sns(mint, signed=signed, MessageId=value)
        yield f"sns:MessageId:{name}", Case(send, 400, "MessageId")
        yield f"sns:Subject:{name}", Case(sns(mint, signed=signed, Subject=value), 400, "Subject")
        message = json.dumps(mint).replace(DEPOSIT_ADDRESS, value)
        yield f"sns:Message-address:{name}", Case(sns(message, signed=signed), 400, "Message")
        message = value + json.dumps(mint)
        yield f"sns:Message-raw:{name}", Case(sns(message, signed=signed), 400, "Message")
    yield "sns:Message-deep", Case(sns("[" * 15000), 400, "Message")
    nested = {**mint, "transfer": json.loads("[" * 40 + "]" * 40)}
    yield "sns:Message-nested", Case(sns(nested), 400, "Message")


CASES = {
    "api-bodies": dict(_api_body_cases()),
    "api-headers": dict(_api_header_cases()),
    "due": dict(_due_cases()),
    "internal": dict(_internal_cases()),
}
CIRCLE_CASES = dict(_circle_cases())


def _check(world: World, case: Case) -> None:
    before = written()
    response = case.send(world)
    assert response.status_code == case.status, response.content[:300]
    assert response["Content-Type"] == "application/json"
    body = response.json()
    after = written()
    if case.recorded:
        assert body["status"] == "refused", body
        rows = after["rows"].items()
        changed = {table for table, count in rows if count != before["rows"][table]}
        assert changed == {CircleNotification._meta.db_table}
        assert after["rows"][CircleNotification._meta.db_table] == (
            before["rows"][CircleNotification._meta.db_table] + 1
        )
        assert after["balances"] == before["balances"]
        return
    assert body["error"].get("field") == case.field, body
    assert after == before


@pytest.mark.parametrize("group", CASES)
def test_a_bad_input_is_a_json_4xx_naming_the_field_and_writes_nothing(world, subtests, group):
    """A group's inputs one after the other against one world (each is refused and writes
    nothing, which is checked input by input): a fixture per input would cost more than all
    the requests."""
    for name, case in CASES[group].items():
        with subtests.test(msg=name):
            _check(world, case)


@pytest.mark.django_db(transaction=True)
def test_a_bad_circle_delivery_is_a_json_4xx_or_recorded_and_credits_nothing(world, subtests):
    """Circle's deliveries, one after the other in one test: the inbox keeps its failures in
    transactions of its own (it refuses to run inside a test's transaction), and a database
    flush per delivery would cost more than all of them."""
    for name, case in CIRCLE_CASES.items():
        with subtests.test(msg=name):
            _check(world, case)


# --- what Django answers itself --------------------------------------------------------

USER = "7d3f6a52-4b8e-4f0a-9a57-3c2b7e9d1a10"
ENDPOINTS = {
    "/api/v1/openapi.json": {"GET"},
    f"/api/v1/users/{USER}/balance": {"GET"},
    f"/api/v1/users/{USER}/balance-mutations": {"POST"},
    f"/api/v1/users/{USER}/withdrawals": {"POST"},
    f"/api/v1/users/{USER}/deposit-addresses": {"GET", "POST"},
    "/webhooks/circle/transfers": {"HEAD", "POST"},
    "/webhooks/due/conversions": {"POST"},
    "/internal/onchain/buffer-status": {"GET"},
    "/internal/treasury/trigger-cycle": {"POST"},
    "/metrics": {"GET"},
    "/healthz": {"GET"},
    "/readyz": {"GET"},
}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def test_a_wrong_method_is_a_json_405_even_where_a_browser_would_be_csrf_checked(subtests):
    browser = Client(enforce_csrf_checks=True, raise_request_exception=False)
    for path, allowed in ENDPOINTS.items():
        for method in (method for method in METHODS if method not in allowed):
            with subtests.test(msg=f"{method} {path}"):
                before = written()
                response = browser.generic(method, path, b"{}", "application/json")
                assert response.status_code == 405
                assert response["Content-Type"] == "application/json"
                assert response.json()["error"]["code"] == "method_not_allowed"
                assert set(response["Allow"].split(", ")) >= allowed - {"HEAD"}
                assert written() == before


UNKNOWN_PATHS = [
    "/api/v1/",
    "/api/v1/users",
    f"/api/v1/users/{USER}",
    f"/api/v1/users/{USER}/balance/",
    f"/api/v1/users/{USER}/nothing",
    "/internal/",
    "/internal/treasury/nothing",
    "/webhooks/circle",
    "/webhooks/due/conversions/",
    "/%00",
]


def test_an_unknown_path_is_a_json_404(subtests):
    browser = Client(enforce_csrf_checks=True, raise_request_exception=False)
    for path in UNKNOWN_PATHS:
        for method in ("GET", "POST", "DELETE"):
            with subtests.test(msg=f"{method} {path}"):
                response = browser.generic(method, path, b"{}", "application/json")
                assert response.status_code == 404
                assert response["Content-Type"] == "application/json"
                assert response.json()["error"]["code"] == "not_found"


# --- bodies over every limit, over real sockets, as production serves them ---------------

PRODUCTION = {
    "DJANGO_SETTINGS_MODULE": "config.settings.production",
    "DJANGO_SECRET_KEY": "Wq3-production-secret-key-8Lz1vNc5xTb7mKd2pRf4hJs6gYw9",
    "CIRCLE_API_KEY": "Cv5-circle-api-key-2Hn8",
    "CIRCLE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "DUE_API_KEY": "Dk9-due-api-key-4Tm1",
    "DUE_API_SECRET": DUE_SECRET,
    "ADMIN_TOKEN": ADMIN_TOKEN,
    "METRICS_TOKEN": METRICS_TOKEN,
    "CIRCLE_WALLET_ID": "1000000001",
}


def _post_declaring(port: int, path: str, length: int, headers: dict) -> tuple[int, dict]:
    """POST declaring a body of `length` bytes and sending only its first KB: a server that
    reads the declared length before answering would wait here; one that refuses it by its
    Content-Length answers at once (and closes the connection: gunicorn's sync workers do)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
        head.append("X-Forwarded-Proto: https")  # as the TLS-terminating balancer sends it
        head += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + b"{" + b" " * 1023)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    head, _, body = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:500]
    return int(status_line.split()[1]), json.loads(body)


@pytest.mark.django_db(transaction=True)
def test_bodies_over_every_limit_are_json_413_under_gunicorn_with_production_settings():
    """The outside test's 70 KB and 10 MB bodies (the latter over Django's own 2.5 MB), each
    refused by its declared length: answered without waiting for the rest of it."""
    phase_set("shadow")
    _, token = api_client_issue(
        name="big-bodies", scopes=["credit", "withdraw"], actor=Actor("test")
    )
    connection.close()  # gunicorn's workers use the same test database
    api_headers = {
        "Authorization": f"Bearer {token}",
        "Idempotency-Key": "big-1",
        "Content-Type": "application/json",
    }
    with api_server(connection.settings_dict["NAME"], PRODUCTION) as port:
        for path, headers in (
            (f"/api/v1/users/{USER}/balance-mutations", api_headers),
            (f"/api/v1/users/{USER}/withdrawals", api_headers),
            (f"/webhooks/circle/transfers?token={WEBHOOK_SECRET}", {}),
            ("/webhooks/due/conversions", {}),
        ):
            for length in (70 * 1024, 10 * 1024 * 1024):
                status, body = _post_declaring(port, path, length, headers)
                assert (status, body["error"]["field"]) == (413, "body"), (path, length)
    assert not CircleNotification.objects.exists()
    assert not written()["rows"]["cutover_idempotency_keys"]

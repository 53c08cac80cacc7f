"""The API's OpenAPI document (config/openapi.json, served at /api/v1/openapi.json; issue 15,
item 5): it is what the URLs serve (every route under /api/, /internal/ and /webhooks/ with the
methods its view accepts, and nothing else), so it cannot drift; and every operation it
documents is fuzzed against the running app over HTTP by schemathesis.

The fuzz draws OPENAPI_FUZZ_EXAMPLES examples per operation (CI's size by default; scripts/soak
raises it) from HYPOTHESIS_SEED (scripts/test's seed unless told), on top of the document's
examples and schemathesis' coverage cases (boundary and schema-violating values of every
parameter and body field, missing required headers, undocumented methods). Every answer must
be no 5xx, a status the operation documents, the documented content type and headers, and a
body its schema describes. The webhooks are fuzzed three ways: unsigned with every operation (a
fuzzer cannot sign: each delivery is a JSON 4xx), then signed by the keys the test holds (the
Circle sandbox's, which the service fetches as Circle's; Due's webhook key), by schemathesis and
field by field with any JSON value in each documented field of a valid delivery."""

import json
import os
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from schemathesis.config import SchemathesisConfig

import config
from cutover.actors import Actor
from cutover.models import LegacyBalance
from cutover.operators import api_client_issue
from gateway.api import ApiError
from onchain.models import DepositAddress
from onchain.sandbox import USDC_TOKEN_ID, CircleSandbox, wallets_inbound
from tests.cutover.factories import custody_open_all, ledger_balance_set, phase_set

DOCUMENT = Path(config.__file__).resolve().parent / "openapi.json"
DOCUMENTED_PREFIXES = ("/api/", "/internal/", "/webhooks/")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
EXAMPLE_USER = "7d3f6a52-4b8e-4f0a-9a57-3c2b7e9d1a10"  # the document's example user_id
EXAMPLE_ADDRESS = "0x52908400098527886e0f7030069857d2e4169ee7"  # and deposit address
ADMIN_TOKEN = "Kq7-admin-token-3Vx9wLp2"
WEBHOOK_SECRET = "Hy2-webhook-secret-5Bd7kRn4"
DUE_WEBHOOK_KEY = Ed25519PrivateKey.generate()
DUE_WEBHOOK_PUBLIC_KEY = (
    DUE_WEBHOOK_KEY.public_key()
    .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
DEFAULT_SEED = 20261201  # scripts/test's, for a run without --hypothesis-seed


def document() -> dict:
    return json.loads(DOCUMENT.read_text())


def _routes(resolver: URLResolver, prefix: str = ""):
    """Every route the URLconf serves, as an OpenAPI path (`<str:user_id>` -> `{user_id}`)."""
    for entry in resolver.url_patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            yield from _routes(entry, route)
        elif isinstance(entry, URLPattern):
            yield "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)


def _accepted_methods(http: Client, path: str) -> set[str]:
    """The methods the view answers with anything but 405 (a request without credentials:
    refused before it could change anything)."""
    url = path.replace("{user_id}", EXAMPLE_USER)
    return {
        method
        for method in METHODS
        if http.generic(method, url, b"", "application/json").status_code != 405
    }


@pytest.mark.django_db
def test_every_route_is_documented_with_the_methods_its_view_accepts_and_nothing_else():
    paths = [path for path in _routes(get_resolver()) if path.startswith(DOCUMENTED_PREFIXES)]
    assert len(paths) == len(set(paths)), "two views share a path"
    http = Client(raise_request_exception=False)
    served = {(path, method) for path in paths for method in _accepted_methods(http, path)}
    documented = {
        (path, method.upper())
        for path, operations in document()["paths"].items()
        for method in operations
        if method.upper() in METHODS
    }
    assert documented == served, {
        "served, not documented": sorted(served - documented),
        "documented, not served": sorted(documented - served),
    }


def test_each_path_parameter_is_declared_and_each_operation_named_once():
    doc = document()
    names = []
    for path, operations in doc["paths"].items():
        in_path = set(re.findall(r"{(\w+)}", path))
        for method, operation in operations.items():
            declared = {
                parameter["name"]
                for parameter in (_resolved(doc, each) for each in operation.get("parameters", []))
                if parameter["in"] == "path"
            }
            assert declared == in_path, (method, path)
            names.append(operation["operationId"])
    assert len(names) == len(set(names))


def _resolved(doc: dict, node: dict) -> dict:
    if "$ref" not in node:
        return node
    target = doc
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return target


def test_the_error_schema_is_the_body_every_refusal_has():
    """Error is what gateway.api.ApiError answers, with each of its extra names."""
    validator = Draft202012Validator(document()["components"]["schemas"]["Error"])
    for error in (
        ApiError(400, "invalid", "amount must be ...", "amount"),
        ApiError(404, "not_found", "there is no endpoint at /api/v1/"),
        ApiError(403, "missing_scope", "lacks", "Authorization", scope="withdraw"),
        ApiError(429, "limit_exceeded", "over", "amount", limit="daily_limit"),
        ApiError(503, "unavailable", "the database is unavailable", dependency="database"),
    ):
        validator.validate(error.body())
    assert not validator.is_valid({"error": {"code": "x", "message": "y", "field": None}})


def test_the_document_is_served_as_kept_in_the_repository(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == document()
    assert document()["openapi"].startswith("3.1.")


# --- the fuzz --------------------------------------------------------------------------

CI_EXAMPLES = 20
FUZZ_EXAMPLES = int(os.environ.get("OPENAPI_FUZZ_EXAMPLES", CI_EXAMPLES))
# The suite's per-test timeout holds CI's size; scripts/soak's runs as long as it takes.
FUZZ_TIMEOUT = pytest.mark.timeout(600 if FUZZ_EXAMPLES <= CI_EXAMPLES else 0)
FUZZ_SEED = int(os.environ.get("HYPOTHESIS_SEED") or DEFAULT_SEED)
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
]
# The document as kept (the test above holds it equal to the one served). Loaded at import, as
# schemathesis makes one test per operation then; the credentials come with each call.
schema = schemathesis.openapi.from_path(
    DOCUMENT,
    config=SchemathesisConfig.from_dict(
        {
            "seed": FUZZ_SEED,
            "generation": {"max-examples": FUZZ_EXAMPLES, "database": "none"},
        }
    ),
)


@dataclass
class World:
    """The fuzzed service's clients: what each of the document's security schemes is sent as,
    and the Circle sandbox's signing key (Circle's, as far as the service knows)."""

    token: str
    circle: CircleSandbox

    def credentials(self, case) -> tuple[dict, dict]:
        """(headers, query) for the operation's security schemes."""
        security = case.operation.definition.raw.get("security", [])
        schemes = {name for requirement in security for name in requirement}
        headers, query = {}, {}
        if "apiClient" in schemes:
            headers["Authorization"] = f"Bearer {self.token}"
        if "adminToken" in schemes:
            headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        if "circleSubscriberToken" in schemes:
            query["token"] = WEBHOOK_SECRET
        return headers, query

    def signatures(self, case, body: bytes) -> dict:
        """The headers that sign `body` as the webhook's sender would: Circle v2's ECDSA (an
        SNS envelope, text/plain, is signed inside by SNS's certificate: left as drawn) or
        Due's Ed25519."""
        if case.path == "/webhooks/due/conversions":
            return {"X-Webhook-Signature": DUE_WEBHOOK_KEY.sign(body).hex()}
        return {"X-Circle-Signature": self.circle.sign(body), "X-Circle-Key-Id": self.circle.key_id}


def wire_body(case) -> bytes:
    """The body as schemathesis sends it (what a signature must cover)."""
    sent = case.as_transport_kwargs()
    if "json" in sent:
        return json.dumps(sent["json"]).encode()
    body = sent.get("data") or b""
    return body if isinstance(body, bytes) else body.encode()


@pytest.fixture(scope="module")
def circle_sandbox():
    """Circle's public-key endpoint over HTTP, with the key the signed deliveries are signed
    by: a fuzzed key id is looked up there (and is unknown), never at Circle."""
    with CircleSandbox() as sandbox:
        yield sandbox


@pytest.fixture
def world(settings, circle_sandbox) -> World:
    """An API client holding every scope, ADMIN_TOKEN, Circle's subscriber token and Due's
    secret; the shadow phase (both stores written), the document's example user holding money
    in both."""
    settings.ADMIN_TOKEN, settings.CIRCLE_WEBHOOK_SECRET = ADMIN_TOKEN, WEBHOOK_SECRET
    settings.DUE_WEBHOOK_PUBLIC_KEY = DUE_WEBHOOK_PUBLIC_KEY
    settings.CIRCLE_API_BASE_URL = circle_sandbox.base_url
    port = circle_sandbox.server.server_address[1]
    settings.CIRCLE_SNS_URL_PATTERN = re.compile(rf"http://127\.0\.0\.1:{port}")
    settings.DUE_API_BASE_URL = "http://127.0.0.1:9"  # nothing listens: no request leaves
    settings.CIRCLE_WALLETS_TOKENS = {USDC_TOKEN_ID: "USDC"}
    custody_open_all()
    user = uuid.UUID(EXAMPLE_USER)
    LegacyBalance.objects.create(user_id=user, buying_power=Decimal(1000), currency="USDC")
    ledger_balance_set(user, "1000")
    # The document's example deposit: a complete transfer to the user's registered address.
    DepositAddress.objects.create(address=EXAMPLE_ADDRESS, chain="ETH", user_id=user)
    phase_set("shadow")
    _, token = api_client_issue(
        name="fuzz",
        scopes=["read", "credit", "debit", "withdraw", "addresses"],
        actor=Actor("test"),
    )
    return World(token, circle_sandbox)


# One world per operation, its examples one after the other against it (as a service sees its
# requests): the fixture is function-scoped on purpose.
ONE_WORLD_PER_OPERATION = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.django_db(transaction=True)
@FUZZ_TIMEOUT
@schema.parametrize()
@ONE_WORLD_PER_OPERATION
def test_every_operation_fuzzed_answers_as_documented_and_never_5xx(case, live_server, world):
    """The webhooks unsigned here: each delivery is refused, a JSON 4xx."""
    headers, query = world.credentials(case)
    response = case.call_and_validate(
        base_url=live_server.url, headers=headers, params=query, checks=CHECKS
    )
    if case.method == "POST" and case.path.startswith("/webhooks/"):
        assert 400 <= response.status_code < 500, response.text[:300]


@pytest.mark.django_db(transaction=True)
@FUZZ_TIMEOUT
@schema.include(path_regex="^/webhooks/", method="POST").parametrize()
@ONE_WORLD_PER_OPERATION
def test_signed_webhook_deliveries_fuzzed_are_stored_or_refused_never_5xx(case, live_server, world):
    """What the senders may sign: a Circle v2 body signed by the key the service fetches, a
    Due body with its HMAC; read, stored, processed or refused as the document says."""
    if case.media_type == "application/json":
        if case.headers:  # a v2 delivery (SNS's are text/plain)
            case.headers.pop("x-amz-sns-message-type", None)
        if isinstance(case.body, dict) and isinstance(case.body.get("notificationId"), str):
            # Circle names each notification afresh (a redelivery is the same body): drawn
            # ids repeat, and a repeated id is only ever a duplicate.
            case.body["notificationId"] = str(uuid.uuid4())
    headers, query = world.credentials(case)
    body = wire_body(case)
    headers.update(world.signatures(case, body))
    case.call_and_validate(
        base_url=live_server.url, headers=headers, params=query, data=body, checks=CHECKS
    )


# --- any JSON in any documented field of a signed delivery ----------------------------------
# Schemathesis seldom draws a wrong type deep inside a provider's body; the senders' documented
# fields are where a 5xx hid (a Wallets `state` that is a list, a Due `destination` that is a
# string), so each field of the document's schemas gets any JSON value, one at a time, in an
# otherwise valid and signed delivery.

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def _field_paths(doc: dict, schema: dict, prefix: tuple = ()) -> list[tuple]:
    """Every documented field of `schema`, nested objects' included, as a path of keys."""
    paths = []
    for name, field in _resolved(doc, schema).get("properties", {}).items():
        paths.append((*prefix, name))
        paths += _field_paths(doc, field, (*prefix, name))
    return paths


def _delivery_fields() -> list[tuple[str, tuple]]:
    doc = document()
    schemas = {
        name: {"$ref": f"#/components/schemas/{name}"} for name in doc["components"]["schemas"]
    }
    return [
        *(
            ("circle:custody.transfer", path)
            for path in _field_paths(doc, schemas["CircleNotification"])
        ),
        *(
            ("circle:custody.transfer", ("notification", *path))
            for path in _field_paths(doc, schemas["CircleMintTransfer"])
        ),
        *(
            ("circle:transactions.inbound", ("notification", *path))
            for path in _field_paths(doc, schemas["CircleWalletsTransaction"])
        ),
        *(("due", path) for path in _field_paths(doc, schemas["DueEvent"])),
    ]


def _delivery(kind: str) -> tuple[str, dict]:
    """(path, body) of a valid delivery: the document's example deposit to the example user's
    address (Mint, or the same transfer as Programmable Wallets reports it), or the document's
    example of Due's event about a processed transfer."""
    if kind == "due":
        operation = document()["paths"]["/webhooks/due/conversions"]["post"]
        return "/webhooks/due/conversions", json.loads(
            json.dumps(operation["requestBody"]["content"]["application/json"]["example"])
        )
    operation = document()["paths"]["/webhooks/circle/transfers"]["post"]
    body = json.loads(
        json.dumps(operation["requestBody"]["content"]["application/json"]["example"])
    )
    body["notificationId"], body["notification"]["id"] = str(uuid.uuid4()), str(uuid.uuid4())
    if kind == "circle:transactions.inbound":
        body["notificationType"] = "transactions.inbound"
        body["notification"] = wallets_inbound(body["notification"])
    return "/webhooks/circle/transfers", body


def _set(body: dict, path: tuple, value) -> None:
    node = body
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def _answer_documented(path: str, response, sent: str) -> None:
    """The answer is one the operation documents: its status, and a body its schema holds."""
    doc = document()
    answers = doc["paths"][path]["post"]["responses"]
    assert str(response.status_code) in answers, (sent, response.content[:300])
    assert response["Content-Type"] == "application/json"
    schema = answers[str(response.status_code)]["content"]["application/json"]["schema"]
    Draft202012Validator({**schema, "components": doc["components"]}).validate(response.json())


@pytest.mark.django_db(transaction=True)
@FUZZ_TIMEOUT
@settings(
    max_examples=FUZZ_EXAMPLES * 5,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@seed(FUZZ_SEED)
@given(field=st.sampled_from(_delivery_fields()), value=JSON_VALUES)
def test_any_json_in_any_documented_field_of_a_signed_delivery_is_stored_or_refused(
    world, field, value
):
    kind, path = field
    url, body = _delivery(kind)
    _set(body, path, value)
    raw = json.dumps(body).encode()
    if kind == "due":
        headers = {"X-Webhook-Signature": DUE_WEBHOOK_KEY.sign(raw).hex()}
    else:
        url += f"?token={WEBHOOK_SECRET}"
        headers = {
            "X-Circle-Signature": world.circle.sign(raw),
            "X-Circle-Key-Id": world.circle.key_id,
        }
    response = Client(raise_request_exception=False).post(
        url, data=raw, content_type="application/json", headers=headers
    )
    _answer_documented(url.partition("?")[0], response, f"{kind} {'.'.join(path)}={value!r}")

"""Fuzzed bodies and headers at the Circle webhook: never a 500, never money moved by anything
that is not a well-formed completed transfer. Signed fuzz gets past the signature and reaches
the parser; unsigned fuzz must stop at the signature with nothing stored."""

import json
import math
import uuid
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from cutover.models import BalanceMutation
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from onchain.models import CircleNotification, DepositAddress
from onchain.sandbox import CircleSandbox
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)
FUZZ = hypothesis_settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
amounts = st.one_of(
    st.sampled_from(
        ["NaN", "-5", "0", "1e400", "1e30", "1.0000001", "", " 7", "Infinity", "12.5", "3"]
    ),
    json_values,
)


@pytest.fixture
def sandbox(settings):
    with CircleSandbox() as running:
        settings.CIRCLE_API_BASE_URL = running.base_url
        settings.CIRCLE_API_KEY = "sandbox-key"
        yield running


@pytest.fixture
def depositor():
    phase_set("shadow")
    user_id = legacy_user("0")
    ledger_balance_set(user_id, "0")
    DepositAddress.objects.create(address="0xabc", chain="ETH", user_id=user_id)
    return user_id


def post(client, body: bytes, headers: dict):
    response = client.post(
        "/webhooks/circle/transfers", data=body, content_type="application/json", headers=headers
    )
    assert response.status_code < 500, response.content
    assert response["Content-Type"] == "application/json"
    return response.status_code


# Into our wallet (CIRCLE_WALLET_ID's default, the sandbox's) at the depositor's address.
OURS = {"type": "wallet", "id": "1000000001", "address": "0xabc"}


@FUZZ
@given(
    notification=st.one_of(json_values, st.dictionaries(st.text(max_size=8), json_values)),
    kind=st.sampled_from(
        ["transfers.completed", "transfers.failed", "transfers.created", "custody.transfer"]
    ),
    transfer_id=json_values,
    destination=st.one_of(json_values, st.just(OURS), st.just({"address": "0xabc"})),
    amount=amounts,
    currency=st.sampled_from(["USD", "EUR", "usd", None]),
    source=st.one_of(json_values, st.just({"type": "wallet"})),
    creditable=st.booleans(),
)
def test_signed_malformed_transfers_never_500_and_never_credit(
    client,
    sandbox,
    depositor,
    notification,
    kind,
    transfer_id,
    destination,
    amount,
    currency,
    source,
    creditable,
):
    if creditable:  # the rest still fuzzed: the credit path is drawn often, not by luck
        notification = notification if isinstance(notification, dict) else {}
        kind, currency, destination = "custody.transfer", "USD", OURS
        transfer_id = f"fuzz-{uuid.uuid4()}"
        source = {"type": "blockchain"}
        amount = amount if _exact(amount) else "12.5"
    if isinstance(notification, dict):
        notification.update(
            id=transfer_id,
            destination=destination,
            amount={"amount": amount, "currency": currency},
            source=source,
        )
        notification["status"] = "complete"
    body = json.dumps(
        {
            "notificationId": str(uuid.uuid4()),  # examples share the database: each its own
            "notificationType": kind,
            "notification": notification,
        }
    ).encode()
    headers = {"X-Circle-Signature": sandbox.sign(body), "X-Circle-Key-Id": sandbox.key_id}
    reference = f"circle:transfer:{transfer_id}"
    # A text column holds no NUL: such an id was never stored, and cannot be looked up.
    new = "\x00" in reference or not BalanceMutation.objects.filter(reference=reference).exists()
    before = BalanceMutation.objects.count()
    post(client, body, headers)
    # Only a completed inbound transfer with a string id, into our wallet at the known address
    # (one that names no wallet is not ours), in USD (USDC),
    # with an exact positive amount, credits: once, that amount.
    credits = (
        isinstance(notification, dict)
        and kind in ("transfers.completed", "custody.transfer")
        and currency == "USD"
        and isinstance(transfer_id, str)
        and transfer_id != ""
        and destination == OURS
        and not (isinstance(source, dict) and source.get("type") == "wallet")
        and _exact(amount)
        and new
        and _acceptable(json.loads(body))  # else the input boundary refuses the body (400)
    )
    event(f"credits: {credits}")  # --hypothesis-show-statistics: the credit path is drawn
    assert BalanceMutation.objects.count() == before + credits
    if credits:
        assert BalanceMutation.objects.get(reference=reference).amount == Decimal(amount)


def _acceptable(value) -> bool:
    """JSON as the webhook reads it: no NaN or Infinity, no NUL in any string or key."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, dict):
        return all(_acceptable(key) and _acceptable(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_acceptable(item) for item in value)
    return True


def _exact(amount) -> bool:
    try:
        amount_parse(amount, "USDC")
    except InvalidAmount:
        return False
    return isinstance(amount, str)


@FUZZ
@given(
    body=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())),
    signature=st.one_of(st.text(max_size=60), st.just("")),
    key_id=st.one_of(st.text(max_size=40), st.just("")),
)
def test_unsigned_fuzz_stores_nothing(client, sandbox, depositor, body, signature, key_id):
    headers = {"X-Circle-Signature": signature, "X-Circle-Key-Id": key_id}
    headers = {name: value for name, value in headers.items() if value.isprintable()}
    assert post(client, body, headers) in (400, 401, 413)
    assert not CircleNotification.objects.exists()
    assert not BalanceMutation.objects.exists()

"""The balance API: authentication and scope, the Idempotency-Key matrix, field errors."""

import json
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from cutover.api import request_fingerprint
from cutover.models import BalanceMutation, IdempotencyRecord, LegacyBalance
from cutover.services import api_client_create, idempotency_claim
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def user():
    user_id = legacy_user("100")
    ledger_balance_set(user_id, "100")
    phase_set("shadow")
    return user_id


@pytest.fixture
def service():
    client, token = api_client_create(name="payments")
    return client, token


def post(client, user_id, token, body, key="k-1", **headers):
    extra = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    if key is not None:
        extra["HTTP_IDEMPOTENCY_KEY"] = key
    extra.update(headers)
    return client.post(
        f"/api/v1/users/{user_id}/balance-mutations",
        data=json.dumps(body) if not isinstance(body, str) else body,
        content_type="application/json",
        **extra,
    )


CREDIT = {"direction": "credit", "amount": "25.50", "currency": "USDC", "reason": "deposit"}


def test_credit_returns_201_and_echoes_the_correlation_id(client, user, service):
    response = post(client, user, service[1], CREDIT, HTTP_X_CORRELATION_ID="corr-7")
    assert response.status_code == 201
    assert response["X-Correlation-Id"] == "corr-7"
    assert response.json()["balance"] == "125.500000"
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("125.5")
    assert BalanceMutation.objects.get().correlation_id == "corr-7"


def test_replay_returns_the_first_answer_and_applies_once(client, user, service):
    first = post(client, user, service[1], CREDIT)
    again = post(client, user, service[1], CREDIT)
    assert again.status_code == 201 and again.json() == first.json()
    assert BalanceMutation.objects.count() == 1
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("125.5")


def test_same_key_other_payload_is_422_and_changes_nothing(client, user, service):
    post(client, user, service[1], CREDIT)
    response = post(client, user, service[1], {**CREDIT, "amount": "26.00"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "Idempotency-Key"
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("125.5")


def test_request_in_flight_is_409(client, user, service):
    parsed = {**CREDIT, "amount": Decimal(CREDIT["amount"])}
    held = idempotency_claim(
        client=service[0], key="k-1", request_sha256=request_fingerprint(user, parsed)
    )
    assert held.record is not None  # another request holds the key and has not finished
    response = post(client, user, service[1], CREDIT)
    assert response.status_code == 409
    assert not BalanceMutation.objects.exists()


def test_expired_key_starts_afresh(client, user, service):
    post(client, user, service[1], CREDIT)
    IdempotencyRecord.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = post(client, user, service[1], {**CREDIT, "amount": "1.00"})
    assert response.status_code == 201
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("126.5")


def test_missing_idempotency_key_is_400(client, user, service):
    response = post(client, user, service[1], CREDIT, key=None)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "Idempotency-Key"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**CREDIT, "direction": "sideways"}, "direction"),
        ({**CREDIT, "amount": 25.5}, "amount"),
        ({**CREDIT, "amount": "1.0000001"}, "amount"),
        ({**CREDIT, "amount": "-1"}, "amount"),
        ({**CREDIT, "currency": "EUR"}, "currency"),
        ({**CREDIT, "reason": ""}, "reason"),
    ],
)
def test_bad_fields_are_400_naming_the_field(client, user, service, body, field):
    response = post(client, user, service[1], body)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field
    assert not BalanceMutation.objects.exists()
    assert not IdempotencyRecord.objects.exists()


def test_malformed_json_is_400(client, user, service):
    response = post(client, user, service[1], "{not json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_overdraft_is_422_and_replays_the_same(client, user, service):
    body = {**CREDIT, "direction": "debit", "amount": "1000.00"}
    first = post(client, user, service[1], body)
    assert first.status_code == 422 and first.json()["error"]["code"] == "insufficient_funds"
    assert post(client, user, service[1], body).json() == first.json()
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("100")


def test_kill_switch_is_503_and_the_key_stays_usable(client, user, service):
    phase_set("shadow", kill_switch=True)
    assert post(client, user, service[1], CREDIT).status_code == 503
    phase_set("shadow")
    assert post(client, user, service[1], CREDIT).status_code == 201


def test_authentication_and_user_scope(client, user, service):
    assert post(client, user, None, CREDIT).status_code == 401
    assert post(client, user, "wrong", CREDIT).status_code == 401
    _, scoped = api_client_create(name="alice-app", user_id=user)
    other = uuid.uuid4()
    assert post(client, other, scoped, CREDIT).status_code == 403
    headers = {"HTTP_AUTHORIZATION": f"Bearer {scoped}"}
    assert client.get(f"/api/v1/users/{other}/balance", **headers).status_code == 403
    assert client.get(f"/api/v1/users/{user}/balance", **headers).status_code == 200
    assert not BalanceMutation.objects.exists()


def test_balance_read_follows_the_phase(client, user, service):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {service[1]}"}
    body = client.get(f"/api/v1/users/{user}/balance", **headers).json()
    assert body == {
        "user_id": str(user),
        "currency": "USDC",
        "balance": "100.000000",
        "source": "legacy",
        "phase": "shadow",
    }
    phase_set("strict", read_percent=100)
    assert client.get(f"/api/v1/users/{user}/balance", **headers).json()["source"] == "ledger"
    assert client.get("/api/v1/users/not-a-uuid/balance", **headers).status_code == 400

"""The balance API: authentication, scopes and limits, the Idempotency-Key matrix, field and
header errors."""

import json
import threading
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection
from django.test import Client
from django.utils import timezone

from cutover.actors import Actor
from cutover.balance_path import balance_mutate
from cutover.models import BalanceMutation, LegacyBalance, OperatorAudit, PhaseState
from cutover.operators import api_client_issue
from gateway.api import request_fingerprint
from gateway.exceptions import ApiClientRefused
from gateway.models import ApiClient, ApiClientSpend, IdempotencyRecord
from gateway.services import (
    api_client_spend,
    idempotency_claim,
    idempotency_complete,
    idempotency_release,
)
from ledger.models import Transaction
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

TEST_ACTOR = Actor("test")

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def user():
    user_id = legacy_user("100")
    ledger_balance_set(user_id, "100")
    phase_set("shadow")
    return user_id


@pytest.fixture
def service():
    client, token = api_client_issue(
        name="payments", scopes=["read", "credit", "debit"], actor=TEST_ACTOR
    )
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
        # Only plain ASCII decimals: each of these was once read as money and applied.
        *(
            ({**CREDIT, "amount": lenient}, "amount")
            for lenient in ("1_000", "\u0661\u0660", " 10 ", "+5", "1e1", ".5", "5.", "0x10")
        ),
        ({**CREDIT, "currency": "EUR"}, "currency"),
        ({**CREDIT, "reason": ""}, "reason"),
        ({**CREDIT, "reason": " \t "}, "reason"),  # found from outside: accepted
    ],
)
def test_bad_fields_are_400_naming_the_field(client, user, service, body, field):
    response = post(client, user, service[1], body)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field
    assert not BalanceMutation.objects.exists()
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        ("[" * 15000, "invalid_json", "body"),  # once a RecursionError: a 500
        ('{"reason": ' + "[" * 40 + "]" * 40 + "}", "invalid_json", "reason"),
        ('{"direction": "credit", "amount": "1", "reason": "a\\u0000b"}', "invalid", "reason"),
        ('{"direction": "credit", "amount": "1", "reason": "\\ud800"}', "invalid", "reason"),
        ('{"direction": "credit", "amount": "1", "currency": ["USDC"]}', "invalid", "currency"),
        ('{"direction": "credit", "amount": "1", "x\\u0000": 1}', "invalid", "x\\x00"),  # escaped
    ],
)
def test_unstorable_or_hostile_json_is_400_and_the_key_stays_usable(
    client, user, service, raw, code, field
):
    response = post(client, user, service[1], raw)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code and error.get("field") == field
    assert not BalanceMutation.objects.exists()
    assert not IdempotencyRecord.objects.exists()
    assert post(client, user, service[1], CREDIT).status_code == 201


def test_malformed_json_is_400(client, user, service):
    response = post(client, user, service[1], "{not json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_overdraft_is_422_and_replays_the_same(client, user, service):
    body = {**CREDIT, "direction": "debit", "amount": "1000.00"}
    first = post(client, user, service[1], body)
    assert first.status_code == 422 and first.json()["error"]["code"] == "insufficient_funds"
    assert post(client, user, service[1], body).json() == first.json()
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("100")


def test_kill_switch_is_503_and_the_key_stays_usable(client, user, service, caplog):
    phase_set("shadow", kill_switch=True)  # its reason: "test"
    PhaseState.objects.update(kill_switch_reason="suspected fraud on user 42, see INC-7")
    refused = post(client, user, service[1], CREDIT)
    assert refused.status_code == 503
    # The operators' reason is not the clients' to read (found from outside); the log has it.
    assert "kill switch engaged" in refused.json()["error"]["message"]
    assert "INC-7" not in refused.content.decode()
    assert "INC-7" in caplog.text
    phase_set("shadow")
    assert post(client, user, service[1], CREDIT).status_code == 201


def test_authentication_and_user_scope(client, user, service):
    assert post(client, user, None, CREDIT).status_code == 401
    assert post(client, user, "wrong", CREDIT).status_code == 401
    _, scoped = api_client_issue(
        name="alice-app", user_id=user, scopes=["read", "debit"], actor=TEST_ACTOR
    )
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


# --- scopes and limits (issue 9, item 6) ---------------------------------------------------------


def test_a_users_own_client_cannot_credit_and_nothing_changes(client, user):
    _, token = api_client_issue(
        name="alice-app", user_id=user, scopes=["read", "debit", "withdraw"], actor=TEST_ACTOR
    )
    transactions = Transaction.objects.count()
    response = post(client, user, token, {**CREDIT, "amount": "1000000.00"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"
    assert response.json()["error"]["scope"] == "credit"
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("100")
    assert Transaction.objects.count() == transactions
    assert not BalanceMutation.objects.exists() and not IdempotencyRecord.objects.exists()
    # and no user's client can be given the scope: not by the service, not in the database
    with pytest.raises(ApiClientRefused, match="may not credit"):
        api_client_issue(name="bob-app", user_id=user, scopes=["credit"], actor=TEST_ACTOR)
    with pytest.raises(IntegrityError, match="cutover_api_clients_chk_user_never_credits"):
        ApiClient.objects.filter(name="alice-app").update(scopes=["read", "credit"])


def test_each_endpoint_needs_its_scope(client, user):
    _, reader = api_client_issue(name="reader", scopes=["read"], actor=TEST_ACTOR)
    _, debitor = api_client_issue(name="debitor", scopes=["debit"], actor=TEST_ACTOR)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {debitor}"}
    refused = client.get(f"/api/v1/users/{user}/balance", **headers)
    assert refused.status_code == 403 and refused.json()["error"]["scope"] == "read"
    for direction, token in (("debit", reader), ("credit", debitor)):
        response = post(client, user, token, {**CREDIT, "direction": direction})
        assert response.status_code == 403
        assert response.json()["error"]["scope"] == direction
    assert post(client, user, debitor, {**CREDIT, "direction": "debit"}).status_code == 201
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("74.5")


def test_client_creation_is_audited(user):
    client, _ = api_client_issue(
        name="alice-app",
        user_id=user,
        scopes=["read", "debit"],
        max_amount=Decimal("50"),
        actor=Actor("cli:ops"),
        reason="ticket 12",
    )
    audit = OperatorAudit.objects.get(target=f"api_client:{client.pk}")
    assert (audit.actor, audit.action) == ("cli:ops", "api_client.create")
    assert audit.reason == "ticket 12"
    assert audit.after["scopes"] == ["read", "debit"] and audit.after["max_amount"] == "50"


def test_an_amount_over_the_client_maximum_is_422_and_the_key_stays_usable(client, user):
    _, token = api_client_issue(
        name="capped", scopes=["credit"], max_amount=Decimal("20"), actor=TEST_ACTOR
    )
    response = post(client, user, token, CREDIT)  # 25.50
    assert response.status_code == 422
    assert response.json()["error"]["limit"] == "max_amount"
    assert not IdempotencyRecord.objects.exists() and not ApiClientSpend.objects.exists()
    assert post(client, user, token, {**CREDIT, "amount": "20"}, key="k-2").status_code == 201
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("120")


def _concurrently(requests: list) -> list:
    """Each request in its own thread (its own database connection), started together."""
    start = threading.Barrier(len(requests))
    results = [None] * len(requests)

    def run(index, request):
        try:
            start.wait()
            results[index] = request()
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=item) for item in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_the_daily_limit_holds_under_concurrent_requests(user):
    _, token = api_client_issue(
        name="capped", scopes=["credit"], daily_limit=Decimal("30"), actor=TEST_ACTOR
    )
    body = {**CREDIT, "amount": "20"}
    responses = _concurrently(
        [lambda key=f"k-{n}": post(Client(), user, token, body, key=key) for n in range(4)]
    )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201, 429, 429, 429]
    refused = next(response for response in responses if response.status_code == 429)
    assert refused.json()["error"]["limit"] == "daily_limit"
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("120")
    assert BalanceMutation.objects.count() == 1
    assert [spend.amount for spend in ApiClientSpend.objects.all()] == [Decimal("20")]
    assert IdempotencyRecord.objects.count() == 1  # the refused keys were released


def test_a_refused_mutation_does_not_count_against_the_limit(client, user):
    _, token = api_client_issue(
        name="capped", scopes=["debit"], daily_limit=Decimal("150"), actor=TEST_ACTOR
    )
    overdraft = post(client, user, token, {**CREDIT, "direction": "debit", "amount": "101"})
    assert overdraft.json()["error"]["code"] == "insufficient_funds"
    assert not ApiClientSpend.objects.exists()
    debit = {**CREDIT, "direction": "debit", "amount": "100"}
    assert post(client, user, token, debit, key="k-2").status_code == 201


def test_a_balance_past_ten_to_the_22_reads_and_moves_exactly(client, user, service):
    """Balances live in numeric(38, 6); Python's default 28 digits could not quantize one past
    10^22 USDC (found from outside: the crossing credit committed and answered 500, and every
    read of the balance after it was a 500)."""
    largest = Decimal("99999999999999999999.999999")  # the largest single amount
    for number in range(101):
        balance_mutate(
            user_id=user, direction="credit", amount=largest, reference=f"big-{number}", reason="t"
        )
    headers = {"HTTP_AUTHORIZATION": f"Bearer {service[1]}"}
    expected = "10100000000000000000099.999899"  # 100 + 101 x largest
    for read_percent in (0, 100):  # legacy's reading, then the ledger's
        phase_set("read_switch", read_percent=read_percent)
        answer = client.get(f"/api/v1/users/{user}/balance", **headers)
        assert (answer.status_code, answer.json()["balance"]) == (200, expected)
    credit = post(client, user, service[1], {**CREDIT, "amount": "0.5"}, key="k-big")
    assert (credit.status_code, credit.json()["balance"]) == (201, "10100000000000000000100.499899")
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal(
        "10100000000000000000100.499899"
    )


@pytest.mark.parametrize(("phase", "read_percent"), [("shadow", 0), ("read_switch", 100)])
def test_a_balance_asked_in_a_currency_the_user_does_not_hold_is_422(
    client, service, phase, read_percent
):
    """Found from outside: a user holding 25 USD read as 0 USDC (the default), in every phase:
    a funded user told they had nothing. Now 422 naming `currency`; the held one reads."""
    holder = legacy_user("25", currency="USD")
    ledger_balance_set(holder, "25", currency="USD")
    phase_set(phase, read_percent=read_percent)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {service[1]}"}
    for query in ("", "?currency=USDC"):
        answer = client.get(f"/api/v1/users/{holder}/balance{query}", **headers)
        assert answer.status_code == 422
        assert answer.json()["error"]["field"] == "currency"
        assert "holds USD" in answer.json()["error"]["message"]
    answer = client.get(f"/api/v1/users/{holder}/balance?currency=USD", **headers)
    assert (answer.status_code, answer.json()["balance"]) == (200, "25.00")
    stranger = client.get(f"/api/v1/users/{uuid.uuid4()}/balance", **headers)  # never seen
    assert (stranger.status_code, stranger.json()["balance"]) == (200, "0.000000")


# --- a stalled request taken over (issue 9, item 11) -----------------------------------------


def test_a_stalled_claim_taken_over_can_neither_release_nor_complete(client, user, service):
    parsed = {**CREDIT, "amount": Decimal(CREDIT["amount"])}
    fingerprint = request_fingerprint(user, parsed)
    stalled = idempotency_claim(client=service[0], key="k-1", request_sha256=fingerprint)
    # A stalls past IDEMPOTENCY_LOCK_TIMEOUT; B takes the key over and applies the mutation
    IdempotencyRecord.objects.update(locked_until=timezone.now() - timedelta(seconds=1))
    takeover = idempotency_claim(client=service[0], key="k-1", request_sha256=fingerprint)
    assert takeover.record.pk == stalled.record.pk
    assert idempotency_release(claim=stalled) is False  # A's late release: changes nothing
    assert IdempotencyRecord.objects.get().status == "in_flight"
    mutation = {key: parsed[key] for key in ("direction", "amount", "currency", "reason")}
    balance_mutate(
        user_id=user, reference=f"api:{takeover.record.pk}", correlation_id="b", **mutation
    )
    assert idempotency_complete(claim=takeover, status=201, body={"answer": "B"}) is True
    assert idempotency_complete(claim=stalled, status=503, body={"answer": "A"}) is False
    assert idempotency_release(claim=stalled) is False
    retry = post(client, user, service[1], CREDIT)  # C
    assert retry.status_code == 201 and retry.json() == {"answer": "B"}
    assert BalanceMutation.objects.count() == 1
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("125.5")


def test_a_takeover_refused_by_the_kill_switch_keeps_the_key_and_never_applies_twice(
    client, user, service
):
    """A request that committed its debit and died before answering (a crash after COMMIT);
    its retry takes the key over while the kill switch is on: 503, and the key kept, since the
    dead request's mutation (reference `api:<record id>`) may stand. Once the switch is off the
    retry answers that mutation; released, the key made a new record, a new reference and a
    second debit (found from outside: 100 - 3 - 3)."""
    debit = {"direction": "debit", "amount": "3", "currency": "USDC", "reason": "payout"}
    parsed = {**debit, "amount": Decimal("3")}
    dead = idempotency_claim(
        client=service[0], key="k-9", request_sha256=request_fingerprint(user, parsed)
    )
    api_client_spend(claim=dead, scope="debit", amount=Decimal("3"), currency="USDC")
    mutation = {key: parsed[key] for key in ("direction", "amount", "currency", "reason")}
    balance_mutate(user_id=user, reference=f"api:{dead.record.pk}", correlation_id="a", **mutation)
    IdempotencyRecord.objects.update(locked_until=timezone.now() - timedelta(seconds=1))

    phase_set("shadow", kill_switch=True)
    refused = post(client, user, service[1], debit, key="k-9")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
    assert IdempotencyRecord.objects.get().pk == dead.record.pk
    phase_set("shadow", kill_switch=False)
    retry = post(client, user, service[1], debit, key="k-9")
    assert retry.status_code == 201 and retry.json()["balance"] == "97.000000"
    assert BalanceMutation.objects.get().reference == f"api:{dead.record.pk}"
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("97")
    assert [spend.amount for spend in ApiClientSpend.objects.all()] == [Decimal("3")]
    assert post(client, user, service[1], debit, key="k-9").json() == retry.json()


# --- bad headers (issue 9, item 12) ----------------------------------------------------------


@pytest.mark.parametrize(
    "correlation_id", ["c" * 129, "caf\u00e9", "tab\tbed", "with space", "\u20ac"]
)
def test_a_bad_correlation_id_is_400_and_the_key_stays_usable(
    client, user, service, correlation_id
):
    response = post(client, user, service[1], CREDIT, HTTP_X_CORRELATION_ID=correlation_id)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "X-Correlation-Id"
    assert response["X-Correlation-Id"] != correlation_id
    assert not IdempotencyRecord.objects.exists() and not BalanceMutation.objects.exists()
    good = post(client, user, service[1], CREDIT, HTTP_X_CORRELATION_ID="c" * 128)
    assert good.status_code == 201


@pytest.mark.parametrize("token", ["t\u00f6ken", "\u20ac" * 10, "tok\x01en"])
def test_a_non_ascii_bearer_token_is_401(client, user, service, token):
    response = post(client, user, token, CREDIT)
    assert response.status_code == 401
    assert response.json()["error"]["field"] == "Authorization"
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    assert client.get(f"/api/v1/users/{user}/balance", **headers).status_code == 401
    assert not BalanceMutation.objects.exists()


@pytest.mark.parametrize("phase", ["legacy", "shadow", "cutover"])
@pytest.mark.parametrize("direction", ["credit", "debit"])
def test_a_mutation_in_a_currency_the_user_does_not_hold_is_422_naming_currency(
    client, service, phase, direction
):
    """Found from outside: a mutation in another currency than the user's was 422 with no
    field (the database's refusal, CU003, covers a reused reference and an unknown
    counterparty too). It names `currency`, in every phase, and changes nothing."""
    holder = legacy_user("25", currency="USD")
    ledger_balance_set(holder, "25", currency="USD")
    phase_set(phase)
    body = {"direction": direction, "amount": "1.00", "currency": "USDC", "reason": "deposit"}
    response = post(client, holder, service[1], body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("conflict", "currency")
    assert "holds USD" in error["message"]
    assert not BalanceMutation.objects.exists()
    assert LegacyBalance.objects.get(user_id=holder).buying_power == Decimal("25")
    assert Transaction.objects.filter(kind__startswith="balance_").count() == 0

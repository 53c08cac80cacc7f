"""Idempotency-Key claims under refusals (issue 15, item 2): concurrent retries of the same
keys (threads, each with its own database connection) while the kill switch is flipped, or
while every attempt fails strictly, are each answered with the stored answer, 409 (in flight)
or the clean 503, never a 500; a key's mutation is applied exactly once, or not at all."""

import itertools
import json
import threading
import time
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client

from cutover.actors import Actor
from cutover.models import BalanceMutation, LegacyBalance, StrictFailure
from cutover.operators import api_client_issue
from cutover.phase_machine import kill_switch_set
from gateway.models import IdempotencyRecord, IdempotencyStatus
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set

pytestmark = pytest.mark.django_db(transaction=True)

OPERATOR = Actor("cli:test")
SENDERS = 8
CREDITS = {"retry-a": "1.10", "retry-b": "2.20", "retry-c": "3.30"}
CODES = {409: "idempotency_key_in_flight", 503: "unavailable"}


def _mutate(client: Client, user, token: str, key: str, direction: str, amount: str):
    response = client.post(
        f"/api/v1/users/{user}/balance-mutations",
        data=json.dumps(
            {"direction": direction, "amount": amount, "currency": "USDC", "reason": "retry"}
        ),
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
    )
    try:
        body = json.loads(response.content)
    except ValueError:
        body = {"not_json": response.content[:200].decode(errors="replace")}
    return response.status_code, body


def _traffic(user, token: str, requests: list[tuple], rounds: int, flips: int = 0) -> list:
    """SENDERS threads, each sending `rounds` of `requests` (key, direction, amount) in turn,
    all released at once; with `flips`, another thread flips the kill switch that many times
    meanwhile (released first). Every (key, status, body) answered."""
    answers: list = []
    start = threading.Barrier(SENDERS + (1 if flips else 0))

    def send() -> None:
        client = Client(raise_request_exception=False)  # a 500 is an answer, as in production
        start.wait()
        try:
            for key, direction, amount in itertools.islice(itertools.cycle(requests), rounds):
                answers.append((key, *_mutate(client, user, token, key, direction, amount)))
        finally:
            connection.close()

    def flip() -> None:
        start.wait()
        try:
            for number in range(flips):
                kill_switch_set(engaged=number % 2 == 1, actor=OPERATOR, reason="drill")
                time.sleep(0.02)
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(SENDERS)]
    if flips:
        threads.append(threading.Thread(target=flip))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def _refusals_are_clean(answers: list, applied: set[int]) -> None:
    wrong = [
        (key, status, body)
        for key, status, body in answers
        if not (status in applied or body.get("error", {}).get("code") == CODES.get(status))
    ]
    assert not wrong, wrong[:5]
    assert {status for _, status, _ in answers} >= {409, 503}  # the races were run


def test_retries_under_a_flipping_kill_switch_are_never_a_500_and_apply_once():
    phase_set("legacy", kill_switch=True)
    user = legacy_user("100")
    _, token = api_client_issue(name="retrier", scopes=["credit"], actor=OPERATOR)
    requests = [(key, "credit", amount) for key, amount in CREDITS.items()]

    # Each attempt refused by the kill switch releases its claim while the others retry it.
    answers = _traffic(user, token, requests, rounds=24)
    # Then the switch flips under the same traffic: each key is applied once, at whichever
    # release its retries meet first; the flips end with the switch on.
    answers += _traffic(user, token, requests, rounds=12, flips=6)
    kill_switch_set(engaged=False, actor=OPERATOR, reason="drill over")
    final = {key: _mutate(Client(), user, token, key, "credit", CREDITS[key]) for key in CREDITS}

    _refusals_are_clean(answers, applied={201})
    for key, (status, body) in final.items():
        assert status == 201 and body["amount"] == CREDITS[key]
        # every 201 a key got is its one stored answer
        assert all(b == body for k, s, b in answers if k == key and s == 201)
    assert BalanceMutation.objects.filter(user_id=user).count() == len(CREDITS)
    expected = Decimal("100") + sum(Decimal(amount) for amount in CREDITS.values())
    assert LegacyBalance.objects.get(user_id=user).buying_power == expected
    records = IdempotencyRecord.objects.all()
    assert {r.key for r in records} == set(CREDITS)
    assert {r.status for r in records} == {IdempotencyStatus.COMPLETED}


def test_retries_that_fail_strictly_are_503_or_409_and_leave_no_key_behind():
    """In strict, a debit the ledger refuses (it holds less than legacy) fails whole: every
    retry is refused cleanly, the key released each time, the failures recorded."""
    user = legacy_user("100")
    ledger_balance_set(user, "30")
    phase_set("strict")
    _, token = api_client_issue(name="strict-retrier", scopes=["debit"], actor=OPERATOR)

    debits = [("strict-a", "debit", "50"), ("strict-b", "debit", "60")]
    answers = _traffic(user, token, debits, rounds=16)

    _refusals_are_clean(answers, applied=set())
    assert not BalanceMutation.objects.exists()
    assert LegacyBalance.objects.get(user_id=user).buying_power == Decimal("100")
    assert not IdempotencyRecord.objects.exists()
    assert StrictFailure.objects.count() == sum(status == 503 for _, status, _ in answers)

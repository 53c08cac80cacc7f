"""The bank over HTTP (issue 15: the Jepsen-style run from outside, kept as a test): CLIENTS
clients against gunicorn send random credits and debits of a few users, each under an
Idempotency-Key of its own and sent again up to 3 times with that key (by any client, so some
copies run at once), and read balances, while an operator walks the phases (shadow, read_switch
at 100 %, strict, the rollback to legacy, again) and engages and releases the kill switch.
HTTP_BANK_OPERATIONS mutations (160 in the README's test command; scripts/soak asks 20,000).
Then: no 5xx but the kill switch's clean 503, every refusal our JSON error, every key answered
alike, one effect per key, each user's legacy balance (written in every phase walked) exactly
what was acknowledged, no balance below zero, and the ledger verifies."""

import json
import os
import random
import threading
import time
import uuid
from decimal import Decimal

import pytest
from django.db import connection

from cutover.actors import Actor
from cutover.models import BalanceMutation, LegacyBalance
from cutover.operators import api_client_issue
from cutover.phase_machine import kill_switch_set, phase_advance, phase_rollback
from ledger.selectors import ledger_integrity_checks
from tests.crash import Call, gunicorn_running
from tests.cutover.factories import ledger_balance_set, legacy_user
from tests.model import invariants

pytestmark = pytest.mark.django_db(transaction=True)

OPERATIONS = int(os.environ.get("HTTP_BANK_OPERATIONS", "160"))
CI_OPERATIONS = 160
CLIENTS = 16
USERS = 8
OPENING = Decimal(100)
RESENDS = 3  # at most, per key
OPERATOR = Actor("cli:operator")
MUTATION_ANSWERS = {201, 409, 422, 503}  # applied, in flight, refused, the kill switch


def final(call: Call) -> tuple[int, dict] | None:
    """A mutation's final answer: applied (201) or refused for want of funds (422)."""
    return next((answer for answer in call.answers if answer[0] in (201, 422)), None)


def operator_walks(stop: threading.Event, done: list[str]) -> None:
    """Forward through the phases, the kill switch on and off, back to legacy; again until
    told to stop (always ending in legacy with the switch off)."""
    try:
        while not stop.is_set():
            for target in ("shadow", "read_switch", "strict"):
                phase_advance(
                    to=target, actor=OPERATOR, force=True, reason="walked", read_percent=100
                )
                done.append(target)
                time.sleep(0.1)
            kill_switch_set(engaged=True, actor=OPERATOR, reason="incident drill")
            done.append("kill switch on")
            time.sleep(0.2)
            kill_switch_set(engaged=False, actor=OPERATOR, reason="drill over")
            done.append("kill switch off")
            phase_rollback(actor=OPERATOR, reason="rollback under load")
            done.append("legacy")
            time.sleep(0.1)
    finally:
        connection.close()


# The suite's per-test timeout holds CI's size; scripts/soak's 20,000 run as long as they take
# (about 15 mutations a second on 2 shared cores).
@pytest.mark.timeout(600 if OPERATIONS <= CI_OPERATIONS else 0)
def test_bank_over_http_through_phase_walks_and_the_kill_switch(tmp_path, record_property):
    users = [legacy_user(OPENING) for _ in range(USERS)]
    for user in users:
        ledger_balance_set(user, OPENING)
    _, token = api_client_issue(
        name="bank", scopes=["read", "credit", "debit"], actor=OPERATOR, reason="the bank"
    )
    authorization = {"Authorization": f"Bearer {token}"}
    mutations: list[Call] = []
    reads: list[Call] = []

    def mutation(rng: random.Random) -> Call:
        user = rng.choice(users)
        credit = rng.random() < 0.5
        amount = Decimal(rng.randint(1, 3000)) / 100
        body = {"direction": "credit" if credit else "debit", "amount": str(amount)}
        return Call(
            path=f"/api/v1/users/{user}/balance-mutations",
            headers={
                **authorization,
                "Idempotency-Key": uuid.uuid4().hex,
                "Content-Type": "application/json",
            },
            body=json.dumps({**body, "currency": "USDC", "reason": "bank"}).encode(),
            user=user,
            effect=amount if credit else -amount,
        )

    def client(index: int, port: int) -> None:
        rng = random.Random(index)
        for _ in range(OPERATIONS // CLIENTS):
            call = mutation(rng)
            mutations.append(call)
            call.send(port)
            for _ in range(rng.randint(0, RESENDS)):  # the same key again, this or another's
                again = rng.choice(mutations)
                if len(again.answers) + again.drops <= RESENDS:
                    again.send(port)
            if rng.random() < 0.3:
                user = rng.choice(users)
                read = Call(
                    path=f"/api/v1/users/{user}/balance",
                    headers=authorization,
                    body=None,
                    user=user,
                    effect=Decimal(0),
                    method="GET",
                )
                reads.append(read)
                read.send(port)

    stop, walked = threading.Event(), []
    with gunicorn_running({}, tmp_path / "gunicorn.log") as port:
        walker = threading.Thread(target=operator_walks, args=(stop, walked))
        walker.start()
        clients = [threading.Thread(target=client, args=(i, port)) for i in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        stop.set()
        walker.join()

        deadline = time.monotonic() + 120  # in legacy now: what was refused goes through
        while waiting := [call for call in mutations if final(call) is None]:
            assert time.monotonic() < deadline, [call.answers for call in waiting[:5]]
            for call in waiting:
                call.send(port)
            time.sleep(0.2)

    record_property("operations", len(mutations))
    record_property("requests", sum(len(c.answers) + c.drops for c in mutations + reads))
    record_property("phase_walk_steps", len(walked))
    assert {"strict", "kill switch on", "legacy"} <= set(walked)
    answers = [(status, body) for call in mutations for status, body in call.answers]
    assert {status for status, _ in answers} <= MUTATION_ANSWERS
    assert all("error" in body for status, body in answers if status >= 400)  # ours, as JSON
    unavailable = [body["error"]["code"] for status, body in answers if status == 503]
    assert set(unavailable) <= {"unavailable"}
    record_property("kill_switch_refusals", len(unavailable))
    assert not any(call.drops for call in mutations + reads)
    assert all(call.answers[0][0] == 200 for call in reads)
    assert all(Decimal(call.answers[0][1]["balance"]) >= 0 for call in reads)

    # Every key answered alike (its first answer stored and replayed); one effect per key.
    for call in mutations:
        settled = {json.dumps(a, sort_keys=True) for a in call.answers if a[0] in (201, 422)}
        assert len(settled) == 1, call.answers
    applied = [call for call in mutations if final(call)[0] == 201]
    assert BalanceMutation.objects.filter(reference__startswith="api:").count() == len(applied)
    expected = dict.fromkeys(users, OPENING)
    for call in applied:
        expected[call.user] += call.effect
    legacy = dict(
        LegacyBalance.objects.filter(user_id__in=users).values_list("user_id", "buying_power")
    )
    assert legacy == expected
    assert invariants.balances_non_negative() == []
    assert all(check.ok for check in ledger_integrity_checks())

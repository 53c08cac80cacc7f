"""Signing material we do not hold (a Circle key id, an SNS certificate URL) is fetched within
one budget shared by every worker process (counted in PostgreSQL): at most
CIRCLE_KEY_FETCHES_PER_MINUTE fetches per CIRCLE_KEY_FETCH_WINDOW. Over it, nothing is fetched
and the delivery is answered as if Circle (or SNS) were unreachable: 503, which a redelivery
retries. A key we hold never counts. An SNS certificate URL that failed for good (4xx, not a
PEM certificate, not RSA) is answered from the database for CIRCLE_UNKNOWN_KEY_TTL.

Found from outside: a fresh random X-Circle-Key-Id on every forged delivery made us call Circle
with our API key each time (its rate limit is our withdrawals' and polls'), and a made-up
certificate path on an SNS host was fetched on every delivery. Over real HTTP: the live
webhook, the Circle sandbox (counting the key ids asked for) and a stand-in SNS host
(counting its GETs)."""

import logging
import re
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from django.test import override_settings
from django.utils import timezone

from cutover.models import BalanceMutation
from onchain import signatures
from onchain.models import (
    CircleNotification,
    CirclePublicKey,
    CircleUnknownKey,
    DepositAddress,
    SigningFetch,
    SnsCertificateFailure,
)
from onchain.sandbox import CircleSandbox
from onchain.sandbox_sns import self_signed_certificate
from onchain.signatures import FETCH_BUDGET_SPENT
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import balances
from tests.onchain.test_circle_sns import mint_deposit
from tests.stand_in import StandIn

pytestmark = pytest.mark.django_db(transaction=True)

ADDRESS = "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"


@pytest.fixture
def webhook(sandbox):
    return sandbox.subscriber


@pytest.fixture
def budget(settings):
    settings.CIRCLE_KEY_FETCHES_PER_MINUTE = 10
    settings.CIRCLE_KEY_FETCH_WINDOW = timedelta(minutes=1)
    return settings


@pytest.fixture
def depositor():
    user_id = legacy_user("0")
    ledger_balance_set(user_id, "0")
    DepositAddress.objects.create(address=ADDRESS, chain="ETH", user_id=user_id)
    return user_id


def deposit(transfer_id: str | None = None) -> bytes:
    return CircleSandbox.transfer_notification(
        notification_type="custody.transfer",
        transfer_id=transfer_id or str(uuid.uuid4()),
        address=ADDRESS,
        amount="25.00",
    )


def forged(sandbox, webhook) -> tuple[int, dict]:
    """A deposit that claims to be signed by a key id nobody has seen: a fresh UUID."""
    return sandbox.deliver(webhook, deposit(), key_id=str(uuid.uuid4()))


def codes(answers) -> Counter:
    return Counter((status, answer["error"]["code"]) for status, answer in answers)


def nothing_credited(depositor):
    assert not CircleNotification.objects.exists()
    assert not BalanceMutation.objects.exists()
    assert balances(depositor) == (0, 0)


def test_fresh_key_ids_are_fetched_within_the_budget_the_rest_503(
    sandbox, webhook, budget, depositor, caplog
):
    phase_set("shadow")
    caplog.set_level(logging.WARNING, logger="onchain.signatures")
    answers = [forged(sandbox, webhook) for _ in range(25)]
    assert len(sandbox.key_requests) == 10
    # Circle was asked for ten: it does not know them (remembered); the other fifteen were
    # never asked for, answered as Circle unreachable (Circle's redelivery would retry).
    assert codes(answers) == {(400, "unknown_key"): 10, (503, "circle_unavailable"): 15}
    refused = [answer["error"]["message"] for status, answer in answers if status == 503]
    assert all(FETCH_BUDGET_SPENT in message for message in refused)
    assert CircleUnknownKey.objects.count() == 10
    assert SigningFetch.objects.count() == 10
    nothing_credited(depositor)
    warnings = [r.getMessage() for r in caplog.records if r.name == "onchain.signatures"]
    assert len(warnings) == 15
    assert all("CIRCLE_KEY_FETCHES_PER_MINUTE" in warning for warning in warnings)

    # A key id Circle said it does not know is answered from the table, not from the budget.
    unknown = CircleUnknownKey.objects.first().key_id
    status, answer = sandbox.deliver(webhook, deposit(), key_id=unknown)
    assert (status, answer["error"]["code"]) == (400, "unknown_key")
    assert len(sandbox.key_requests) == 10


def test_a_key_we_hold_verifies_while_the_budget_is_spent(sandbox, webhook, budget, depositor):
    phase_set("shadow")
    status, answer = sandbox.deliver(webhook, deposit("t-1"))  # Circle's key, fetched once
    assert (status, answer["status"]) == (200, "processed")
    answers = [forged(sandbox, webhook) for _ in range(25)]
    assert codes(answers) == {(400, "unknown_key"): 9, (503, "circle_unavailable"): 16}
    assert len(sandbox.key_requests) == 10

    status, answer = sandbox.deliver(webhook, deposit("t-2"))  # held by this process
    assert (status, answer["status"]) == (200, "processed")
    signatures._KEYS.pop(sandbox.key_id)  # another worker process: held by the table only
    status, answer = sandbox.deliver(webhook, deposit("t-3"))
    assert (status, answer["status"]) == (200, "processed")
    assert len(sandbox.key_requests) == 10  # neither asked Circle nor counted
    assert SigningFetch.objects.count() == 10
    assert CirclePublicKey.objects.get().key_id == sandbox.key_id
    assert BalanceMutation.objects.count() == 3
    assert balances(depositor) == (75, 75)


def test_concurrent_forged_deliveries_never_exceed_the_budget(sandbox, webhook, budget, depositor):
    phase_set("shadow")
    start = threading.Barrier(20)

    def post(_):
        start.wait()
        return forged(sandbox, webhook)

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(post, range(20)))
    fetched = len(sandbox.key_requests)
    assert 0 < fetched <= 10
    assert codes(answers) == {
        (400, "unknown_key"): fetched,
        (503, "circle_unavailable"): 20 - fetched,
    }
    assert SigningFetch.objects.count() == fetched
    nothing_credited(depositor)


def test_the_budget_frees_when_its_window_has_passed(sandbox, webhook, depositor):
    phase_set("shadow")
    with override_settings(
        CIRCLE_KEY_FETCHES_PER_MINUTE=3, CIRCLE_KEY_FETCH_WINDOW=timedelta(seconds=1)
    ):
        answers = [forged(sandbox, webhook) for _ in range(4)]
        assert codes(answers) == {(400, "unknown_key"): 3, (503, "circle_unavailable"): 1}
        time.sleep(1.2)
        status, answer = forged(sandbox, webhook)
        assert (status, answer["error"]["code"]) == (400, "unknown_key")
        assert len(sandbox.key_requests) == 4
        # The fetches that left the window were deleted as the new one came.
        assert SigningFetch.objects.count() == 1
    nothing_credited(depositor)


# Amazon SNS's certificates -----------------------------------------------------------------


FAILURES = {
    "/SimpleNotificationService-gone.pem": (404, b"<Error>NoSuchKey</Error>"),
    "/SimpleNotificationService-forbidden.pem": (403, b"<Error>AccessDenied</Error>"),
    "/SimpleNotificationService-text.pem": (200, b"not a certificate"),
    "/SimpleNotificationService-ec.pem": (
        200,
        self_signed_certificate(ec.generate_private_key(ec.SECP256R1())),
    ),
    "/SimpleNotificationService-busy.pem": (503, b"Slow Down"),
}


@pytest.fixture
def sns_host(sandbox, settings):
    """The stand-in SNS host and the sandbox (SNS's genuine certificate), both SNS's hosts."""
    # A stand-in SNS host whose certificate URLs have gone wrong.
    with StandIn(lambda method, path: FAILURES.get(path, (404, b"Not Found"))) as host:
        ports = f"({sandbox.server.server_address[1]}|{host.server_address[1]})"
        settings.CIRCLE_SNS_URL_PATTERN = re.compile(rf"http://127\.0\.0\.1:{ports}")
        yield host


def sns_deposit(sandbox, certificate_url: str | None = None) -> dict:
    envelope = sandbox.sns_envelope(mint_deposit(str(uuid.uuid4()), "25.00", ADDRESS))
    if certificate_url is not None:
        envelope["SigningCertURL"] = certificate_url
    return envelope


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/SimpleNotificationService-gone.pem", 503, "sns_unavailable"),
        ("/SimpleNotificationService-forbidden.pem", 503, "sns_unavailable"),
        ("/SimpleNotificationService-text.pem", 403, "sns_rejected"),
        ("/SimpleNotificationService-ec.pem", 403, "sns_rejected"),
    ],
)
def test_a_certificate_url_that_failed_is_fetched_once_within_the_ttl(
    sandbox, sns_host, webhook, budget, depositor, path, status, code
):
    phase_set("shadow")
    budget.CIRCLE_UNKNOWN_KEY_TTL = timedelta(minutes=5)
    url = sns_host.base_url + path
    first = sandbox.deliver_sns(webhook, sns_deposit(sandbox, url))
    again = sandbox.deliver_sns(webhook, sns_deposit(sandbox, url))
    assert (first[0], first[1]["error"]["code"]) == (status, code)
    assert again == first  # answered as the first was, from the database
    assert sns_host.asked == [path]
    remembered = SnsCertificateFailure.objects.get()
    assert remembered.url == url
    assert SigningFetch.objects.count() == 1
    nothing_credited(depositor)

    # Past the TTL it is fetched again (SNS may serve it by now), and remembered afresh.
    SnsCertificateFailure.objects.update(checked_at=timezone.now() - timedelta(minutes=6))
    assert sandbox.deliver_sns(webhook, sns_deposit(sandbox, url)) == first
    assert sns_host.asked == [path, path]
    assert SnsCertificateFailure.objects.get().checked_at > remembered.checked_at


def test_a_certificate_host_that_is_down_is_not_remembered(sandbox, sns_host, webhook, budget):
    url = sns_host.base_url + "/SimpleNotificationService-busy.pem"
    for _ in range(2):
        status, answer = sandbox.deliver_sns(webhook, sns_deposit(sandbox, url))
        assert (status, answer["error"]["code"]) == (503, "sns_unavailable")
    assert len(sns_host.asked) == 2
    assert not SnsCertificateFailure.objects.exists()


def test_new_certificate_urls_count_against_the_same_budget(
    sandbox, sns_host, webhook, budget, depositor
):
    phase_set("shadow")
    budget.CIRCLE_KEY_FETCHES_PER_MINUTE = 3
    gone = sns_host.base_url + "/SimpleNotificationService-gone.pem"
    assert sandbox.deliver_sns(webhook, sns_deposit(sandbox, gone))[0] == 503
    assert [forged(sandbox, webhook)[0] for _ in range(2)] == [400, 400]  # the budget spent

    made_up = sns_host.base_url + f"/SimpleNotificationService-{uuid.uuid4().hex}.pem"
    status, answer = sandbox.deliver_sns(webhook, sns_deposit(sandbox, made_up))
    assert (status, answer["error"]["code"]) == (503, "sns_unavailable")
    assert FETCH_BUDGET_SPENT in answer["error"]["message"]
    status, answer = sandbox.deliver_sns(webhook, sns_deposit(sandbox, gone))  # remembered
    assert (status, answer["error"]["code"]) == (503, "sns_unavailable")
    assert FETCH_BUDGET_SPENT not in answer["error"]["message"]
    assert sns_host.asked == ["/SimpleNotificationService-gone.pem"]
    # SNS's genuine certificate is not held yet either: it waits for the budget too.
    status, _ = sandbox.deliver_sns(webhook, sns_deposit(sandbox))
    assert status == 503 and sandbox.sns_certificate_fetches == 0
    nothing_credited(depositor)

    SigningFetch.objects.all().delete()  # the window has passed
    status, answer = sandbox.deliver_sns(webhook, sns_deposit(sandbox))  # SNS redelivers
    assert (status, answer["status"]) == (200, "processed")
    assert sandbox.sns_certificate_fetches == 1
    assert balances(depositor) == (25, 25)

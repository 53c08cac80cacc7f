"""Issue 11, item 6: a key id Circle does not know is remembered (in the database, so every
worker process knows it) for CIRCLE_UNKNOWN_KEY_TTL: deliveries naming it are refused without
asking Circle again; only Circle's 404 is remembered, never a failure to reach it. Against the
Circle sandbox (counting its publicKey requests) and the webhook over real HTTP."""

import base64
import json
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.utils import timezone

from onchain.models import CircleNotification, CirclePublicKey, CircleUnknownKey
from onchain.sandbox import CircleSandbox
from tests.stand_in import StandIn

pytestmark = pytest.mark.django_db(transaction=True)

UNKNOWN = "8d5c1a32-5f33-4a0c-a5b2-1f0c8c0f0000"


@pytest.fixture
def sandbox(settings):
    with CircleSandbox() as running:
        settings.CIRCLE_API_BASE_URL = running.base_url
        settings.CIRCLE_API_KEY = "sandbox-key"
        settings.CIRCLE_HTTP_TIMEOUT = 2.0
        yield running


@pytest.fixture
def webhook(live_server):
    return f"{live_server.url}/webhooks/circle/transfers"


def deliver(sandbox, webhook, key_id: str) -> tuple[int, dict]:
    body = CircleSandbox.notification("webhooks.test", {})
    return sandbox.deliver(webhook, body, key_id=key_id)


def test_an_unknown_key_id_is_asked_for_once_within_the_ttl(sandbox, webhook, settings):
    settings.CIRCLE_UNKNOWN_KEY_TTL = timedelta(minutes=5)
    for _ in range(3):
        status, answer = deliver(sandbox, webhook, UNKNOWN)
        assert (status, answer["error"]["code"]) == (400, "unknown_key")
    assert sandbox.key_requests == [UNKNOWN]
    remembered = CircleUnknownKey.objects.get()
    assert remembered.key_id == UNKNOWN

    # Past the TTL Circle is asked again (it may have the key by now), and the memory renewed.
    CircleUnknownKey.objects.update(checked_at=timezone.now() - timedelta(minutes=6))
    assert deliver(sandbox, webhook, UNKNOWN)[0] == 400
    assert sandbox.key_requests == [UNKNOWN, UNKNOWN]
    assert CircleUnknownKey.objects.get().checked_at > remembered.checked_at

    # Circle's own key is unaffected.
    assert deliver(sandbox, webhook, sandbox.key_id)[0] == 200
    assert sandbox.key_requests == [UNKNOWN, UNKNOWN, sandbox.key_id]
    assert not CircleNotification.objects.exclude(status="processed").exists()


def test_expired_unknown_key_ids_are_cleared_as_new_ones_come(sandbox, webhook, settings):
    settings.CIRCLE_UNKNOWN_KEY_TTL = timedelta(seconds=30)
    CircleUnknownKey.objects.create(
        key_id="stale", checked_at=timezone.now() - timedelta(minutes=1)
    )
    CircleUnknownKey.objects.create(key_id="fresh", checked_at=timezone.now())
    assert deliver(sandbox, webhook, UNKNOWN)[0] == 400
    assert set(CircleUnknownKey.objects.values_list("key_id", flat=True)) == {"fresh", UNKNOWN}


def test_only_circles_not_found_is_remembered(sandbox, webhook, settings):
    settings.CIRCLE_API_BASE_URL = "http://127.0.0.1:9"  # nothing listens: Circle unreachable
    status, answer = deliver(sandbox, webhook, UNKNOWN)
    assert (status, answer["error"]["code"]) == (503, "circle_unavailable")
    assert not CircleUnknownKey.objects.exists()

    settings.CIRCLE_API_BASE_URL = sandbox.base_url
    assert deliver(sandbox, webhook, UNKNOWN)[0] == 400
    assert sandbox.key_requests == [UNKNOWN]


def key_answers(answers: dict[str, dict]) -> StandIn:
    """A stand-in for Circle's publicKey endpoint whose answers have gone wrong: `answers` by
    key id, each Circle's `data` object."""
    return StandIn(
        lambda method, path: (200, json.dumps({"data": answers[path.rsplit("/", 1)[-1]]}).encode())
    )


def _der_b64(public_key) -> str:
    der = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


RSA_KEY = _der_b64(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
MALFORMED = {
    "not-base64": {"algorithm": "ECDSA_SHA_256", "publicKey": "not base64!"},
    "not-der": {"algorithm": "ECDSA_SHA_256", "publicKey": base64.b64encode(b"xyz").decode()},
    "rsa-as-ecdsa": {"algorithm": "ECDSA_SHA_256", "publicKey": RSA_KEY},
    "no-key": {"algorithm": "ECDSA_SHA_256", "publicKey": None},
    "no-algorithm": {"algorithm": None, "publicKey": RSA_KEY},
    "long-algorithm": {"algorithm": "E" * 33, "publicKey": RSA_KEY},
}


@pytest.mark.parametrize("key_id", sorted(MALFORMED))
def test_a_malformed_key_answer_is_503_and_kept_nowhere(sandbox, webhook, settings, key_id):
    """Found from outside: Circle's answer was kept before it was checked, and every later
    delivery under that key id was a 500, retried by Circle forever. Now 503 (Circle's
    redelivery asks again), nothing kept, the key asked for again next time."""
    with key_answers(MALFORMED) as circle:
        settings.CIRCLE_API_BASE_URL = circle.base_url
        for _ in range(2):
            status, answer = deliver(sandbox, webhook, key_id)
            assert (status, answer["error"]["code"]) == (503, "circle_unavailable")
        assert [path.rsplit("/", 1)[-1] for path in circle.asked] == [key_id, key_id]
    assert not CirclePublicKey.objects.exists()
    assert not CircleNotification.objects.exists()


def test_a_malformed_key_kept_before_is_dropped_and_fetched_again(sandbox, webhook):
    CirclePublicKey.objects.create(
        key_id=sandbox.key_id, algorithm="ECDSA_SHA_256", public_key="not base64!"
    )
    status, answer = deliver(sandbox, webhook, sandbox.key_id)
    assert (status, answer["error"]["code"]) == (503, "circle_unavailable")
    assert not CirclePublicKey.objects.exists()
    assert deliver(sandbox, webhook, sandbox.key_id)[0] == 200  # Circle's real key, fetched
    assert CirclePublicKey.objects.get().public_key == sandbox.public_key_b64

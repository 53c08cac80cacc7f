"""Issue 11, item 6: a key id Circle does not know is remembered (in the database, so every
worker process knows it) for CIRCLE_UNKNOWN_KEY_TTL: deliveries naming it are refused without
asking Circle again; only Circle's 404 is remembered, never a failure to reach it. Against the
Circle sandbox (counting its publicKey requests) and the webhook over real HTTP."""

from datetime import timedelta

import pytest
from django.utils import timezone

from onchain.models import CircleNotification, CircleUnknownKey
from onchain.sandbox import CircleSandbox

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

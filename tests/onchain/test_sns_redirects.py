"""Only SNS's hosts are fetched from, redirects included: a certificate URL or a confirmation's
SubscribeURL on a host CIRCLE_SNS_URL_PATTERN allows, answering a redirect to a host it does
not, is a failed fetch (503, SNS redelivers), and the other host is never asked.

Found from outside: the fetch followed redirects, so an open redirect on an allowed host (or a
too broad pattern) had a certificate of anyone's accepted as SNS's. Over real HTTP: the live
webhook, the Circle sandbox as SNS (its key signs, its certificate is genuine), a stand-in SNS
host that redirects, and a stand-in host off the pattern that would serve the certificate (or
confirm) and records every request."""

import re
import uuid

import pytest

from cutover.actors import Actor
from cutover.models import BalanceMutation
from onchain import sns as sns_module
from onchain.addresses import deposit_address_add
from onchain.models import CircleNotification
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.onchain.test_circle_sns import ADDRESS, WEST, mint_deposit, nothing_happened
from tests.stand_in import StandIn

pytestmark = pytest.mark.django_db(transaction=True)

REDIRECTS = [301, 302, 303, 307, 308]
CERTIFICATE_PATH = "/SimpleNotificationService-moved.pem"


@pytest.fixture
def webhook(sandbox):
    return sandbox.subscriber


@pytest.fixture
def depositor():
    user_id = legacy_user("0")
    ledger_balance_set(user_id, "0")
    deposit_address_add(address=ADDRESS, chain="ETH", user_id=user_id, actor=Actor("operator"))
    return user_id


@pytest.fixture
def elsewhere(sandbox):
    """A host off CIRCLE_SNS_URL_PATTERN: it serves the sandbox's genuine certificate at any
    .pem path and confirms any subscription (as a host an attacker runs would)."""
    confirmed = b"<ConfirmSubscriptionResponse></ConfirmSubscriptionResponse>"

    def answer(method, path):
        return (200, sandbox.sns_signer[1] if path.endswith(".pem") else confirmed)

    with StandIn(answer) as host:
        yield host


@pytest.fixture
def redirecting(sandbox, elsewhere, settings, request):
    """A stand-in SNS host (on the pattern, with the sandbox) answering every GET with the
    redirect `request.param` to the same path on `elsewhere`."""
    status = request.param
    with StandIn(lambda method, path: (status, b"")) as host:
        plain = host.RequestHandlerClass

        class Redirect(plain):
            def send_response(self, code, message=None):
                super().send_response(code, message)
                self.send_header("Location", elsewhere.base_url + self.path)

        host.RequestHandlerClass = Redirect
        ports = f"({sandbox.server.server_address[1]}|{host.server_address[1]})"
        settings.CIRCLE_SNS_URL_PATTERN = re.compile(rf"http://127\.0\.0\.1:{ports}")
        assert not settings.CIRCLE_SNS_URL_PATTERN.fullmatch(elsewhere.base_url)
        yield host


@pytest.mark.parametrize("redirecting", REDIRECTS, indirect=True)
def test_a_certificate_url_that_redirects_off_sns_hosts_is_not_followed(
    sandbox, webhook, depositor, redirecting, elsewhere
):
    phase_set("shadow")
    url = redirecting.base_url + CERTIFICATE_PATH
    envelope = sandbox.sns_envelope(mint_deposit(str(uuid.uuid4()), "25.50", ADDRESS))
    envelope["SigningCertURL"] = url
    status, answer = sandbox.deliver_sns(webhook, envelope)
    assert status == 503, answer  # the fetch failed: SNS redelivers
    assert answer["error"]["code"] == "sns_unavailable"
    assert redirecting.asked == [CERTIFICATE_PATH]
    assert elsewhere.asked == []  # the certificate off SNS's hosts was never fetched
    assert url not in sns_module._CERTIFICATE_KEYS
    nothing_happened(depositor)  # no notification row, nothing credited
    # A URL that redirects serves no certificate: remembered (CIRCLE_UNKNOWN_KEY_TTL), not
    # fetched again for every delivery naming it.
    envelope = sandbox.sns_envelope(mint_deposit(str(uuid.uuid4()), "25.50", ADDRESS))
    envelope["SigningCertURL"] = url
    status, answer = sandbox.deliver_sns(webhook, envelope)
    assert status == 503 and redirecting.asked == [CERTIFICATE_PATH]
    nothing_happened(depositor)


@pytest.mark.parametrize("redirecting", REDIRECTS, indirect=True)
def test_a_subscribe_url_that_redirects_off_sns_hosts_is_not_confirmed(
    sandbox, webhook, redirecting, elsewhere
):
    confirmation = sandbox.sns_confirmation(WEST)
    path = f"/?Action=ConfirmSubscription&TopicArn={WEST}&Token={confirmation['Token']}"
    confirmation["SubscribeURL"] = redirecting.base_url + path
    sandbox.sns_sign(confirmation)  # SNS's signature is genuine, its certificate the sandbox's
    status, answer = sandbox.deliver_sns(webhook, confirmation)
    assert status == 503, answer  # the fetch failed: SNS redelivers
    assert answer["error"]["code"] == "sns_unavailable"
    assert redirecting.asked == [path]
    assert elsewhere.asked == []  # the confirmation off SNS's hosts was never visited
    assert sandbox.sns_confirmed == []
    assert not CircleNotification.objects.exists()
    assert not BalanceMutation.objects.exists()

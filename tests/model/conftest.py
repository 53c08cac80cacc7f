"""The money model's fixture: the real product pointed at both providers' sandboxes."""

from datetime import timedelta

import pytest

from onchain.sandbox import CircleSandbox
from tests.model.machine import Context
from tests.treasury.factories import RECIPIENTS
from treasury.sandbox import DueSandbox

DUE_KEY, DUE_SECRET = "model-due-key", "model-due-secret"


@pytest.fixture
def product(settings, live_server):
    """The sandboxes started once per test (reset per example by the machine), and the
    settings that point the product at them: short HTTP timeouts, no backoff waits, few
    attempts, so that timeouts and dead rows happen within a step."""
    settings.CIRCLE_API_KEY = "model-circle-key"
    settings.CIRCLE_WEBHOOK_SECRET = ""
    settings.CIRCLE_HTTP_TIMEOUT = 0.25
    settings.ONCHAIN_WITHDRAWAL_BACKOFF = timedelta(0)
    settings.ONCHAIN_WITHDRAWAL_MAX_ATTEMPTS = 2
    settings.DUE_API_KEY, settings.DUE_API_SECRET = DUE_KEY, DUE_SECRET
    settings.DUE_RECIPIENTS = RECIPIENTS
    settings.DUE_HTTP_TIMEOUT = 0.25
    settings.DUE_HTTP_ATTEMPTS = 1
    settings.TREASURY_SUBMIT_BACKOFF = timedelta(0)
    settings.TREASURY_SUBMIT_MAX_ATTEMPTS = 2
    subscriber = f"{live_server.url}/webhooks/circle/transfers"
    with (
        CircleSandbox(subscriber=subscriber) as circle,
        DueSandbox(api_key=DUE_KEY, api_secret=DUE_SECRET, settle=None) as due,
    ):
        settings.CIRCLE_API_BASE_URL = circle.base_url
        settings.DUE_API_BASE_URL = due.base_url
        Context.circle, Context.due = circle, due
        yield
        Context.circle = Context.due = None

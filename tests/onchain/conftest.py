"""The on-chain tests' fixtures: a user with USDC in both stores, and an API token that may
withdraw. (The Circle sandbox over HTTP is in tests/conftest.py: custody's tests use it too.)"""

import uuid

import pytest

from cutover.actors import Actor
from cutover.operators import api_client_issue
from tests.cutover.factories import ledger_balance_set, legacy_user
from tests.onchain.factories import buffer_fund


@pytest.fixture
def user():
    """A user with 100 USDC in both stores, and a USDC buffer of 1000 in the ledger."""
    user_id = legacy_user("100")
    ledger_balance_set(user_id, "100")
    buffer_fund("1000")
    return user_id


@pytest.fixture
def api_token(user):
    return api_client_issue(
        name=f"wallet-app-{uuid.uuid4().hex[:6]}", scopes=["withdraw"], actor=Actor("test")
    )[1]

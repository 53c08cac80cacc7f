"""What the treasury tests share besides fixtures: the Due sandbox's credentials, an operator,
funded buffers and their balances, and the environment of a real Celery worker and beat."""

import uuid
from decimal import Decimal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cutover.actors import Actor
from ledger.models import Account
from ledger.services import Leg, transaction_post
from treasury.sandbox import DueSandbox
from treasury.selectors import buffer_status_list

KEY, SECRET = "due-key", "due-secret"
# Where the sandbox's transfers pay: our bank account (USD) and our wallet (USDC) at Due.
RECIPIENTS = {"USD": "rcp_sandbox_bank", "USDC": "wlt_sandbox_wallet"}
RECIPIENT_ENVIRONMENT = {f"DUE_RECIPIENT_{c}": recipient for c, recipient in RECIPIENTS.items()}
OPS = Actor(name="cli:ops")


def webhook_public_key() -> str:
    """A webhook endpoint's public key as Due answers it (PEM Ed25519), of a fresh key pair."""
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def fund(code: str, amount: str) -> None:
    account = Account.objects.get(code=code)
    equity = Account.objects.get(code=f"opening_balance_equity_{account.currency_id.lower()}")
    transaction_post(
        namespace="test",
        reference_id=f"fund:{uuid.uuid4()}",
        kind="opening_balance",
        legs=[Leg.debit(account, amount), Leg.credit(equity, amount)],
    )


def celery_environment(sandbox: DueSandbox, broker: str) -> dict[str, str]:
    """What a real Celery worker and beat need to run the treasury every second against
    `sandbox` over `broker`."""
    return {
        "CELERY_BROKER_URL": broker,
        "ENABLE_TREASURY_SCHEDULER": "true",
        "TREASURY_SCHEDULER_INTERVAL": "1s",
        "TREASURY_MONITOR_INTERVAL": "1s",
        "DUE_API_BASE_URL": sandbox.base_url,
        "DUE_API_KEY": KEY,
        "DUE_API_SECRET": SECRET,
        **RECIPIENT_ENVIRONMENT,
        "CUTOVER_RECONCILE_INTERVAL": "1h",
    }


def buffers() -> dict[str, Decimal]:
    return {reading.currency: reading.balance for reading in buffer_status_list()}

"""What the treasury tests share besides fixtures: the Due sandbox's credentials, an operator,
funded buffers and their balances, the environment of a real Celery worker and beat, and the
rows and Due objects the Due tests arrange: a job, a transfer at Due, a signed webhook."""

import json
import uuid
from decimal import Decimal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cutover.actors import Actor
from ledger.models import Account
from ledger.services import Leg, transaction_post
from treasury.models import ConversionJob, ConversionProvider
from treasury.sandbox import OPEN, DueSandbox
from treasury.selectors import buffer_status_list
from treasury.settlement import job_settle

KEY, SECRET = "due-key", "due-secret"
# Where the sandbox's transfers pay: our bank account (USD) and our wallet (USDC) at Due.
RECIPIENTS = {"USD": "rcp_sandbox_bank", "USDC": "wlt_sandbox_wallet"}
RECIPIENT_ENVIRONMENT = {f"DUE_RECIPIENT_{c}": recipient for c, recipient in RECIPIENTS.items()}
OPS = Actor(name="cli:ops")
RAILS = {"USD": "ach", "USDC": "ethereum"}
DUE_WEBHOOK_URL = "/webhooks/due/conversions"


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


def spend(code: str, amount) -> None:
    """`amount` taken out of the system account `code` to opening-balance equity: money of a
    buffer spent since (withdrawn, say)."""
    account = Account.objects.get(code=code)
    equity = Account.objects.get(code=f"opening_balance_equity_{account.currency_id.lower()}")
    transaction_post(
        namespace="test",
        reference_id=f"spend:{uuid.uuid4()}",
        kind="opening_balance",
        legs=[Leg.debit(equity, amount), Leg.credit(account, amount)],
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


def job_make(
    *,
    reference: str | None,
    source: str = "USD",
    amount: str = "19000",
    status: str = "submitted",
    attempts: int = 1,
) -> ConversionJob:
    """A conversion job of `amount` from `source` (to the other currency) whose transfer at
    Due is `reference`, as the cycle and the submission leave it."""
    target = "USDC" if source == "USD" else "USD"
    return ConversionJob.objects.create(
        idempotency_key=uuid.uuid4(),
        buffer_currency=target,
        source_currency=source,
        source_amount=Decimal(amount),
        target_currency=target,
        provider=ConversionProvider.objects.get(code="due"),
        provider_reference=reference,
        status=status,
        attempts=attempts,
        created_by="test",
    )


def due_transfer(
    *,
    transfer_id: str,
    source: str,
    amount: str,
    status: str = OPEN,
    created: str = "2026-12-03T12:00:00Z",
    recipient: str | None = None,
) -> dict:
    """A transfer object as Due documents it (as the sandbox makes it: 1:1, no fee) from
    `source` to the other currency; `recipient` is its destination's id."""
    target = "USDC" if source == "USD" else "USD"
    side = {"amount": amount, "fee": "0"}
    destination = {**side, "currency": target, "rail": RAILS[target]}
    if recipient is not None:
        destination["id"] = recipient
    return {
        "id": transfer_id,
        "ownerId": "acct_sandbox",
        "status": status,
        "source": {**side, "currency": source, "rail": RAILS[source]},
        "destination": destination,
        "fxRate": 1,
        "createdAt": created,
        "expiresAt": created,
    }


def job_transfer(job: ConversionJob, *, transfer_id: str, **fields) -> dict:
    """`job`'s transfer at Due (see due_transfer for `fields`)."""
    return due_transfer(
        transfer_id=transfer_id,
        source=job.source_currency,
        amount=str(job.source_amount),
        **fields,
    )


def job_told(
    due: DueSandbox, job: ConversionJob, told: list[tuple[str, str]], **transfer_fields
) -> ConversionJob:
    """`job` settled with each of Due's answers `told`, (status, Due's status) in turn (the
    first a completion posts it, a disputed one disputes it), its transfer at Due left as the
    last of them said (`transfer_fields` on it: a destination amount other than 1:1)."""
    transfer = {**job_transfer(job, transfer_id=job.provider_reference), **transfer_fields}
    for status, due_status in told:
        job_settle(
            job_id=job.pk, conversion={**transfer, "status": status, "due_status": due_status}
        )
    with due.lock:
        due.conversions[job.provider_reference] = {**transfer, "status": told[-1][1]}
    job.refresh_from_db()
    return job


def webhook_delivered(client, due: DueSandbox, event: dict):
    """`event` posted to our webhook as Due sends it: these bytes, signed by the sandbox."""
    body = json.dumps(event).encode()
    return client.post(
        DUE_WEBHOOK_URL,
        data=body,
        content_type="application/json",
        headers={"X-Webhook-Signature": due.sign(body)},
    )

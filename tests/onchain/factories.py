"""What the on-chain tests share besides fixtures: a funded USDC buffer, withdrawals requested
directly or over the API, and reads of balances, transfers and the ledger's integrity."""

import json
import uuid
from decimal import Decimal

from cutover.models import LegacyBalance
from ledger.models import Account
from ledger.selectors import ledger_integrity_checks, system_balance
from ledger.services import Leg, transaction_post
from onchain.models import Withdrawal
from onchain.withdrawals import withdrawal_request


def buffer_fund(amount: str) -> None:
    transaction_post(
        namespace="test",
        reference_id=f"buffer:{uuid.uuid4()}",
        kind="opening_balance",
        legs=[
            Leg.debit(Account.objects.get(code="usdc_buffer"), amount),
            Leg.credit(Account.objects.get(code="opening_balance_equity_usdc"), amount),
        ],
    )


def balances(user_id):
    legacy = LegacyBalance.objects.get(user_id=user_id).buying_power
    ledger = Account.objects.get(user_id=user_id, account_type="usdc_balance").balance
    return legacy, ledger


def system(code: str) -> Decimal:
    """A system account's balance, summed over its shards (the USDC buffer's deposits)."""
    return system_balance(code=code)


# A withdrawal's destination: an EVM address as Circle takes one (withdrawals are validated).
DESTINATION = "0xde57de57de57de57de57de57de57de57de57de57"


def withdraw(user_id, amount="30", address=DESTINATION, **kwargs) -> Withdrawal:
    return withdrawal_request(
        user_id=user_id, amount=amount, address=address, chain="ETH", **kwargs
    )


def outbound(sandbox) -> list[dict]:
    return [t for t in sandbox.transfers.values() if t["source"]["type"] == "wallet"]


def integrity_ok() -> bool:
    return all(check.ok for check in ledger_integrity_checks())


def withdrawal_transfer(withdrawal: Withdrawal) -> str:
    withdrawal.refresh_from_db()
    return withdrawal.circle_transfer_id


def post_withdrawal(client, user_id, token, body, key="w-1"):
    response = client.post(
        f"/api/v1/users/{user_id}/withdrawals",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
    )
    return response.status_code, response.json()

"""What a Circle notification says about a transfer, whichever documented shape it came in
(tests/onchain/fixtures/circle/SOURCES.md has the addresses they were copied from):

- Circle Mint v2, `custody.transfer`: the v2 envelope, the Mint transfer object in
  `notification` (`status` pending | complete | failed).
- Circle Mint v1, `transfers` (delivered by Amazon SNS, the JSON in the envelope's `Message`):
  the Mint transfer object in `transfer` (`status` pending | running | complete | failed).
- Programmable Wallets v2, `transactions.inbound` / `transactions.outbound`: a wallet
  transaction in `notification` (`state`, `amounts`, `tokenId`, `blockchain`, no currency
  code).
- Ours, never Circle's: the deployment checklist's `transfers.created|completed|failed` (the
  Mint transfer object in a v2 envelope; accepted as aliases of `custody.transfer`) and the
  poll's `poll.transfer` (an item of Circle's transfer list kept in the inbox).

Each is read into one TransferEvent, so crediting, settling and the selectors know one shape.
Money is only what a transfer names explicitly: Mint's `USD` is USDC, a Wallets token is what
CIRCLE_WALLETS_TOKENS says it is; anything else is not ours to credit.
"""

import json
from dataclasses import dataclass, replace

from django.conf import settings

from onchain.exceptions import TransferRefused

# Ours, never Circle's: a transfer the poll found in Circle's list and could not apply as it
# stands, kept in the inbox as `poll:<transfer id>` for an operator.
POLLED = "poll.transfer"
MINT_V1 = "transfers"
MINT_V2 = "custody.transfer"
# The checklist's names and the status each stands for: a notification whose name and status
# disagree (a `transfers.failed` saying complete) is taken as final for neither.
CHECKLIST_ALIASES = {
    "transfers.created": "pending",
    "transfers.completed": "complete",
    "transfers.failed": "failed",
}
WALLETS_INBOUND = "transactions.inbound"
WALLETS_OUTBOUND = "transactions.outbound"
# Circle Mint's money objects name USDC "USD" (every Mint example: {"amount": "3.14",
# "currency": "USD"}). EUR there is EURC, which we do not hold.
MINT_CURRENCIES = {"USD": "USDC"}
# A Wallets transaction's final states (COMPLETE: "funds are available"); the rest are steps.
WALLETS_STATES = {"COMPLETE": "complete", "FAILED": "failed", "CANCELED": "failed"}
# Circle Wallets' blockchain codes (testnets included) as the chain codes we register
# addresses and send on (Circle Mint's).
WALLETS_CHAINS = {
    "ETH": "ETH",
    "ETH-SEPOLIA": "ETH",
    "MATIC": "POLY",
    "MATIC-AMOY": "POLY",
    "AVAX": "AVAX",
    "AVAX-FUJI": "AVAX",
    "ARB": "ARB",
    "ARB-SEPOLIA": "ARB",
    "BASE": "BASE",
    "BASE-SEPOLIA": "BASE",
    "OP": "OP",
    "OP-SEPOLIA": "OP",
    "SOL": "SOL",
    "SOL-DEVNET": "SOL",
}
INBOUND, OUTBOUND, FOREIGN = "inbound", "outbound", "foreign"
# Circle's transfer ids are UUIDs; the inbox's and the withdrawals' columns hold 64 characters.
# A longer one is no transfer of Circle's: refused and kept, never a retried 5xx.
MAX_TRANSFER_ID_LENGTH = 64


@dataclass(frozen=True)
class TransferEvent:
    """One notification's account of a transfer. `direction`: inbound (a deposit into our
    wallet), outbound (from our wallet: a withdrawal) or foreign (neither: another wallet's).
    `status`: complete, failed or pending (every state before a final one). `currency` is ours
    (USDC), or None when Circle's (`circle_currency`) is not one we hold. `address` / `chain`:
    where the money went."""

    transfer_id: str
    direction: str
    status: str
    amount: object
    currency: str | None
    circle_currency: str
    address: object
    chain: object
    transfer: dict


def payload_transfer_id(payload: dict) -> str:
    """The transfer id a stored notification names ("" when none), for the inbox's index."""
    transfer = _transfer_object(payload.get("notificationType"), payload)
    transfer_id = transfer.get("id") if isinstance(transfer, dict) else None
    return transfer_id if isinstance(transfer_id, str) else ""


def transfer_event(notification_type: str, payload: dict) -> TransferEvent | None:
    """The transfer a notification reports, or None when it reports none (a test, a fiat
    deposit, a type we do not act on: recorded only). TransferRefused when it reports a
    transfer that cannot be read as one (no id, not an object)."""
    transfer = _transfer_object(notification_type, payload)
    if transfer is None:
        return None
    if not isinstance(transfer, dict):
        raise TransferRefused("the notification's transfer is not an object")
    transfer_id = transfer.get("id")
    if not isinstance(transfer_id, str) or not transfer_id:
        raise TransferRefused("the transfer has no id")
    if len(transfer_id) > MAX_TRANSFER_ID_LENGTH:
        raise TransferRefused(
            f"the transfer id is over {MAX_TRANSFER_ID_LENGTH} characters: not one of Circle's"
        )
    if notification_type in (WALLETS_INBOUND, WALLETS_OUTBOUND):
        return _wallets_event(notification_type, transfer_id, transfer)
    event = _mint_event(transfer_id, transfer)
    if CHECKLIST_ALIASES.get(notification_type, event.status) != event.status:
        return replace(event, status="pending")
    return event


def _transfer_object(notification_type, payload: dict):
    if notification_type == MINT_V1:
        return payload.get("transfer")
    if notification_type in (MINT_V2, POLLED, WALLETS_INBOUND, WALLETS_OUTBOUND):
        return payload.get("notification")
    if notification_type in CHECKLIST_ALIASES:
        return payload.get("notification")
    return None


def _mint_event(transfer_id: str, transfer: dict) -> TransferEvent:
    """A Circle Mint transfer object: `source` / `destination` of type wallet (with `id`) or
    blockchain (with `address`, `chain`), `amount {amount, currency}`, `status`."""
    source, destination = _side(transfer, "source"), _side(transfer, "destination")
    ours = settings.CIRCLE_WALLET_ID
    if source.get("type") == "wallet":
        # From a wallet: ours only when it is our wallet (a withdrawal); Circle Mint v1
        # delivers every wallet's transfers of the account.
        direction = OUTBOUND if source.get("id") == ours else FOREIGN
    elif destination.get("type") == "wallet" and destination.get("id") == ours:
        direction = INBOUND
    else:  # into another wallet of the account, one unnamed, or no wallet at all
        direction = FOREIGN
    amount = transfer.get("amount")
    amount = amount if isinstance(amount, dict) else {}
    circle_currency = amount.get("currency")
    circle_currency = circle_currency if isinstance(circle_currency, str) else ""
    status = transfer.get("status")
    return TransferEvent(
        transfer_id=transfer_id,
        direction=direction,
        status=status if status in ("complete", "failed") else "pending",
        amount=amount.get("amount"),
        currency=MINT_CURRENCIES.get(circle_currency),
        circle_currency=circle_currency,
        address=destination.get("address"),
        chain=destination.get("chain"),
        transfer=transfer,
    )


def _wallets_event(notification_type: str, transfer_id: str, transaction: dict) -> TransferEvent:
    """A Programmable Wallets transaction: `walletId`, `sourceAddress`, `destinationAddress`,
    `blockchain`, `tokenId`, `amounts` (one decimal string for a token transfer), `state`."""
    # Ours only to or from our wallet, as for Mint: money that reached another wallet of the
    # account is not in the custody the USDC buffer books (found from outside: an inbound
    # transaction into any wallet was credited).
    ours = transaction.get("walletId") == settings.CIRCLE_WALLET_ID
    if not ours:
        direction = FOREIGN
    elif notification_type == WALLETS_OUTBOUND:
        direction = OUTBOUND
    else:
        direction = INBOUND
    amounts = transaction.get("amounts")
    token = transaction.get("tokenId")
    token = token if isinstance(token, str) else ""
    state, blockchain = transaction.get("state"), transaction.get("blockchain")
    # Looked up by value below: a list or an object there is no state or chain of Circle's
    # (and no dict key: a TypeError, a 500 that Circle would retry forever).
    for field, value in (("state", state), ("blockchain", blockchain)):
        if value is not None and not isinstance(value, str):
            raise TransferRefused(f"the transaction's {field} is not a string")
    return TransferEvent(
        transfer_id=transfer_id,
        direction=direction,
        status=WALLETS_STATES.get(state, "pending"),
        amount=amounts[0] if isinstance(amounts, list) and len(amounts) == 1 else amounts,
        currency=settings.CIRCLE_WALLETS_TOKENS.get(token),
        circle_currency=f"token {token}",
        address=transaction.get("destinationAddress"),
        chain=WALLETS_CHAINS.get(blockchain, blockchain),
        transfer=transaction,
    )


def _side(transfer: dict, name: str) -> dict:
    side = transfer.get(name)
    return side if isinstance(side, dict) else {}


def stored_event(notification_type: str, body: str) -> TransferEvent | None:
    """The transfer a stored inbox row reports; None when it reports none or cannot be read
    (a refused row stays refused: its reason is on the row)."""
    try:
        return transfer_event(notification_type, json.loads(body))
    except (TransferRefused, ValueError):
        return None

"""Reads of the on-chain engine."""

import json
from collections.abc import Iterable
from decimal import Decimal
from itertools import chain

from cutover.models import BalanceMutation
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from onchain.models import CircleNotification, InboxStatus


def deposits_not_yet_credited(listed: Iterable[dict] = ()) -> Decimal:
    """USDC that reached our wallet by completed inbound transfers but is credited to nobody
    yet (parked for an unknown address, failed, waiting for a redelivery, or not notified at
    all): in the wallet's balance, in no user's. The transfers are those of the inbox and
    those `listed` (Circle's list of inbound transfers); each counted once, however many
    notifications named it."""
    pending: dict[str, Decimal] = {}
    stored = (
        json.loads(body).get("notification")
        for body in CircleNotification.objects.exclude(status=InboxStatus.PROCESSED).values_list(
            "body", flat=True
        )
    )
    for transfer in chain(stored, listed):
        if not isinstance(transfer, dict) or transfer.get("status") != "complete":
            continue
        source, amount = transfer.get("source"), transfer.get("amount")
        if isinstance(source, dict) and source.get("type") == "wallet":
            continue  # one of our withdrawals
        if not isinstance(transfer.get("id"), str) or not isinstance(amount, dict):
            continue
        try:
            pending[transfer["id"]] = amount_parse(amount.get("amount"), "USDC")
        except InvalidAmount:
            continue  # a malformed one was never going to be credited as it stands
    credited = set(
        BalanceMutation.objects.filter(
            reference__in=[f"circle:transfer:{t}" for t in pending]
        ).values_list("reference", flat=True)
    )
    return sum(
        (a for t, a in pending.items() if f"circle:transfer:{t}" not in credited), Decimal(0)
    )

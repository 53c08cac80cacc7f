"""Reads of the on-chain engine."""

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from itertools import chain

from django.conf import settings
from django.db.models import Q, QuerySet

from cutover.models import BalanceMutation
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from ledger.selectors import USDC_BUFFER, system_balance
from onchain import metrics
from onchain.chains import EVM_CHAINS, address_stored_form
from onchain.exceptions import TransferRefused
from onchain.models import (
    CircleNotification,
    DepositAddress,
    InboxStatus,
    TransferDiscrepancy,
    TransferDiscrepancyStatus,
    Withdrawal,
    WithdrawalStatus,
)
from onchain.notifications import INBOUND, POLLED, TransferEvent, stored_event, transfer_event


def deposits_not_yet_credited(listed: Iterable[dict] = ()) -> Decimal:
    """USDC that reached our wallet by completed inbound transfers but is credited to nobody
    yet (parked for an unknown address, failed, waiting for a redelivery, or not notified at
    all): in the wallet's balance, in no user's. The transfers are those of the inbox and
    those `listed` (Circle's list of inbound transfers); each counted once, however many
    notifications named it."""
    pending: dict[str, Decimal] = {}
    stored = (
        stored_event(notification_type, body)
        for notification_type, body in CircleNotification.objects.exclude(
            status=InboxStatus.PROCESSED
        ).values_list("notification_type", "body")
    )
    listed_events = (_listed_event(item) for item in listed)
    for event in chain(stored, listed_events):
        if event is None or event.direction != INBOUND or event.status != "complete":
            continue  # not a completed deposit into our wallet (a withdrawal, another's)
        if event.currency != "USDC" or not isinstance(event.amount, str):
            continue
        try:
            pending[event.transfer_id] = amount_parse(event.amount, "USDC")
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


@dataclass(frozen=True)
class BufferStatus:
    currency: str
    balance: Decimal
    alert_threshold: Decimal

    @property
    def below_threshold(self) -> bool:
        return self.balance < self.alert_threshold


def buffer_status() -> BufferStatus:
    """The system USDC buffer from the ledger, against ONCHAIN_BUFFER_ALERT_THRESHOLD; sets
    `onchain_buffer_level`. The alert's log line: onchain.buffer_alert."""
    balance = system_balance(code=USDC_BUFFER)
    metrics.buffer_level.set(float(balance))
    return BufferStatus("USDC", balance, settings.ONCHAIN_BUFFER_ALERT_THRESHOLD)


def deposit_address_list(*, user_id=None) -> QuerySet[DepositAddress]:
    """Registered deposit addresses, oldest first; only `user_id`'s when given."""
    rows = DepositAddress.objects.order_by("id")
    return rows if user_id is None else rows.filter(user_id=user_id)


def deposit_address_find(*, chain: object, address: object) -> DepositAddress | None:
    """The deposit address a Circle transfer's destination names, compared as registered (EVM
    case-insensitively, others exactly; onchain.chains), or None. A destination without a chain
    (the checklist's notification shape) matches the address on any chain, and only while one
    user holds it: two users holding it on different chains cannot be told apart."""
    if not isinstance(address, str) or not address:
        return None
    if isinstance(chain, str):
        stored = address_stored_form(chain=chain, address=address)
        return DepositAddress.objects.filter(chain=chain, address=stored).first()
    rows = list(
        DepositAddress.objects.filter(
            Q(address=address) | Q(chain__in=EVM_CHAINS, address=address.lower())
        ).order_by("id")
    )
    return rows[0] if len({row.user_id for row in rows}) == 1 else None


def _listed_event(item) -> TransferEvent | None:
    try:
        return transfer_event(POLLED, {"notification": item})
    except TransferRefused:
        return None


def notifications_parked_for(*, chain: str, address: str) -> list[str]:
    """The notification ids parked for a transfer to this registered (stored-form) address: the
    destination names it, as deposit_address_find compares, on this chain or on none."""
    found = []
    parked = CircleNotification.objects.filter(status=InboxStatus.PARKED).order_by("id")
    for notification_id, notification_type, body in parked.values_list(
        "notification_id", "notification_type", "body"
    ):
        event = stored_event(notification_type, body)
        if event is None or not isinstance(event.address, str):
            continue  # not a transfer to an address: parked for another reason
        if event.chain not in (None, chain):
            continue
        if address_stored_form(chain=chain, address=event.address) == address:
            found.append(notification_id)
    return found


def dead_withdrawal_count() -> int:
    """Withdrawals whose sending gave up, waiting for an operator to send again or cancel."""
    return Withdrawal.objects.filter(status=WithdrawalStatus.DEAD).count()


def notification_count(status: InboxStatus) -> int:
    """Notifications in the inbox with `status` (parked and failed are counted by index)."""
    return CircleNotification.objects.filter(status=status).count()


def open_transfer_discrepancy_count() -> int:
    return TransferDiscrepancy.objects.filter(status=TransferDiscrepancyStatus.OPEN).count()

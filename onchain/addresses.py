"""Users' deposit addresses, registered and removed by an operator or a privileged API client:
one user per (chain, address), compared as onchain.chains stores them; each change audited in
its own transaction. Registering an address replays the notifications parked for it (a deposit
that arrived before its address was known), through the operator's replay."""

import logging
import uuid
from dataclasses import dataclass, field

from django.db import IntegrityError, transaction

from cutover.actors import Actor
from cutover.operator_audit import operator_action_record
from onchain.chains import address_lookup_form, address_validate
from onchain.exceptions import (
    AddressInvalid,
    DepositAddressTaken,
    DepositAddressUnknown,
    onchain_rules,
)
from onchain.inbox import notification_replay
from onchain.models import DepositAddress
from onchain.selectors import notifications_parked_for

log = logging.getLogger(__name__)

# The currencies Circle deposits we credit (the inbox credits a deposit in its address's one).
DEPOSIT_CURRENCIES = ("USDC",)


@dataclass(frozen=True)
class DepositAddressAdded:
    address: DepositAddress
    created: bool  # False: it was already registered for this user, nothing changed
    replayed: dict[str, str] = field(default_factory=dict)  # notification id -> its outcome


def _user_id(value: object) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise AddressInvalid("user_id", "user_id must be a UUID") from None


def _snapshot(row: DepositAddress) -> dict:
    return {"user_id": str(row.user_id), "currency": row.currency}


def deposit_address_add(
    *,
    address: object,
    chain: object,
    user_id: object,
    currency: object = "USDC",
    actor: Actor,
    reason: str = "",
) -> DepositAddressAdded:
    """Register `address` on `chain` for a user (validated and stored as onchain.chains says),
    audited in the same transaction; the same registration again changes nothing, the address
    held by another user on that chain is DepositAddressTaken, a user holding another currency
    DepositAddressRefused (OC002). Then, committed, each notification parked for the address is
    replayed as the operator's `onchain replay` would (each audited; a failure is kept on its
    row, retryable, and reported here). The actor needs both permissions: adding the address
    applies the parked money."""
    actor.require("onchain.add_depositaddress")
    actor.require("onchain.change_circlenotification")
    stored = address_validate(chain=chain, address=address)
    owner = _user_id(user_id)
    if currency not in DEPOSIT_CURRENCIES:
        raise AddressInvalid("currency", f"currency must be one of {', '.join(DEPOSIT_CURRENCIES)}")
    try:
        row, created = _register(stored, chain, owner, currency, actor, reason)
    except IntegrityError:
        # Registered by a concurrent request between our read and our insert: its answer is
        # ours if it registered the same thing.
        row, created = _registered(stored, chain, owner, currency), False
    replayed = {}
    for notification_id in notifications_parked_for(chain=row.chain, address=row.address):
        try:
            replayed[notification_id] = notification_replay(
                notification_id=notification_id,
                actor=actor,
                reason=f"deposit address {row} registered: {reason}",
            )
        except Exception as exc:  # kept on the notification's row, retryable by `onchain replay`
            log.exception("replaying %s for deposit address %s failed", notification_id, row)
            replayed[notification_id] = f"failed: {exc}"
    return DepositAddressAdded(row, created, replayed)


def _register(
    stored: str, chain: str, owner: uuid.UUID, currency: str, actor: Actor, reason: str
) -> tuple[DepositAddress, bool]:
    with onchain_rules(), transaction.atomic(durable=True):
        if DepositAddress.objects.filter(chain=chain, address=stored).exists():
            return _registered(stored, chain, owner, currency), False
        row = DepositAddress.objects.create(
            address=stored, chain=chain, user_id=owner, currency=currency
        )
        operator_action_record(
            actor=actor,
            action="deposit_address.add",
            target=f"deposit_address:{row}",
            before={},
            after=_snapshot(row),
            reason=reason,
        )
    log.warning("deposit address %s registered for %s by %s", row, owner, actor.name)
    return row, True


def _registered(stored: str, chain: str, owner: uuid.UUID, currency: str) -> DepositAddress:
    """The row already registered, when it is this registration; otherwise refused."""
    row = DepositAddress.objects.get(chain=chain, address=stored)
    if (row.user_id, row.currency) != (owner, currency):
        raise DepositAddressTaken(
            f"{row} is registered for another user or currency; remove it first"
        )
    return row


def deposit_address_remove(
    *, address: object, chain: object, actor: Actor, reason: str = ""
) -> DepositAddress:
    """Remove a registered address (given in any case an EVM address may take), audited in
    the same transaction. What it credited stays credited; a later deposit to it is parked."""
    actor.require("onchain.delete_depositaddress")
    stored = address_lookup_form(chain=chain, address=address)
    with onchain_rules(), transaction.atomic(durable=True):
        row = DepositAddress.objects.select_for_update().filter(chain=chain, address=stored).first()
        if row is None:
            raise DepositAddressUnknown(f"no deposit address {chain}:{address} is registered")
        operator_action_record(
            actor=actor,
            action="deposit_address.remove",
            target=f"deposit_address:{row}",
            before=_snapshot(row),
            after={},
            reason=reason,
        )
        row.delete()
    log.warning("deposit address %s removed by %s", row, actor.name)
    return row

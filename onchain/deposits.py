"""Deposits: what a completed inbound transfer credits. A transfer to a user's deposit address
is credited to that user through the cutover's balance path, against the system USDC buffer,
once per transfer id whichever way it arrives (webhook, redelivery, renotification, poll): the
decisions are one SQL function, onchain_deposit_credit (onchain/sql/onchain.sql); a plain
deposit's notification is stored and credited in one statement,
onchain_deposit_notification_accept. The inbox (onchain.inbox) and the poll (onchain.polling)
call these."""

import logging
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

from django.db import DatabaseError, connection, transaction

from cutover.balance_path import mutation_observed, mutation_statement_run
from cutover.exceptions import cutover_error_from
from ledger.exceptions import InvalidAmount
from ledger.money import amount_parse
from ledger.selectors import USDC_BUFFER
from onchain import metrics
from onchain.chains import EVM_CHAINS, address_stored_form
from onchain.exceptions import TransferRefused
from onchain.models import CircleNotification, InboxStatus
from onchain.notifications import INBOUND, TransferEvent, transfer_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DepositCredit:
    """What onchain_deposit_credit decided (onchain/sql/onchain.sql: the outcomes)."""

    outcome: str
    why: str
    user_id: UUID | None
    phase: str | None  # the balance path's, when it credited
    mutation_created: bool
    ledger_status: str
    discrepancy: bool


DEPOSIT_STATUS = {
    "credited": InboxStatus.PROCESSED,
    "credited_before": InboxStatus.PROCESSED,
    "unknown_address": InboxStatus.PARKED,
    "held_other_currency": InboxStatus.PARKED,
    "currency_mismatch": InboxStatus.REFUSED,
    "contradicted": InboxStatus.REFUSED,
}
DEPOSIT_CREDIT_SQL = """
    SELECT outcome, why, deposit_user, phase, mutation_created, ledger_status, discrepancy
      FROM onchain_deposit_credit(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""
DEPOSIT_ACCEPT_SQL = """
    SELECT inserted, inbox_status, outcome, why, deposit_user, phase, mutation_created,
           ledger_status, discrepancy
      FROM onchain_deposit_notification_accept(
           %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


def deposit_plain(notification_type: str, payload: dict) -> tuple | None:
    """(event, its arguments to onchain_deposit_credit) for the notification most deliveries
    are: a completed inbound transfer in a currency we hold, with a strict amount and an
    address; None for anything else (refused, pending, a withdrawal's, another wallet's), which
    the inbox's general path decides."""
    try:
        event = transfer_event(notification_type, payload)
        if event is None or event.direction != INBOUND or event.status != "complete":
            return None
        arguments = _deposit_arguments(event, _deposit_amount(event))
    except Exception:  # refused or malformed: the general path decides it again, saying why
        return None
    return None if arguments is None else (event, arguments)


def deposit_notification_accept(
    row: CircleNotification, event: TransferEvent, arguments: list
) -> tuple[bool, str, DepositCredit | None]:
    """A plain deposit's notification (`row`, not stored yet; `event` and `arguments` from
    deposit_plain) stored and applied in one statement (onchain_deposit_notification_accept,
    autocommit: its own transaction). (inserted, the row's status, what was decided); a
    notification id stored before is not applied (False, its stored status, None)."""
    params = [
        row.notification_id,
        row.notification_type,
        row.transfer_id,
        row.key_id,
        row.body,
        *arguments,
        USDC_BUFFER,
    ]
    inserted, status, *credit = _deposit_execute(DEPOSIT_ACCEPT_SQL, params, event.transfer_id)
    return inserted, status, DepositCredit(*credit) if inserted else None


def deposit_credit(event: TransferEvent, *, correlation_id: str) -> tuple[str, str]:
    """Credit a completed inbound transfer to its deposit address's user, in the caller's
    transaction, once per transfer id whichever way it arrives (webhook, redelivery, poll; one
    decision at a time per transfer: concurrent deliveries wait for each other instead of
    colliding): onchain_deposit_credit decides. (status, why): parked when no user has the
    address; TransferRefused when the currency or the amount is not one we credit; refused with
    a TransferDiscrepancy when the transfer was already credited otherwise (another amount or
    user)."""
    if not connection.in_atomic_block:
        raise RuntimeError("deposit_credit must run inside transaction.atomic()")
    arguments = _deposit_arguments(event, _deposit_amount(event))
    if arguments is None:
        return deposit_outcome(
            event, DepositCredit("unknown_address", "", None, None, False, "", False)
        )
    row = _deposit_execute(
        DEPOSIT_CREDIT_SQL, [*arguments, correlation_id, USDC_BUFFER], event.transfer_id
    )
    credit = DepositCredit(*row)
    if credit.outcome == "currency_mismatch":
        raise TransferRefused(credit.why)
    return deposit_outcome(event, credit)


def _deposit_amount(event: TransferEvent) -> Decimal:
    """The amount to credit, or TransferRefused: a currency we hold, a strict decimal string."""
    if event.currency is None:
        raise TransferRefused(
            f"transfer {event.transfer_id}'s currency ({event.circle_currency or 'none'}) is "
            "not one we credit"
        )
    try:
        if not isinstance(event.amount, str):  # Circle writes amounts as decimal strings
            raise InvalidAmount(f"amount {event.amount!r} is not a decimal string")
        return amount_parse(event.amount, event.currency)
    except InvalidAmount as exc:
        raise TransferRefused(f"transfer {event.transfer_id}'s amount: {exc}") from None


def _deposit_arguments(event: TransferEvent, amount: Decimal) -> list | None:
    """onchain_deposit_credit's arguments before its source and counterparty: the address in
    its stored form (deposit_address_find's comparison), or None for a destination that names
    no address."""
    if not isinstance(event.address, str) or not event.address:
        return None
    chain = event.chain if isinstance(event.chain, str) else None
    address = address_stored_form(chain=chain, address=event.address) if chain else event.address
    return [
        event.transfer_id,
        chain,
        address,
        sorted(EVM_CHAINS),
        event.currency,
        amount,
        str(event.amount)[:64],  # as Circle wrote it, for a contradiction's record
        f"{event.amount!r} to {event.address!r}",
    ]


def _deposit_execute(sql: str, params: list, transfer_id: str) -> tuple:
    """One round trip (a prepared statement; two when the ledger's write failed, see
    mutation_statement_run); the cutover's refusals as their domain errors, a strict failure
    naming the user the function found (its HINT)."""
    try:
        return mutation_statement_run(sql, params)
    except DatabaseError as exc:
        hint = getattr(getattr(exc.__cause__, "diag", None), "message_hint", None)
        error = cutover_error_from(
            exc,
            user_id=UUID(hint) if hint else None,
            reference=f"circle:transfer:{transfer_id}",
        )
        if error is None:
            raise
        raise error from exc


def deposit_outcome(event: TransferEvent, credit: DepositCredit) -> tuple[str, str]:
    """The inbox status and why for what onchain_deposit_credit decided; what an operator must
    hear logged, what it did counted once it commits."""
    if credit.outcome == "unknown_address":
        log.warning(
            "circle transfer %s to unknown address %r parked", event.transfer_id, event.address
        )
    elif credit.outcome == "held_other_currency":
        # The money is in our wallet but this user cannot hold it (one currency per user):
        # kept for an operator, never a retry loop. (PostgreSQL refuses such an address, OC002;
        # this covers a user whose first money came in another currency after registering.)
        log.error(
            "ALERT circle transfer %s to %s: %s; parked for an operator",
            event.transfer_id,
            event.address,
            credit.why,
        )
    elif credit.outcome == "contradicted":
        # Recorded once for an operator (who may credit or debit the difference).
        log.error("ALERT %s", credit.why)
        transaction.on_commit(metrics.transfer_discrepancies.inc)
    elif credit.outcome == "credited":
        mutation_observed(
            phase=credit.phase,
            created=credit.mutation_created,
            ledger_status=credit.ledger_status,
            discrepancy=credit.discrepancy,
        )
        transaction.on_commit(metrics.deposits_processed.inc)
    status = DEPOSIT_STATUS[credit.outcome]
    return status, credit.why if status == InboxStatus.REFUSED else ""

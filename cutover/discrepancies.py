"""Working a legacy-vs-ledger discrepancy: triage (investigating; a known difference, which
stops counting against the gates until its rule expires) and the repair, requested by one
operator on the side they pick and applied only when a second operator approves it.

The balance path (cutover_balance_mutate) cannot make a repair: in the phases that have
discrepancies (shadow, read_switch, strict) it writes both stores, and a repair must move one
store to the other. So the repair writes one store itself, under the locks the balance path
takes (the phase lock shared, the user's legacy row, then the user's ledger account):
- the ledger side is a balanced ledger transaction (namespace `repair`, one reference per
  repair, so it is posted once) between the user's account and the currency's opening-balance
  equity, the account the backfill brings legacy balances in from: the ledger takes the legacy
  balance, as a backfill would have;
- the legacy side is an update of the user's `balances` row to the ledger balance (a row
  created if the user has none).
It is applied only if the stores still show the difference the request was made for (else the
request lapses and nothing is posted), and holds RECONCILE_LOCK shared, so no reconciliation
compares a snapshot taken before it committed. Every action is permissioned, audited in its
own transaction (cutover_operator_audit, target `discrepancy:<id>`), and idempotent under a
double submit; PostgreSQL holds the states, the one-time decision of a repair and the second
person (cutover/sql/cutover.sql, cutover.models)."""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db import connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from cutover.actors import Actor
from cutover.exceptions import (
    KillSwitchEngaged,
    NotApplicable,
    ReasonRequired,
    RepairLapsed,
    SecondPersonRequired,
    TriageRefused,
)
from cutover.locks import RECONCILE_LOCK
from cutover.models import (
    UNRESOLVED,
    Discrepancy,
    DiscrepancyRepair,
    KnownDifference,
    RepairSide,
    RepairStatus,
    TriageStatus,
)
from cutover.operator_audit import operator_action_record
from cutover.phase_machine import phase_lock_shared
from cutover.phases import DUAL_WRITE
from cutover.selectors import phase_state, store_balances
from ledger.selectors import account_lock, equity_account_code, system_account, user_account_type
from ledger.services import Leg, account_open, transaction_apply

TRIAGE_PERMISSION = "cutover.triage_discrepancy"
REQUEST_PERMISSION = "cutover.request_discrepancy_repair"
APPROVE_PERMISSION = "cutover.approve_discrepancy_repair"
REPAIR_NAMESPACE = "repair"


def _target(discrepancy_id: int) -> str:
    return f"discrepancy:{discrepancy_id}"


def _discrepancy_locked(discrepancy_id: int) -> Discrepancy:
    found = Discrepancy.objects.select_for_update(of=("self",)).filter(pk=discrepancy_id).first()
    if found is None:
        raise TriageRefused(f"there is no discrepancy {discrepancy_id}")
    return found


def _unresolved(discrepancy: Discrepancy, doing: str) -> None:
    if discrepancy.status not in UNRESOLVED:
        raise TriageRefused(
            f"discrepancy {discrepancy.pk} is {discrepancy.status}: there is nothing to {doing}"
        )


def _rules_end(discrepancy: Discrepancy, *, every_active: bool = False) -> list[int]:
    """End now the discrepancy's known-difference rule (or, `every_active`, every active rule
    of its user and currency); returns the rules ended."""
    rules = KnownDifference.objects.filter(expires_at__gt=Now())
    if every_active:
        rules = rules.filter(user_id=discrepancy.user_id, currency=discrepancy.currency)
    elif discrepancy.known_difference_id is not None:
        rules = rules.filter(pk=discrepancy.known_difference_id)
    else:
        return []
    ended = sorted(rules.values_list("pk", flat=True))
    KnownDifference.objects.filter(pk__in=ended).update(expires_at=Now())
    return ended


def discrepancy_investigate(*, discrepancy_id: int, actor: Actor, note: str) -> Discrepancy:
    """Mark a discrepancy under investigation (from open, or from a known difference, whose
    rule then ends: it counts against the gates again). A second submit changes nothing."""
    actor.require(TRIAGE_PERMISSION)
    if not note.strip():
        raise ReasonRequired("investigating a discrepancy needs a note")
    with transaction.atomic(durable=True):
        discrepancy = _discrepancy_locked(discrepancy_id)
        if discrepancy.status == TriageStatus.INVESTIGATING:
            return discrepancy
        _unresolved(discrepancy, "investigate")
        before = {"status": discrepancy.status, "known_difference": discrepancy.known_difference_id}
        ended = _rules_end(discrepancy)
        discrepancy.status = TriageStatus.INVESTIGATING
        discrepancy.known_difference = None
        discrepancy.save(update_fields=["status", "known_difference"])
        operator_action_record(
            actor=actor,
            action="discrepancy.investigate",
            target=_target(discrepancy_id),
            before=before,
            after={"status": discrepancy.status, "known_differences_ended": ended},
            reason=note,
        )
    return discrepancy


def discrepancy_known_difference_mark(
    *, discrepancy_id: int, actor: Actor, reason: str, expires_at: datetime
) -> KnownDifference:
    """Accept a discrepancy's difference as known until `expires_at`: a known-difference rule
    for its user, currency and difference as last seen, so it (and any discrepancy of the same
    user and currency showing exactly that difference) stops counting against the gates and
    keeps reconciliations clean until then. A second submit returns the rule already made."""
    actor.require(TRIAGE_PERMISSION)
    if not reason.strip():
        raise ReasonRequired("a known difference needs a written reason")
    if expires_at <= timezone.now():
        raise TriageRefused("expires_at: a known difference must expire in the future")
    with transaction.atomic(durable=True):
        discrepancy = _discrepancy_locked(discrepancy_id)
        _unresolved(discrepancy, "accept as known")
        current = discrepancy.known_difference
        if current is not None and current.expires_at > timezone.now():
            return current
        before = {"status": discrepancy.status, "known_difference": discrepancy.known_difference_id}
        rule = KnownDifference.objects.create(
            user_id=discrepancy.user_id,
            currency=discrepancy.currency,
            difference=discrepancy.difference,
            reason=reason,
            created_by=actor.name,
            expires_at=expires_at,
        )
        discrepancy.status = TriageStatus.KNOWN_DIFFERENCE
        discrepancy.known_difference = rule
        discrepancy.save(update_fields=["status", "known_difference"])
        operator_action_record(
            actor=actor,
            action="discrepancy.known_difference",
            target=_target(discrepancy_id),
            before=before,
            after={
                "status": discrepancy.status,
                "known_difference": rule.pk,
                "user_id": str(rule.user_id),
                "currency": rule.currency,
                "difference": str(rule.difference),
                "expires_at": rule.expires_at.isoformat(),
            },
            reason=reason,
        )
    return rule


def discrepancy_repair_request(
    *, discrepancy_id: int, actor: Actor, side: str, reason: str
) -> DiscrepancyRepair:
    """Ask for the correcting entry of an unresolved discrepancy on `side` (legacy: the legacy
    store takes the ledger's balance; ledger: the ledger takes the legacy balance), for the
    difference the stores show now; it waits for a second operator's approval. A newer request
    replaces a waiting one (which lapses); the same request submitted twice is one."""
    actor.require(REQUEST_PERMISSION)
    if side not in RepairSide.values:
        raise TriageRefused(f"side: the store to correct is legacy or ledger, not {side!r}")
    if not reason.strip():
        raise ReasonRequired("a repair needs a written reason")
    with transaction.atomic(durable=True):
        phase = phase_state().phase
        if phase not in DUAL_WRITE:
            raise NotApplicable(
                "a repair moves one store to the other while both are written (shadow, "
                f"read_switch, strict); the phase is {phase}"
            )
        discrepancy = _discrepancy_locked(discrepancy_id)
        _unresolved(discrepancy, "repair")
        legacy, ledger = store_balances(discrepancy.user_id, discrepancy.currency)
        difference = (legacy or Decimal(0)) - (ledger or Decimal(0))
        if not difference:
            raise TriageRefused(
                f"the stores agree now (legacy {legacy}, ledger {ledger}): there is nothing "
                "to repair, and the next reconciliation resolves the discrepancy"
            )
        waiting = discrepancy.repairs.select_for_update().filter(status=RepairStatus.REQUESTED)
        for earlier in waiting:
            if (earlier.side, earlier.difference, earlier.requested_by) == (
                side,
                difference,
                actor.name,
            ):
                return earlier
            earlier.status = RepairStatus.LAPSED
            earlier.decided_at = timezone.now()
            earlier.lapsed_why = f"replaced by a newer request of {actor.name}"
            earlier.save(update_fields=["status", "decided_at", "lapsed_why"])
        repair = DiscrepancyRepair.objects.create(
            discrepancy=discrepancy,
            side=side,
            difference=difference,
            legacy_balance=legacy,
            ledger_balance=ledger,
            reason=reason,
            requested_by=actor.name,
        )
        operator_action_record(
            actor=actor,
            action="discrepancy.repair_request",
            target=_target(discrepancy_id),
            before={"status": discrepancy.status},
            after={
                "repair": repair.pk,
                "side": side,
                "difference": str(difference),
                "legacy_balance": None if legacy is None else str(legacy),
                "ledger_balance": None if ledger is None else str(ledger),
                "replaced": [earlier.pk for earlier in waiting],
            },
            reason=reason,
        )
    return repair


@dataclass(frozen=True)
class _Stores:
    legacy: Decimal | None
    ledger: Decimal | None
    ledger_account_id: int | None

    @property
    def difference(self) -> Decimal:
        return (self.legacy or Decimal(0)) - (self.ledger or Decimal(0))


def _stores_locked(user_id, currency: str) -> _Stores:
    """Both stores' balances for the user under the balance path's locks, in its order: the
    legacy row, then the ledger account."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT buying_power FROM balances WHERE user_id = %s AND currency = %s FOR UPDATE",
            [user_id, currency],
        )
        row = cursor.fetchone()
        cursor.execute(
            "SELECT account_id FROM ledger_user_balances WHERE user_id = %s AND currency = %s",
            [user_id, currency],
        )
        account = cursor.fetchone()
    ledger = account_lock(account_id=account[0])[0] if account else None
    return _Stores(row[0] if row else None, ledger, account[0] if account else None)


def discrepancy_repair_approve(*, repair_id: int, actor: Actor) -> DiscrepancyRepair:
    """Approve another operator's repair and apply it: the correcting entry on its side, the
    discrepancy repaired, every active known-difference rule of the user and currency ended.
    Applied once: an approval of an applied repair returns it unchanged. If the stores no longer
    show the requested difference, or the discrepancy ended, the repair lapses (recorded, nothing
    posted) and RepairLapsed is raised.

    Locks, in order: RECONCILE_LOCK shared, the phase lock shared, the user's legacy row, the
    user's ledger account, the discrepancy, the repair (the balance path's order, then the rows
    the request locks in its own order)."""
    actor.require(APPROVE_PERMISSION)
    found = DiscrepancyRepair.objects.select_related("discrepancy").filter(pk=repair_id).first()
    if found is None:
        raise TriageRefused(f"there is no repair {repair_id}")
    if found.requested_by == actor.name:
        raise SecondPersonRequired(
            f"repair {repair_id} was requested by {actor.name}: another operator approves it"
        )
    user_id, currency = found.discrepancy.user_id, found.discrepancy.currency
    lapsed = ""
    with transaction.atomic(durable=True):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock_shared(%s)", [RECONCILE_LOCK])
        phase_lock_shared()
        state = phase_state()
        if state.kill_switch:
            raise KillSwitchEngaged(f"kill switch engaged: {state.kill_switch_reason}")
        if state.phase not in DUAL_WRITE:
            raise NotApplicable(
                "a repair moves one store to the other while both are written (shadow, "
                f"read_switch, strict); the phase is {state.phase}"
            )
        stores = _stores_locked(user_id, currency)
        discrepancy = _discrepancy_locked(found.discrepancy_id)
        repair = DiscrepancyRepair.objects.select_for_update().get(pk=repair_id)
        if repair.status == RepairStatus.APPLIED:
            return repair  # a double approval: applied once
        if repair.status == RepairStatus.LAPSED:
            raise RepairLapsed(f"repair {repair_id} lapsed: {repair.lapsed_why}")
        if discrepancy.status not in UNRESOLVED:
            lapsed = f"the discrepancy is {discrepancy.status}"
        elif stores.difference != repair.difference:
            lapsed = (
                f"the stores now differ by {stores.difference} (legacy {stores.legacy}, ledger "
                f"{stores.ledger}), not the {repair.difference} requested: request it again"
            )
        if lapsed:
            _repair_lapse(repair, actor, lapsed)
        else:
            _repair_apply(repair, discrepancy, stores, actor)
    if lapsed:
        raise RepairLapsed(f"repair {repair_id} not applied: {lapsed}")
    return repair


def _repair_lapse(repair: DiscrepancyRepair, actor: Actor, why: str) -> None:
    repair.status = RepairStatus.LAPSED
    repair.decided_at = timezone.now()
    repair.lapsed_why = why
    repair.save(update_fields=["status", "decided_at", "lapsed_why"])
    operator_action_record(
        actor=actor,
        action="discrepancy.repair_lapse",
        target=_target(repair.discrepancy_id),
        before={"repair": repair.pk, "status": RepairStatus.REQUESTED},
        after={"repair": repair.pk, "status": RepairStatus.LAPSED},
        reason=why,
    )


def _repair_apply(
    repair: DiscrepancyRepair, discrepancy: Discrepancy, stores: _Stores, actor: Actor
) -> None:
    """The correcting entry on the repair's side (under the locks _stores_locked took), then the
    repair applied and the discrepancy repaired."""
    difference = repair.difference
    legacy_after, ledger_after = stores.legacy, stores.ledger
    if repair.side == RepairSide.LEDGER:
        repair.ledger_transaction_id = _ledger_correct(repair, discrepancy, difference)
        ledger_after = (stores.ledger or Decimal(0)) + difference
    else:
        legacy_after = (stores.legacy or Decimal(0)) - difference
        _legacy_correct(discrepancy, stores, legacy_after)
    repair.status = RepairStatus.APPLIED
    repair.approved_by = actor.name
    repair.decided_at = timezone.now()
    repair.legacy_after, repair.ledger_after = legacy_after, ledger_after
    repair.save()
    before = {
        "status": discrepancy.status,
        "legacy_balance": None if stores.legacy is None else str(stores.legacy),
        "ledger_balance": None if stores.ledger is None else str(stores.ledger),
    }
    ended = _rules_end(discrepancy, every_active=True)
    discrepancy.status = TriageStatus.REPAIRED
    discrepancy.resolved_at = repair.decided_at
    discrepancy.resolved_by = actor.name
    discrepancy.resolution_note = (
        f"repaired on the {repair.side} side (repair {repair.pk}): requested by "
        f"{repair.requested_by}, approved by {actor.name}: {repair.reason}"
    )
    discrepancy.save(update_fields=["status", "resolved_at", "resolved_by", "resolution_note"])
    operator_action_record(
        actor=actor,
        action="discrepancy.repair",
        target=_target(discrepancy.pk),
        before=before,
        after={
            "status": discrepancy.status,
            "repair": repair.pk,
            "side": repair.side,
            "requested_by": repair.requested_by,
            "legacy_balance": None if legacy_after is None else str(legacy_after),
            "ledger_balance": None if ledger_after is None else str(ledger_after),
            "ledger_transaction_id": repair.ledger_transaction_id,
            "known_differences_ended": ended,
        },
        reason=repair.reason,
    )


def _ledger_correct(repair: DiscrepancyRepair, discrepancy: Discrepancy, difference) -> int:
    """Post `difference` (legacy - ledger) to the user's ledger account against the currency's
    opening-balance equity: once per repair (its reference)."""
    currency = discrepancy.currency
    account = account_open(
        user_id=discrepancy.user_id, account_type=user_account_type(currency), currency=currency
    )
    equity = system_account(code=equity_account_code(currency))
    amount = abs(difference)
    legs = (
        [Leg.debit(equity, amount), Leg.credit(account, amount)]
        if difference > 0
        else [Leg.debit(account, amount), Leg.credit(equity, amount)]
    )
    posting = transaction_apply(
        namespace=REPAIR_NAMESPACE,
        reference_id=f"discrepancy:{discrepancy.pk}:repair:{repair.pk}",
        kind="discrepancy_repair",
        legs=legs,
        metadata={
            "user_id": str(discrepancy.user_id),
            "discrepancy": discrepancy.pk,
            "repair": repair.pk,
            "requested_by": repair.requested_by,
            "reason": repair.reason,
        },
    )
    return posting.transaction_id


def _legacy_correct(discrepancy: Discrepancy, stores: _Stores, legacy_after: Decimal) -> None:
    """Set the user's legacy row (locked by _stores_locked) to the ledger's balance; a user
    without one gets one."""
    with connection.cursor() as cursor:
        if stores.legacy is None:
            cursor.execute(
                "INSERT INTO balances (user_id, buying_power, currency) VALUES (%s, %s, %s)",
                [discrepancy.user_id, legacy_after, discrepancy.currency],
            )
        else:
            cursor.execute(
                "UPDATE balances SET buying_power = %s, updated_at = now() WHERE user_id = %s",
                [legacy_after, discrepancy.user_id],
            )

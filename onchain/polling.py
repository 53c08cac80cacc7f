"""Polling Circle for what its webhook did not bring: completed inbound transfers are
credited, submitted withdrawals brought to Circle's status, and notifications parked before
their send was recorded are applied."""

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from cutover.balance_path import strict_failure_recorded
from cutover.models import BalanceMutation
from onchain import circle, metrics
from onchain.deposits import deposit_credit
from onchain.exceptions import TransferRefused
from onchain.inbox import notification_process, parked_resolve, polled_park
from onchain.models import CircleNotification, InboxStatus, Withdrawal, WithdrawalStatus
from onchain.notifications import INBOUND, POLLED, transfer_event
from onchain.withdrawals import transfer_settle

log = logging.getLogger(__name__)


@dataclass
class PollReport:
    deposits_seen: int = 0
    deposits_credited: int = 0
    deposits_parked: int = 0
    deposits_not_applied: int = 0  # refused this time (e.g. the kill switch): tried next poll
    deposits_malformed: int = 0  # parked in the inbox for an operator (`poll:<id>` rows)
    notifications_resolved: int = 0  # parked inbox rows of a transfer the poll credited
    withdrawals_checked: int = 0
    withdrawals_settled: int = 0
    withdrawals_not_settled: int = 0  # Circle unreachable or the posting refused: next poll


def transfers_poll(*, lookback: timedelta | None = None, base_url: str | None = None) -> PollReport:
    """The fallback for webhooks that never came: completed inbound transfers of the last
    `lookback` (every page of Circle's list) are credited (the same `circle:transfer:<id>`
    reference as the webhook, so whichever comes second changes nothing), and submitted
    withdrawals are brought to Circle's status. A transfer that cannot be applied now is
    logged, counted and tried again by the next poll; a malformed one is parked in the inbox
    for an operator; neither stops the others. Circle is at `base_url` (CIRCLE_API_BASE_URL
    unless given)."""
    base_url = base_url or settings.CIRCLE_API_BASE_URL
    report = PollReport()
    since = timezone.now() - (lookback or settings.ONCHAIN_DEPOSIT_POLL_LOOKBACK)
    for item in circle.transfers_inbound(base_url=base_url, since=since):
        report.deposits_seen += 1
        _deposit_poll(item, since, report)
    for pk, transfer_id in Withdrawal.objects.filter(status=WithdrawalStatus.SUBMITTED).values_list(
        "pk", "circle_transfer_id"
    ):
        report.withdrawals_checked += 1
        try:
            outcome = transfer_settle(
                pk, circle.transfer_get(base_url=base_url, transfer_id=transfer_id)
            )
        except Exception:
            log.exception("withdrawal %s (transfer %s) not settled this poll", pk, transfer_id)
            report.withdrawals_not_settled += 1
            continue
        if outcome in ("completed", "failed"):
            report.withdrawals_settled += 1
    # Notifications parked because they overtook their send's record: settled by now.
    for notification_id in CircleNotification.objects.filter(
        status=InboxStatus.PARKED,
        transfer_id__in=Withdrawal.objects.filter(circle_transfer_id__isnull=False).values(
            "circle_transfer_id"
        ),
    ).values_list("notification_id", flat=True):
        try:
            notification_process(notification_id=notification_id)
        except Exception:
            log.exception("parked notification %s still not applied", notification_id)
    return report


def _deposit_poll(item, since, report: PollReport) -> None:
    """One item of Circle's inbound list: credited if complete and not yet credited, together
    with marking the inbox rows parked for it processed (locked first, in the webhook's order:
    inbox row, then the credit)."""
    status = item.get("status") if isinstance(item, dict) else None
    if isinstance(status, str) and status != "complete":
        return  # only a completed transfer moves money
    try:
        event = transfer_event(POLLED, {"notification": item})
        if event is None or status != "complete":
            raise TransferRefused("the listed transfer has no id or status")
    except TransferRefused as exc:
        _malformed(item, str(exc), report)
        return
    if event.direction != INBOUND:
        return  # listed by destination wallet, yet from our wallet or into another
    created = circle.transfer_created(item)
    if created is not None and created < since:
        return  # outside the lookback: Circle's `from` filter was not applied
    reference = f"circle:transfer:{event.transfer_id}"
    if BalanceMutation.objects.filter(reference=reference).exists():
        return
    try:
        with strict_failure_recorded(), transaction.atomic(durable=True):
            waiting = list(
                CircleNotification.objects.select_for_update().filter(
                    transfer_id=event.transfer_id, status=InboxStatus.PARKED
                )
            )
            outcome, _ = deposit_credit(event, correlation_id=f"poll:{event.transfer_id}")
            if outcome == InboxStatus.PROCESSED:
                report.notifications_resolved += parked_resolve(waiting, event)
    except TransferRefused as exc:
        _malformed(item, str(exc), report)
        return
    except Exception:
        log.exception("circle transfer %s not credited; the next poll tries again", reference)
        report.deposits_not_applied += 1
        return
    if outcome == InboxStatus.PARKED:
        report.deposits_parked += 1
    elif outcome == InboxStatus.REFUSED:
        report.deposits_not_applied += 1  # contradicts a credit made meanwhile: recorded
    else:
        report.deposits_credited += 1


def _malformed(item, error: str, report: PollReport) -> None:
    report.deposits_malformed += 1
    if polled_park(item, error=error):
        log.error("ALERT a transfer in Circle's list is malformed (%s); parked: %r", error, item)
        metrics.poll_transfers_malformed.inc()

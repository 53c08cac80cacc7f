"""Polling Circle for what its webhook did not bring: completed inbound transfers are
credited, submitted withdrawals brought to Circle's status, and notifications parked before
their send was recorded are applied."""

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from cutover.balance_path import strict_failure_recorded
from cutover.models import BalanceMutation
from onchain import circle
from onchain.inbox import deposit_credit, notification_process
from onchain.models import CircleNotification, InboxStatus, Withdrawal, WithdrawalStatus
from onchain.withdrawals import transfer_settle

log = logging.getLogger(__name__)


class PollReport:
    deposits_seen: int = 0
    deposits_credited: int = 0
    deposits_parked: int = 0
    deposits_not_applied: int = 0  # refused this time (e.g. the kill switch): tried next poll
    withdrawals_checked: int = 0
    withdrawals_settled: int = 0
    withdrawals_not_settled: int = 0  # Circle unreachable or the posting refused: next poll


def transfers_poll(*, lookback: timedelta | None = None, base_url: str | None = None) -> PollReport:
    """The fallback for webhooks that never came: completed inbound transfers of the last
    `lookback` are credited (the same `circle:transfer:<id>` reference as the webhook, so
    whichever comes second changes nothing), and submitted withdrawals are brought to
    Circle's status. One transfer that cannot be applied now is logged, counted and tried
    again by the next poll; it never stops the others. Circle is at `base_url`
    (CIRCLE_API_BASE_URL unless given)."""
    base_url = base_url or settings.CIRCLE_API_BASE_URL
    report = PollReport()
    since = timezone.now() - (lookback or settings.ONCHAIN_DEPOSIT_POLL_LOOKBACK)
    for transfer in circle.transfers_inbound(
        base_url=base_url, since=since.isoformat().replace("+00:00", "Z")
    ):
        report.deposits_seen += 1
        if transfer.get("status") != "complete":
            continue
        reference = f"circle:transfer:{transfer['id']}"
        if BalanceMutation.objects.filter(reference=reference).exists():
            continue
        try:
            with strict_failure_recorded(), transaction.atomic(durable=True):
                outcome = deposit_credit(transfer, correlation_id=f"poll:{transfer['id']}")
        except Exception:
            log.exception("circle transfer %s not credited; the next poll tries again", reference)
            report.deposits_not_applied += 1
            continue
        if outcome == InboxStatus.PARKED:
            report.deposits_parked += 1
        else:
            report.deposits_credited += 1
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

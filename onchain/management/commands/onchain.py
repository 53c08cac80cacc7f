"""`python manage.py onchain ...`: replay a stored Circle notification, send due withdrawals,
poll Circle for transfers, request/resend/cancel a withdrawal, list withdrawals, add/list/remove
users' deposit addresses, run the Circle sandbox."""

import dataclasses
import time
import uuid
from datetime import timedelta
from decimal import Decimal

from django.core.management.base import BaseCommand, CommandError, CommandParser

from cutover.actors import Actor
from cutover.exceptions import CutoverError
from gateway.commands import (
    ascii_word,
    bounded_int,
    flag_error,
    json_text,
    plain,
    port_number,
    positive_int,
    reason_text,
    record_id,
    written_reason,
)
from ledger.exceptions import InvalidAmount, LedgerError
from ledger.money import amount_parse
from onchain.addresses import deposit_address_add, deposit_address_remove
from onchain.chains import CHAINS
from onchain.exceptions import AddressInvalid, OnchainError
from onchain.inbox import notification_replay
from onchain.models import CircleNotification, Withdrawal, WithdrawalStatus
from onchain.polling import transfers_poll
from onchain.sandbox import CircleSandbox
from onchain.selectors import deposit_address_list
from onchain.withdrawals import (
    withdrawal_cancel,
    withdrawal_request,
    withdrawal_resend,
    withdrawals_send,
)

# The flag a deposit address's refused field was given by.
ADDRESS_FLAGS = {
    "address": "--address",
    "chain": "--chain",
    "user_id": "--user",
    "currency": "--currency",
}
# How far back `poll --hours` may look: a year (and never past what a datetime holds).
MAX_POLL_HOURS = 366 * 24
# A Circle notificationId as stored (CircleNotification.notification_id).
notification_id_type = ascii_word(CircleNotification._meta.get_field("notification_id").max_length)
# What a deposit address's --json carries (`address add`, `remove`, `list`).
ADDRESS_FIELDS = ["chain", "address", "user_id", "currency", "created_at"]
# What a withdrawal's --json carries (`withdraw`, `resend`, `cancel`, `withdrawals`).
WITHDRAWAL_FIELDS = [
    "id",
    "idempotency_key",
    "user_id",
    "amount",
    "currency",
    "address",
    "chain",
    "status",
    "attempts",
    "circle_transfer_id",
    "last_error",
    "requested_by",
    "created_at",
]


class Command(BaseCommand):
    help = (
        "The on-chain engine: notifications, withdrawals, polling, deposit addresses and the "
        "Circle sandbox. Operators' changes are audited as cli:<user>; --json prints what a "
        "script reads. Exit status: 0 done, 1 refused or failed, 2 a bad argument."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        replay = sub.add_parser("replay", help="process a stored notification again (idempotent)")
        replay.add_argument(
            "notification_id", type=notification_id_type, help="Circle's notificationId"
        )
        replay.add_argument(
            "--reason", type=reason_text, default="", help="why (kept in the operator audit)"
        )
        replay.add_argument("--json", action="store_true", help="print the outcome as JSON")
        send = sub.add_parser("send", help="send due withdrawals to Circle now (the worker's pass)")
        send.add_argument("--limit", type=positive_int, default=100, help="at most (100)")
        send.add_argument("--json", action="store_true", help="print the report as JSON")
        poll = sub.add_parser(
            "poll", help="ask Circle for recent inbound transfers and submitted withdrawals"
        )
        poll.add_argument(
            "--hours",
            type=bounded_int(1, MAX_POLL_HOURS),
            default=None,
            help=f"look back this many hours, at most {MAX_POLL_HOURS:,} (a year; default: "
            "ONCHAIN_DEPOSIT_POLL_LOOKBACK)",
        )
        poll.add_argument("--json", action="store_true", help="print the report as JSON")
        withdraw = sub.add_parser("withdraw", help="hold a user's USDC and queue its withdrawal")
        withdraw.add_argument("--user", required=True, help="the user's UUID")
        withdraw.add_argument("--amount", required=True, help='USDC, e.g. "25.50"')
        withdraw.add_argument("--address", required=True, help="destination address")
        withdraw.add_argument(
            "--chain", required=True, choices=sorted(CHAINS), help="destination chain, e.g. ETH"
        )
        withdraw.add_argument("--json", action="store_true", help="print the withdrawal as JSON")
        resend = sub.add_parser("resend", help="send a dead withdrawal again (same key)")
        resend.add_argument("withdrawal", type=record_id, help="the withdrawal's id")
        resend.add_argument(
            "--reason", type=reason_text, default="", help="why (kept in the operator audit)"
        )
        resend.add_argument("--json", action="store_true", help="print the withdrawal as JSON")
        cancel = sub.add_parser(
            "cancel",
            help=(
                "reverse a dead withdrawal's hold; Circle is asked first, and a withdrawal whose "
                "transfer Circle has is not cancelled but follows Circle's status"
            ),
        )
        cancel.add_argument("withdrawal", type=record_id, help="the withdrawal's id")
        cancel.add_argument(
            "--reason",
            type=reason_text,
            required=True,
            help="why (kept on the withdrawal and in the audit)",
        )
        cancel.add_argument("--json", action="store_true", help="print the withdrawal as JSON")
        listing = sub.add_parser("withdrawals", help="list withdrawals")
        listing.add_argument("--status", choices=WithdrawalStatus.values, help="only these")
        listing.add_argument("--json", action="store_true", help="print JSON")
        self._address_arguments(sub)
        sandbox = sub.add_parser(
            "sandbox",
            help="serve the Circle sandbox until interrupted; point CIRCLE_API_BASE_URL at it",
        )
        sandbox.add_argument(
            "--port", type=port_number, default=8099, help="port on 127.0.0.1, 1..65535 (8099)"
        )
        sandbox.add_argument(
            "--subscriber",
            type=ascii_word(2048),
            default=None,
            help="the webhook URL to notify of transfers",
        )
        sandbox.add_argument(
            "--settle",
            choices=["complete", "failed"],
            default=None,
            help="complete or fail new outbound transfers on their own",
        )
        sandbox.add_argument(
            "--wallet-balance",
            default="0",
            help='USDC the wallet starts with, e.g. "250000" (0); deposits add, completions take',
        )

    def _address_arguments(self, sub) -> None:
        address = sub.add_parser("address", help="users' deposit addresses: add, list, remove")
        actions = address.add_subparsers(dest="address_action", required=True, metavar="ACTION")
        add = actions.add_parser(
            "add",
            help="register an address for a user (one user per chain and address) and credit "
            "the deposits parked for it",
        )
        add.add_argument("--address", required=True, help="the address (EVM: EIP-55 or any case)")
        add.add_argument("--chain", required=True, help=f"one of {', '.join(sorted(CHAINS))}")
        add.add_argument("--user", required=True, help="the user's UUID")
        add.add_argument("--currency", default="USDC", help="what it receives (USDC)")
        add.add_argument(
            "--reason", type=reason_text, required=True, help="why (kept in the operator audit)"
        )
        add.add_argument("--json", action="store_true", help="print JSON")
        listing = actions.add_parser("list", help="list registered deposit addresses")
        listing.add_argument("--user", default=None, help="only this user's (a UUID)")
        listing.add_argument("--json", action="store_true", help="print JSON")
        remove = actions.add_parser(
            "remove", help="unregister an address; later deposits to it are parked"
        )
        remove.add_argument("--address", required=True, help="the address (EVM: any case)")
        remove.add_argument("--chain", required=True, help="its chain")
        remove.add_argument(
            "--reason", type=reason_text, required=True, help="why (kept in the operator audit)"
        )
        remove.add_argument("--json", action="store_true", help="print JSON")

    def handle(self, *args, **options) -> None:
        try:
            getattr(self, f"_{options['action']}")(options)
        except AddressInvalid as exc:
            flag = ADDRESS_FLAGS.get(exc.field, exc.field)
            raise CommandError(f"{flag}: {exc}") from None
        except (OnchainError, CutoverError, LedgerError) as exc:
            raise CommandError(str(exc)) from None

    def _replay(self, options) -> None:
        notification_id = options["notification_id"]
        if not CircleNotification.objects.filter(notification_id=notification_id).exists():
            raise CommandError(f"notification_id: no stored notification {notification_id}")
        status = notification_replay(
            notification_id=notification_id, actor=Actor.command_line(), reason=options["reason"]
        )
        row = CircleNotification.objects.get(notification_id=notification_id)
        if options["json"]:
            data = {
                "notification_id": notification_id,
                "notification_type": row.notification_type,
                "status": status,
                "error": row.error,
            }
            self.stdout.write(json_text(data))
        else:
            why = f" ({row.error})" if row.error else ""
            self.stdout.write(f"{notification_id}: {status}{why}")

    def _send(self, options) -> None:
        self._report(withdrawals_send(limit=options["limit"]), options["json"])

    def _poll(self, options) -> None:
        hours = options["hours"]
        lookback = None if hours is None else timedelta(hours=hours)
        self._report(transfers_poll(lookback=lookback), options["json"])

    def _withdraw(self, options) -> None:
        user_id = self._user(options["user"])
        try:
            withdrawal = withdrawal_request(
                user_id=user_id,
                amount=options["amount"],
                address=options["address"],
                chain=options["chain"],
                requested_by=Actor.command_line().name,
            )
        except (OnchainError, LedgerError) as exc:
            raise flag_error(
                exc, {"amount": "--amount", "address": "--address", "chain": "--chain"}
            ) from None
        self._withdrawal(options, withdrawal)

    def _resend(self, options) -> None:
        withdrawal = withdrawal_resend(
            withdrawal_id=self._known(options),
            actor=Actor.command_line(),
            reason=options["reason"],
        )
        self._withdrawal(options, withdrawal)

    def _cancel(self, options) -> None:
        withdrawal = withdrawal_cancel(
            withdrawal_id=self._known(options),
            actor=Actor.command_line(),
            reason=options["reason"],
        )
        self._withdrawal(options, withdrawal)

    def _withdrawal(self, options, withdrawal: Withdrawal) -> None:
        """One withdrawal after a change: its row as stored, as JSON or a line for a person."""
        withdrawal.refresh_from_db()
        if options["json"]:
            self.stdout.write(json_text({f: getattr(withdrawal, f) for f in WITHDRAWAL_FIELDS}))
            return
        self.stdout.write(
            f"withdrawal {withdrawal.pk}: {withdrawal.amount} {withdrawal.currency} of user "
            f"{withdrawal.user_id} to {withdrawal.chain}:{withdrawal.address}, {withdrawal.status}"
            + (f" ({withdrawal.last_error})" if withdrawal.last_error else "")
        )

    def _withdrawals(self, options) -> None:
        rows = Withdrawal.objects.order_by("id")
        if options["status"]:
            rows = rows.filter(status=options["status"])
        data = list(rows.values(*WITHDRAWAL_FIELDS))
        if options["json"]:
            self.stdout.write(json_text(data))
            return
        for row in data:
            self.stdout.write(
                f"{row['id']:>6} {row['status']:<9} {row['amount']:>14} {row['chain']:<5} "
                f"{row['address']} attempts={row['attempts']} {row['last_error'][:60]}"
            )

    def _address(self, options) -> None:
        action = options["address_action"]
        if action == "add":
            added = deposit_address_add(
                address=options["address"],
                chain=options["chain"],
                user_id=self._user(options["user"]),
                currency=options["currency"],
                actor=Actor.command_line(),
                reason=written_reason(options["reason"], "adding a deposit address"),
            )
            if options["json"]:
                data = {
                    **_address_data(added.address),
                    "created": added.created,
                    "replayed": added.replayed,
                }
                self.stdout.write(json_text(data))
                return
            verb = "registered" if added.created else "already registered"
            self.stdout.write(f"{added.address} {verb} for {added.address.user_id}")
            for notification_id, status in added.replayed.items():
                self.stdout.write(f"  parked notification {notification_id}: {status}")
        elif action == "remove":
            row = deposit_address_remove(
                address=options["address"],
                chain=options["chain"],
                actor=Actor.command_line(),
                reason=written_reason(options["reason"], "removing a deposit address"),
            )
            if options["json"]:
                self.stdout.write(json_text({**_address_data(row), "removed": True}))
                return
            self.stdout.write(f"{row} removed (it was {row.user_id}'s)")
        else:
            user = None if options["user"] is None else self._user(options["user"])
            data = list(deposit_address_list(user_id=user).values(*ADDRESS_FIELDS))
            if options["json"]:
                self.stdout.write(json_text(data))
                return
            for row in data:
                self.stdout.write(
                    f"{row['chain']:<6} {row['address']} {row['user_id']} {row['currency']}"
                )

    def _user(self, value: str) -> uuid.UUID:
        try:
            return uuid.UUID(value)
        except ValueError:
            raise CommandError("--user: not a UUID") from None

    def _known(self, options) -> int:
        if not Withdrawal.objects.filter(pk=options["withdrawal"]).exists():
            raise CommandError(f"withdrawal: no withdrawal {options['withdrawal']}")
        return options["withdrawal"]

    def _report(self, report, as_json: bool) -> None:
        data = dataclasses.asdict(report)
        self.stdout.write(json_text(data) if as_json else plain(data))

    def _sandbox(self, options) -> None:
        try:
            balance = (
                Decimal(0)
                if options["wallet_balance"] == "0"
                else amount_parse(options["wallet_balance"], "USDC")
            )
        except InvalidAmount as exc:
            raise CommandError(f"--wallet-balance: {exc}") from None
        try:
            served = CircleSandbox(
                port=options["port"], subscriber=options["subscriber"], settle=options["settle"]
            )
        except OSError as exc:  # the port is taken, or below 1024 without the right
            raise CommandError(
                f"--port: cannot listen on 127.0.0.1:{options['port']}: {exc.strerror}"
            ) from None
        with served as sandbox:
            sandbox.wallet_balance = balance
            self.stdout.write(
                f"Circle sandbox at {sandbox.base_url}, signing key id {sandbox.key_id}"
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


def _address_data(row) -> dict:
    return {field: getattr(row, field) for field in ADDRESS_FIELDS}

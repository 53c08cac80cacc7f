"""`python manage.py onchain ...`: replay a stored Circle notification; run the Circle sandbox."""

import time

from django.core.management.base import BaseCommand, CommandError, CommandParser

from cutover.exceptions import CutoverError
from onchain.exceptions import OnchainError
from onchain.models import CircleNotification
from onchain.sandbox import CircleSandbox
from onchain.services import notification_process


class Command(BaseCommand):
    help = "The on-chain engine: replay a stored Circle notification, or run the Circle sandbox."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        replay = sub.add_parser("replay", help="process a stored notification again (idempotent)")
        replay.add_argument("notification_id", help="Circle's notificationId")
        sandbox = sub.add_parser(
            "sandbox",
            help="serve the Circle sandbox (public-key endpoint) until interrupted; point "
            "CIRCLE_API_BASE_URL at it",
        )
        sandbox.add_argument("--port", type=int, default=8099, help="port on 127.0.0.1 (8099)")

    def handle(self, *args, **options) -> None:
        if options["action"] == "replay":
            if not CircleNotification.objects.filter(
                notification_id=options["notification_id"]
            ).exists():
                raise CommandError(
                    f"notification_id: no stored notification {options['notification_id']}"
                )
            try:
                status = notification_process(notification_id=options["notification_id"])
            except (OnchainError, CutoverError) as exc:
                raise CommandError(f"not applied: {exc}") from None
            self.stdout.write(f"{options['notification_id']}: {status}")
            return
        with CircleSandbox(port=options["port"]) as sandbox:
            self.stdout.write(
                f"Circle sandbox at {sandbox.base_url}, signing key id {sandbox.key_id}"
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass

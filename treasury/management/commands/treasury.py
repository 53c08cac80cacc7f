"""`python manage.py treasury ...`: a settlement cycle now, the monitor now, the buffers, a
disputed conversion resolved, a refunded one reversed, the Due sandbox."""

import dataclasses
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from cutover.actors import Actor
from gateway.commands import (
    ascii_word,
    json_text,
    plain,
    port_number,
    reason_text,
    record_id,
    written_reason,
)
from treasury.cycle import settlement_cycle_run
from treasury.exceptions import TreasuryError
from treasury.models import ConversionJob
from treasury.monitor import monitor_run
from treasury.operators import job_resolve, job_reverse
from treasury.sandbox import DueSandbox
from treasury.selectors import buffer_status_list
from treasury.submission import jobs_submit


class Command(BaseCommand):
    help = (
        "The treasury engine: settlement cycle, monitor, buffer status, resolving a disputed "
        "conversion, reversing one the provider refunded, Due sandbox. A cycle "
        "run here is recorded as triggered by cli:<user>; --json prints what a script reads. "
        "Exit status: 0 done, 1 refused or failed, 2 a bad argument."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        cycle = sub.add_parser(
            "cycle", help="one settlement cycle now (skipped if one is running), then submit"
        )
        cycle.add_argument("--json", action="store_true", help="print the result as JSON")
        monitor = sub.add_parser("monitor", help="submit due jobs, poll open ones, time out")
        monitor.add_argument("--json", action="store_true", help="print the result as JSON")
        status = sub.add_parser("status", help="the buffers against their thresholds")
        status.add_argument("--json", action="store_true", help="print JSON")
        reverse = sub.add_parser(
            "reverse",
            help="reverse a completed conversion job Due refunded (its transfer "
            "refund_processed), once the source money is seen back: its posting mirrored, "
            "audited",
        )
        reverse.add_argument("job", type=record_id, metavar="JOB", help="the job's id")
        reverse.add_argument(
            "--reason", type=reason_text, required=True, help="why (kept in the audit)"
        )
        reverse.add_argument("--json", action="store_true", help="print the job as JSON")
        resolve = sub.add_parser(
            "resolve",
            help="resolve a disputed conversion job with Due's answer now: processed, booked as "
            "Due made it; failed or refunded, failed; audited",
        )
        resolve.add_argument("job", type=record_id, metavar="JOB", help="the job's id")
        resolve.add_argument(
            "--reason", type=reason_text, required=True, help="why (kept in the audit)"
        )
        resolve.add_argument("--json", action="store_true", help="print the job as JSON")
        sandbox = sub.add_parser(
            "sandbox",
            help="serve the Due sandbox until interrupted (DUE_API_KEY/DUE_API_SECRET); point "
            "DUE_API_BASE_URL at it",
        )
        sandbox.add_argument(
            "--port", type=port_number, default=8098, help="port on 127.0.0.1, 1..65535 (8098)"
        )
        sandbox.add_argument(
            "--callback",
            type=ascii_word(2048),
            default=None,
            help="URL to deliver its webhooks to (transfer.status_changed), signed by the key it "
            "prints",
        )

    def handle(self, *args, **options) -> None:
        try:
            getattr(self, f"_{options['action']}")(options)
        except TreasuryError as exc:
            raise CommandError(str(exc)) from None

    def _cycle(self, options) -> None:
        result = settlement_cycle_run(triggered_by=Actor.command_line().name)
        data = dataclasses.asdict(result)
        if not result.skipped:
            data["submitted"] = dataclasses.asdict(jobs_submit())
        if options["json"]:
            self.stdout.write(json_text(data))
            return
        if result.skipped:
            self.stdout.write(f"skipped: {result.skipped}")
            return
        if result.note:
            self.stdout.write(f"cycle {result.cycle_id}: {result.note}")
        for buffer in result.buffers:
            self.stdout.write(
                f"{buffer['currency']:<5} {buffer['balance']:>20} {buffer['state']:<10} "
                f"{buffer['action']}"
            )
        self.stdout.write(f"cycle {result.cycle_id}: {plain(data['submitted'])}")

    def _monitor(self, options) -> None:
        data = dataclasses.asdict(monitor_run())
        self.stdout.write(json_text(data) if options["json"] else plain(data))

    def _status(self, options) -> None:
        rows = [dataclasses.asdict(reading) for reading in buffer_status_list()]
        if options["json"]:
            self.stdout.write(json_text(rows))
            return
        for row in rows:
            self.stdout.write(
                f"{row['currency']:<5} {row['balance']:>20} min {row['minimum']} target "
                f"{row['target']} max {row['maximum']}: {row['state']}"
            )

    def _reverse(self, options) -> None:
        self._job_act(options, job_reverse, "reversing a conversion")

    def _resolve(self, options) -> None:
        self._job_act(options, job_resolve, "resolving a disputed conversion")

    def _job_act(self, options, service, what: str) -> None:
        reason = written_reason(options["reason"], what)
        try:
            job = service(job_id=options["job"], actor=Actor.command_line(), reason=reason)
        except ConversionJob.DoesNotExist:
            raise CommandError(f"JOB: no conversion job {options['job']}") from None
        data = {
            "job": job.pk,
            "status": job.status,
            "target_amount": job.target_amount,
            "ledger_transaction_id": job.ledger_transaction_id,
            "reversal_transaction_id": job.reversal_transaction_id,
        }
        self.stdout.write(json_text(data) if options["json"] else plain(data))

    def _sandbox(self, options) -> None:
        if not settings.DUE_API_KEY or not settings.DUE_API_SECRET:
            raise CommandError("DUE_API_KEY and DUE_API_SECRET must be set for the sandbox")
        try:
            served = DueSandbox(
                port=options["port"],
                api_key=settings.DUE_API_KEY,
                api_secret=settings.DUE_API_SECRET,
                callback=options["callback"],
            )
        except OSError as exc:  # the port is taken, or below 1024 without the right
            raise CommandError(
                f"--port: cannot listen on 127.0.0.1:{options['port']}: {exc.strerror}"
            ) from None
        with served as sandbox:
            self.stdout.write(f"Due sandbox at {sandbox.base_url}")
            one_line = sandbox.public_key_pem.strip().replace("\n", "\\n")
            self.stdout.write(f"its webhooks' key: DUE_WEBHOOK_PUBLIC_KEY='{one_line}'")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass

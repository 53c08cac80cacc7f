"""`python manage.py aws provision|publish`: AWS as seed 001's deployment checklist sets it up,
and its alarms' metrics published by hand."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from aws.exceptions import AwsError
from aws.services import aws_provision, metrics_publish
from gateway.commands import json_text


class Command(BaseCommand):
    help = (
        "`provision` creates what the deployment checklist creates in AWS, idempotently: the "
        "secrets the settings read from AWS Secrets Manager (AWS_SECRETS_PREFIX + the name in "
        "kebab case), each only when absent and only from the variable of the same name ("
        + ", ".join(settings.SECRET_SETTINGS)
        + "; an existing secret is never changed; one absent without its variable is listed "
        "and the exit status is 1), the CloudWatch log groups and the four CloudWatch alarms "
        "with the checklist's parameters (the actions an operator attached to one are kept). "
        "`publish` sends the alarms' metrics to CloudWatch now, as the Celery beat does every "
        "minute (each minute's counts once). AWS_ENDPOINT_URL and AWS_DEFAULT_REGION say where; "
        "credentials come from boto3's usual chain."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        provision = sub.add_parser(
            "provision", help="create the secrets, log groups and alarms that are absent"
        )
        provision.add_argument("--json", action="store_true", help="print JSON")
        publish = sub.add_parser("publish", help="publish the alarms' metrics to CloudWatch now")
        publish.add_argument("--json", action="store_true", help="print JSON")

    def handle(self, *args, **options):
        try:
            if options["action"] == "provision":
                self._provision(options["json"])
            else:
                self._publish(options["json"])
        except AwsError as exc:
            raise CommandError(str(exc)) from None

    def _provision(self, as_json: bool) -> None:
        provisioned = aws_provision()
        absent = [item for item in provisioned if item.outcome == "absent"]
        if as_json:
            rows = [
                {"kind": p.kind, "name": p.name, "outcome": p.outcome}
                | ({"variable": p.variable} if p.variable else {})
                for p in provisioned
            ]
            self.stdout.write(json_text({"provisioned": rows, "absent": len(absent)}))
        else:
            if not settings.AWS_SECRET_IDS:
                self.stdout.write("secrets: none (AWS_SECRETS_PREFIX is not set)")
            for item in provisioned:
                self.stdout.write(f"{item.kind}  {item.name}  {item.outcome}")
        if absent:
            missing = ", ".join(f"{item.name} (set {item.variable})" for item in absent)
            raise CommandError(f"absent from AWS Secrets Manager: {missing}", returncode=1)

    def _publish(self, as_json: bool) -> None:
        publication = metrics_publish()
        if publication.busy:
            raise CommandError("another publication is running; nothing was sent", returncode=1)
        if as_json:
            report = {
                "counted_from": publication.counted_from.isoformat(),
                "counted_until": publication.counted_until.isoformat(),
                "dropped_minutes": publication.dropped_minutes,
                "data_points": [
                    {"metric": p.metric, "timestamp": p.timestamp.isoformat(), "value": p.value}
                    for p in publication.data_points
                ],
            }
            self.stdout.write(json_text(report))
            return
        line = (
            f"counted {publication.counted_from:%Y-%m-%d %H:%M} to "
            f"{publication.counted_until:%H:%M} UTC"
        )
        if publication.dropped_minutes:
            line += f"; {publication.dropped_minutes} older minutes dropped (past the backlog)"
        self.stdout.write(line)
        for point in publication.data_points:
            self.stdout.write(f"{point.metric}  {point.timestamp:%Y-%m-%d %H:%M:%S}  {point.value}")

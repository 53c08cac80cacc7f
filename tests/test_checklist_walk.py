"""The deployment checklist (deploy/checklist/, the seed's copy) walked top to bottom on this
machine, as the README's deploy section (deploy/README.md, "Walking the checklist") tells an
operator to walk it.

Every checkbox of the checklist is a step, read from the file in its order. Each step is either
walked here (`WALKS`: our equivalent of its command, SQL, curl or manifest, run against one
scratch database, this project's web on a loopback port, the Circle and Due sandboxes and AWS as
a moto server, asserting what the checklist expects) or listed in `NOT_RUNNABLE_HERE` with the
reason. A step added, renamed or removed in the checklist fails
`test_every_step_of_the_checklist_is_walked_or_listed`.

One world, in the checklist's order: the legacy store's users backed up; the migrations tested;
AWS provisioned; the backfill, custody from Circle and Due, the treasury's first cycle, a deposit
and a withdrawal through Circle; the phases advanced by `cutover advance` past gates that refuse
until the time they ask has passed (the phase's start moved back: the one liberty taken with
time); the legacy store archived 90 days into cutover; the alarms, dashboards and alerts against
what /metrics and the database hold; the rollback procedures from there (the archive is the point
of no return) and the pre-deployment backup restored. Commands whose exit status, log or start-up
is the point run as operators run them, `python manage.py ...` in a process of their own under
the production settings; the others through `call_command`."""

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection
from django.db.migrations.loader import MigrationLoader
from django.db.models import F
from django.urls import resolve

import config.gunicorn
from custody.tasks import custody_reconcile_task
from cutover.models import (
    BalanceMutation,
    Discrepancy,
    LegacyBalance,
    OperatorAudit,
    PhaseAudit,
    PhaseState,
)
from cutover.phases import FLAG_NAMES, Phase, flags_of
from cutover.selectors import ledger_write_stats, phase_state
from cutover.tasks import reconciliation_task
from ledger.selectors import system_balance
from onchain.models import CircleNotification, Withdrawal
from onchain.notifications import CHECKLIST_ALIASES
from onchain.sandbox import CircleSandbox
from rehearsal import runtime
from tests.aws.conftest import checklist_commands
from tests.aws.test_publish import datapoints
from tests.conftest import Aws
from tests.cutover.factories import legacy_user
from tests.test_checklist_drills import (
    backup_take,
    database_content,
    latest_migrations,
    ledger_verified,
    restored_copy,
)
from tests.test_configuration import ROOT, env_example, strong_secrets
from tests.test_deploy_manifests import (
    K8S,
    app_container,
    by_kind,
    container_environment,
    kustomize,
    rendered_in_phase,
    validation_errors,
    workloads,
)
from tests.test_deployment_checklist import (
    BUFFER_STATUS,
    CHECKLIST,
    INTEGRITY,
    PROVIDERS,
    RECENT_JOBS,
    RECONCILIATION,
    RELATIONS_LISTED,
    SYSTEM_ACCOUNTS,
    SYSTEM_BALANCES,
    THRESHOLDS,
    relations_listed,
    rows,
    statement,
    user_balance_plan,
)
from tests.test_metrics import (
    ALERTS,
    DASHBOARDS,
    exported_names,
    expression_selectors,
    sample,
    scrape,
)
from tests.treasury.factories import RECIPIENT_ENVIRONMENT, RECIPIENTS
from treasury.models import BufferThreshold, SettlementCycle
from treasury.sandbox import DueSandbox
from treasury.tasks import settlement_cycle_task

REASON = "checklist walk"
WALLET = "1000000001"
DEPLOY = K8S.parent  # where the checklist's `kubectl apply -f k8s/...` runs
# What the custodians hold when the rollout starts: each buffer at its band's target.
CIRCLE_WALLET_USDC = Decimal("20000")
DUE_USD = Decimal("50000")
DEPOSIT_ADDRESS = "0x" + "5e" * 20
WITHDRAWAL_ADDRESS = "0x" + "7a" * 20
# The file each `kubectl apply -f` of the checklist applies: the environment's rendered overlay.
APPLIED = {
    "k8s/deployment.yaml": "production",
    "k8s/staging/deployment.yaml": "staging",
    "k8s/production/deployment.yaml": "production",
}
# Each panel the checklist names, as our dashboards (deploy/grafana/) title it.
PANELS = {
    "Ledger": {
        "Transaction volume": "Transaction volume (per second, by kind)",
        "Account balances": "System account balances (buffers)",
        "Write latency": "Write latency (p50, p99)",
        "Error rate": "Error rate",
    },
    "Treasury": {
        "Buffer levels": "Buffer levels against their band",
        "Conversion jobs status": "Conversion jobs (per hour)",
        "Provider health": "Provider health (1 healthy)",
        "Settlement cycle duration": "Settlement cycle duration (p50, p99)",
    },
    "Onchain": {
        "Deposits processed": "Deposits credited (per minute)",
        "Withdrawals executed": "Withdrawals",
        "Webhook latency": "Webhook latency (p50, p99) and outcomes",
        "Buffer discrepancies": "Buffer discrepancies and waiting notifications",
    },
}
# Each alert the checklist asks PagerDuty for, as deploy/prometheus/alerts.yml names it.
PAGED_ALERTS = {
    "Ledger write failures": "LedgerWriteFailures",
    "Critical buffer low": "LowSystemBuffer",
    "High discrepancy rate": "LedgerHighDiscrepancyRate",
}
WARNING_ALERTS = {
    "Conversion job failures": "TreasuryConversionFailures",
    "Performance degradation": "ApiLatencyHigh",
    "Buffer below target": "BufferBelowTarget",
}

A_PERSON = "a person's work, not a machine's"
SIGN_OFF = "a person's sign-off"
NOT_RUNNABLE_HERE = {
    ("Pre-Deployment Verification", "All tests pass"): (
        "the suite this walk is one test of: `scripts/test` (CI) runs it whole"
    ),
    ("Pre-Deployment Verification", "No golangci-lint errors"): (
        "the gate around this suite: `scripts/test` runs `ruff check .` and `ruff format "
        "--check .` before it, and tests/test_architecture.py the layers contract (lint-imports)"
    ),
    ("Phase 4", "Run load test"): (
        "k6 and the checklist's load-test-balance-api.js are not ours; our load test is "
        "`manage.py bench reads --rps 200` against gunicorn (README, figures), minutes of a "
        "quiet machine; the read p99 the gate measures is walked at 'Verify response times "
        "acceptable'"
    ),
    ("Phase 4", "Monitor for 7 days"): (
        "seven days of production traffic; what watches them is walked under 'Monitoring & "
        "Alerting Setup'"
    ),
    ("Post-Deployment", "Verify all features working"): (
        f"{A_PERSON} on production; each feature is walked in the phases above"
    ),
    ("Post-Deployment", "Compare ledger vs legacy balances"): (
        "after Phase 5's archive (where the walk is by then) the legacy store is empty and "
        "closed; while both stores were written this was `cutover reconcile` and the manual "
        "reconciliation SQL, walked in Phase 4"
    ),
    ("Post-Deployment", "Review performance metrics"): A_PERSON,
    ("Post-Deployment", "Fix any discovered issues"): A_PERSON,
    ("Post-Deployment", "Review alert thresholds"): A_PERSON,
    ("Post-Deployment", "Optimize slow queries if needed"): A_PERSON,
    ("Post-Deployment", "Update documentation"): A_PERSON,
    ("Post-Deployment", "Train support team"): A_PERSON,
    ("Post-Deployment", "Performance optimization"): A_PERSON,
    ("Post-Deployment", "Plan for legacy deprecation"): (
        f"{A_PERSON}; the deprecation itself is walked (Phase 4.4's comment, Phase 5's archive)"
    ),
    ("Post-Deployment", "Document lessons learned"): A_PERSON,
    ("Sign-Off", "Code reviewed and approved"): SIGN_OFF,
    ("Sign-Off", "Architecture validated"): (
        f"{SIGN_OFF}; the layers contract is tests/test_architecture.py"
    ),
    ("Sign-Off", "Tests passing"): f"{SIGN_OFF}; the suite is `scripts/test`",
    ("Sign-Off", "Infrastructure ready"): f"{SIGN_OFF} on a real cluster and AWS account",
    ("Sign-Off", "Monitoring configured"): (
        f"{SIGN_OFF}; what it signs is walked under 'Monitoring & Alerting Setup'"
    ),
    ("Sign-Off", "Rollback tested"): (
        f"{SIGN_OFF}; what it signs is walked under 'Rollback Procedures'"
    ),
    ("Sign-Off", "Feature flags configured"): (
        f"{SIGN_OFF}; the flags are walked in 'Configuration' and each phase"
    ),
    ("Sign-Off", "Rollout plan approved"): SIGN_OFF,
    ("Sign-Off", "Support team notified"): SIGN_OFF,
    ("Sign-Off", "Security review completed"): SIGN_OFF,
    ("Sign-Off", "Secrets properly stored"): (
        f"{SIGN_OFF}; the secrets' way from AWS Secrets Manager is walked in 'Configuration'"
    ),
    ("Sign-Off", "Audit logging enabled"): (
        f"{SIGN_OFF}; the audit trails are walked at 'Full system audit'"
    ),
}


# --- the checklist's steps -------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    section: str  # the `##` heading up to its colon: "Phase 1", "Rollback Procedures", ...
    title: str
    text: str  # what follows its checkbox up to the next one: commands, SQL, bullets

    @property
    def key(self) -> tuple[str, str]:
        return (self.section, self.title)

    def assignments(self) -> dict[str, str]:
        """The `NAME=value` lines of its commands (the environment it sets)."""
        return dict(re.findall(r"^\s*([A-Z][A-Z0-9_]+)=(\S+)", self.text, re.MULTILINE))

    def bullets(self) -> list[str]:
        return [
            bullet.replace("`", "").strip()
            for bullet in re.findall(r"^\s+- (.+)$", self.text, re.MULTILINE)
        ]

    def applied(self) -> str:
        """The manifest its `kubectl apply -f` applies."""
        (path,) = re.findall(r"kubectl apply -f (\S+)", self.text)
        return path


def checklist_steps() -> list[Step]:
    steps, section, title, text = [], "", None, []

    def close() -> None:
        if title is not None:
            steps.append(Step(section, title, "\n".join(text)))

    for line in CHECKLIST.read_text().splitlines():
        checkbox = re.match(r"^- \[ \] (?:\*\*(.+)\*\*|(.+))$", line)
        if checkbox or line.startswith("#"):
            close()
            title, text = None, []
        if line.startswith("## "):
            section = line[3:].split(":")[0].strip()
        elif checkbox:
            title = checkbox[1] or checkbox[2]
        elif title is not None:
            text.append(line)
    close()
    return steps


WALKS: dict[tuple[str, str], Callable[["World", Step], None]] = {}


def walks(section: str, title: str):
    def register(function: Callable[["World", Step], None]):
        assert (section, title) not in WALKS, (section, title)
        WALKS[(section, title)] = function
        return function

    return register


def test_every_step_of_the_checklist_is_walked_or_listed():
    keys = [step.key for step in checklist_steps()]
    assert len(keys) == len(set(keys)), "two steps share a section and a title"
    assert not set(WALKS) & set(NOT_RUNNABLE_HERE)
    unknown = (set(WALKS) | set(NOT_RUNNABLE_HERE)) - set(keys)
    assert not unknown, f"not steps of the checklist (renamed or removed?): {unknown}"
    missing = [key for key in keys if key not in WALKS and key not in NOT_RUNNABLE_HERE]
    assert not missing, f"steps neither walked nor listed as not runnable here: {missing}"


# --- the world the walk runs in --------------------------------------------------------------


@dataclass
class World:
    url: str  # this project's web, in threads of this process, on the walk's database
    circle: CircleSandbox
    due: DueSandbox
    aws: Aws
    secrets: dict[str, str]
    operator_environment: dict[str, str]
    users: dict[str, uuid.UUID]
    tmp: Path
    api_token: str = ""
    backup: Path | None = None
    published: dict = field(default_factory=dict)
    scraped_at_start: str = ""  # /metrics before the walk (counters are per process)
    log_lines: list[dict] = field(default_factory=list)

    @property
    def port(self) -> int:
        return urlsplit(self.url).port

    @property
    def webhook(self) -> str:
        return f"{self.url}/webhooks/circle/transfers"


@pytest.fixture
def world(transactional_db, aws, aws_environment, settings, tmp_path) -> Iterator[World]:
    """Production before the rollout: the legacy store's users (two in USDC, one in USD) on a
    migrated scratch database, Circle holding 20,000 USDC in our wallet and Due 50,000 USD; the
    web on a loopback port with the secrets the operators' processes hold too."""
    secrets = strong_secrets()
    with ExitStack() as stack:
        database = stack.enter_context(runtime.scratch_database("walk"))
        url = stack.enter_context(runtime.http_server())
        circle = stack.enter_context(
            CircleSandbox(
                wallet_id=WALLET,
                subscriber=f"{url}/webhooks/circle/transfers?token="
                f"{secrets['CIRCLE_WEBHOOK_SECRET']}",
            )
        )
        due = stack.enter_context(
            DueSandbox(
                api_key=secrets["DUE_API_KEY"], api_secret=secrets["DUE_API_SECRET"], settle=None
            )
        )
        circle.wallet_balance = CIRCLE_WALLET_USDC
        due.balances["USD"] = DUE_USD
        for name in settings.SECRET_SETTINGS:
            setattr(settings, name, secrets[name])
        settings.CIRCLE_WALLET_ID = WALLET
        settings.CIRCLE_API_BASE_URL = circle.base_url
        settings.DUE_API_BASE_URL = due.base_url
        settings.DUE_RECIPIENTS = RECIPIENTS
        users = {
            "alice": legacy_user("100.00"),
            "bob": legacy_user("250.50"),
            "carol": legacy_user("40.00", currency="USD"),
        }
        operator_environment = {
            **env_example(),
            **secrets,
            **aws_environment,
            "CIRCLE_WALLET_ID": WALLET,
            "DATABASE_URL": runtime.database_url(database),
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "CIRCLE_API_BASE_URL": circle.base_url,
            "DUE_API_BASE_URL": due.base_url,
            **RECIPIENT_ENVIRONMENT,
        }
        walk = World(url, circle, due, aws, secrets, operator_environment, users, tmp_path)
        walk.scraped_at_start = metrics(walk)
        yield walk


def operator(world: World, *args: str, expect: int = 0, **environment: str):
    """`python manage.py ...` as an operator runs it in a pod (`kubectl exec
    deployment/stack-service -- ...`): a process of its own under the production settings; its
    JSON log lines are kept for 'Review logs for errors'."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **world.operator_environment, **environment},
        capture_output=True,
        text=True,
        timeout=120,
    )
    world.log_lines += [json.loads(line) for line in result.stderr.splitlines() if line[:1] == "{"]
    assert result.returncode == expect, (args, result.returncode, result.stderr[-3000:])
    return result


def command(*args: str) -> Any:
    """`manage.py ...` in this process (its JSON, with --json)."""
    out = StringIO()
    call_command(*args, stdout=out)
    return json.loads(out.getvalue()) if "--json" in args else out.getvalue()


def refused(*args: str) -> str:
    """`manage.py ...` refused: exit status 1, saying why."""
    with pytest.raises(CommandError) as refusal:
        command(*args)
    assert refusal.value.returncode == 1
    return str(refusal.value)


def http(
    world: World,
    method: str,
    path: str,
    body: dict | None = None,
    *,
    token: str | None = None,
    headers: dict | None = None,
) -> tuple[int, Any]:
    """One request to the web over a socket: the status and the JSON answered (None if none)."""
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(  # noqa: S310 (the walk's own web, over http)
        world.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers=sent,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    return status, json.loads(raw) if raw else None


def head(url: str) -> int:
    request = urllib.request.Request(url, method="HEAD")  # noqa: S310 (the walk's own web)
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return response.status


def api(world: World, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
    """The balance API as our payments service calls it (its client's token; a fresh
    Idempotency-Key for each write)."""
    headers = {"Idempotency-Key": str(uuid.uuid4())} if method == "POST" else {}
    return http(world, method, path, body, token=world.api_token, headers=headers)


def credit(world: World, user: str, amount: str) -> tuple[int, Any]:
    return api(
        world,
        "POST",
        f"/api/v1/users/{world.users[user]}/balance-mutations",
        {"direction": "credit", "amount": amount, "currency": "USDC", "reason": REASON},
    )


def balances(user_id: uuid.UUID) -> tuple[Decimal | None, Decimal | None]:
    """The user's (legacy, ledger) balance."""
    legacy = LegacyBalance.objects.filter(user_id=user_id).values_list("buying_power", flat=True)
    ledger = rows(f"SELECT balance FROM v_user_balances WHERE user_id = '{user_id}'")
    return (legacy.first(), ledger[0]["balance"] if ledger else None)


def metrics(world: World) -> str:
    return scrape(world.port, world.secrets["METRICS_TOKEN"])


def time_passes(duration: timedelta) -> None:
    """The phase began `duration` earlier: what waiting that long in it shows the gates."""
    PhaseState.objects.filter(pk=1).update(entered_at=F("entered_at") - duration)


def gates() -> dict:
    """`cutover gates --json`: its evidence, met or not (not met, it also exits 1)."""
    out = StringIO()
    try:
        call_command("cutover", "gates", "--json", stdout=out)
    except CommandError as exc:
        assert exc.returncode == 1 and "not met" in str(exc), exc
    evidence = json.loads(out.getvalue())
    return {**evidence, "checks": {check["name"]: check for check in evidence["checks"]}}


def flag_values(flags: dict[str, bool | str]) -> dict[str, str]:
    """Flags as the environment spells them."""
    return {
        name: str(value).lower() if isinstance(value, bool) else value
        for name, value in flags.items()
    }


def own_environment(workload: dict) -> dict[str, str]:
    """A workload's own `env` entries, where the flags are (`kubectl set env` changes these)."""
    return {item["name"]: item["value"] for item in app_container(workload).get("env", [])}


def valid(resources: list[dict]) -> list[dict]:
    """The resources, each valid against its schema (tests/test_deploy_manifests.py)."""
    errors = {f"{r['kind']}/{r['metadata']['name']}": validation_errors(r) for r in resources}
    assert not any(errors.values()), errors
    return resources


def deployed_in_phase(step: Step, phase: Phase) -> None:
    """The manifest the step applies, rendered with the phase's flags (k8s/phases/<phase>):
    valid, every workload holding them, the checklist's among them. (The flags seed a new
    database's phase; a running one changes through `cutover advance`, which each step then
    runs.)"""
    flags = flag_values(flags_of(phase))
    checklist = {n: v for n, v in step.assignments().items() if n in FLAG_NAMES}
    assert checklist.items() <= flags.items(), checklist
    resources = valid(rendered_in_phase(APPLIED[step.applied()], phase.value))
    for name, workload in workloads(resources).items():
        own = own_environment(workload)
        assert {n: own[n] for n in flags} == flags, name


def status_has_the_flags(step: Step) -> None:
    """`cutover status` names the phase's flags: the checklist's values among them."""
    flags = flag_values(command("cutover", "status", "--json")["flags"])
    wanted = {n: v for n, v in step.assignments().items() if n in FLAG_NAMES}
    assert {n: flags[n] for n in wanted} == wanted


def engine_switch_deployed(step: Step, switch: str) -> None:
    """The engine switch is every workload's own env entry in the file the step applies (so an
    edit of the overlay's engines.yaml or `kubectl set env` reaches the worker, where the
    engine's tasks run); staging's rendered file has it on; and so has this process, where the
    walk runs the engines' tasks."""
    ((name, value),) = [(n, v) for n, v in step.assignments().items() if n == switch]
    production = list(yaml.safe_load_all((DEPLOY / step.applied()).read_text()))
    staging = list(yaml.safe_load_all((K8S / "staging" / "deployment.yaml").read_text()))
    for workload in workloads(production).values():
        assert name in own_environment(workload)
    for workload in workloads(staging).values():
        assert own_environment(workload)[name] == value
    setattr(settings, name, value == "true")


def metrics_exported(world: World, step: Step) -> None:
    """The series the checklist watches (its "CloudWatch metrics" are our Prometheus series)
    are on /metrics for the bearer of METRICS_TOKEN (a histogram by its family's name)."""
    body = metrics(world)
    exported = exported_names(body) | set(re.findall(r"^# TYPE (\S+) ", body, re.MULTILINE))
    missing = [name for name in step.bullets() if name not in exported]
    assert not missing, missing


# --- Pre-Deployment Verification ---------------------------------------------------------------


@walks("Pre-Deployment Verification", "Backup production database")
def backup(world: World, step: Step) -> None:
    assert "pg_dump $DATABASE_URL > backup_" in step.text
    world.backup = world.tmp / "backup_before_the_rollout.sql"
    world.backup.write_text(backup_take())
    dumped = world.backup.read_text()
    assert "CREATE TABLE public.balances" in dumped and "COPY public.balances" in dumped


@walks("Pre-Deployment Verification", "Test migrations on staging")
def migrations_tested(world: World, step: Step) -> None:
    """The migrate Job's `manage.py migrate` ran (the scratch database is migrated): `migrate
    --check`, what each new pod waits on, finds nothing left; the checklist's `\\dt` list the
    ledger's tables, its treasury names are views (`\\dv`)."""
    operator(world, "migrate", "--check")
    assert relations_listed() == RELATIONS_LISTED


@walks("Pre-Deployment Verification", "Test migration rollback")
def migration_rollback(world: World, step: Step) -> None:
    """`down 1`, `up`: each app's latest migration unapplied and applied again, losing nothing."""
    content = database_content()
    for app, (_, previous) in latest_migrations().items():
        call_command("migrate", app, previous, interactive=False, verbosity=0)
        call_command("migrate", interactive=False, verbosity=0)
    assert database_content() == content
    assert ledger_verified()["ok"] is True


@walks("Pre-Deployment Verification", "Verify data integrity")
def data_integrity(world: World, step: Step) -> None:
    system = rows(statement(SYSTEM_ACCOUNTS))
    assert {"usdc_buffer", "fiat_buffer"} <= {row["code"] for row in system}
    assert {row["user_id"] for row in system} == {None}
    thresholds = {
        row["currency"]: (row["minimum"], row["target"], row["maximum"])
        for row in rows(statement(THRESHOLDS))
    }
    seeded = {t.currency: (t.minimum, t.target, t.maximum) for t in BufferThreshold.objects.all()}
    assert thresholds and thresholds == seeded
    assert [row["code"] for row in rows(statement(PROVIDERS))] == ["due"]


@walks("Pre-Deployment Verification", "Build compiles successfully")
def build(world: World, step: Step) -> None:
    """The image's build is `pip install` and `collectstatic` (deploy/Containerfile); what
    `go build` proves, that every module loads together, is Django's system check (settings,
    apps, models, URLs, admin)."""
    assert command("check") == "System check identified no issues (0 silenced).\n"


@walks("Pre-Deployment Verification", "Environment variables configured")
def environment_configured(world: World, step: Step) -> None:
    """Every variable the checklist sets reaches every process of the production manifest: the
    secrets from the Secret AWS Secrets Manager fills, the others with the checklist's values
    (the phase flags as Phase 4.1 sets them: rendered in shadow)."""
    resources = valid(rendered_in_phase("production", Phase.SHADOW.value))
    for name, workload in workloads(resources).items():
        environment = container_environment(resources, app_container(workload))
        for variable, value in step.assignments().items():
            expected = None if value == "<secret>" else value
            assert environment[variable] == expected, (name, variable)


@walks("Pre-Deployment Verification", "Secrets stored in AWS Secrets Manager")
def secrets_stored(world: World, step: Step) -> None:
    """`aws provision` stores the secrets the settings read (the checklist's two among them)
    from the operator's environment; the other names the ExternalSecret reads are created by
    hand (deploy/README.md). A pod's environment made as External Secrets Operator makes it,
    from AWS, passes the production settings and `check --deploy`."""
    report = json.loads(
        operator(world, "aws", "provision", "--json", AWS_SECRETS_PREFIX="stack-service/").stdout
    )
    assert report["absent"] == 0
    for command_flags in checklist_commands("secretsmanager create-secret"):
        assert command_flags["name"] in step.text
        stored = world.aws.secretsmanager.get_secret_value(SecretId=command_flags["name"])
        variable = command_flags["name"].removeprefix("stack-service/").replace("-", "_").upper()
        assert stored["SecretString"] == world.secrets[variable]
    resources = valid(rendered_in_phase("production", Phase.LEGACY.value))
    (external,) = by_kind(resources, "ExternalSecret").values()
    by_hand = {
        "DJANGO_SECRET_KEY": world.secrets["DJANGO_SECRET_KEY"],
        "DATABASE_URL": world.operator_environment["DATABASE_URL"],
        "CIRCLE_WALLET_ID": WALLET,
    }
    for item in external["spec"]["data"]:
        if item["secretKey"] in by_hand:
            world.aws.secretsmanager.create_secret(
                Name=item["remoteRef"]["key"], SecretString=by_hand[item["secretKey"]]
            )
    pod = {
        item["secretKey"]: world.aws.secretsmanager.get_secret_value(
            SecretId=item["remoteRef"]["key"]
        )["SecretString"]
        for item in external["spec"]["data"]
    }
    web = app_container(by_kind(resources, "Deployment")["stack-service"])
    for name, value in container_environment(resources, web).items():
        if value is not None and name != "PROMETHEUS_MULTIPROC_DIR":
            pod.setdefault(name, value)
    system = {
        name: os.environ[name] for name in ("PATH", "HOME", "PYTHONPATH") if name in os.environ
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={**system, **pod},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@walks("Pre-Deployment Verification", "Feature flags configured")
def feature_flags(world: World, step: Step) -> None:
    """The checklist's values are staging's with its engines on and Phase 4.1's flags: every
    workload's own env entries."""
    resources = valid(rendered_in_phase("staging", Phase.SHADOW.value))
    for name, workload in workloads(resources).items():
        own = own_environment(workload)
        assert {n: own[n] for n in step.assignments()} == step.assignments(), name


@walks("Pre-Deployment Verification", "Database connection pool sized appropriately")
def connection_pool(world: World, step: Step) -> None:
    """A process holds one connection (Django's, kept DB_CONN_MAX_AGE): a pod opens as many as
    it runs processes, within the checklist's DB_MAX_OPEN_CONNS."""
    limit = int(step.assignments()["DB_MAX_OPEN_CONNS"])
    resources = yaml.safe_load_all((K8S / "deployment.yaml").read_text())
    for name, workload in workloads(list(resources)).items():
        arguments = app_container(workload)["command"]
        if "python:config.gunicorn" in arguments:
            processes = config.gunicorn.workers * config.gunicorn.threads
        elif "--concurrency" in arguments:
            processes = int(arguments[arguments.index("--concurrency") + 1])
        else:
            processes = 1  # beat, the migrate Job
        assert processes <= limit, name


@walks("Pre-Deployment Verification", "Redis available for rate limiting")
def redis_available(world: World, step: Step) -> None:
    """Redis is the Celery broker here (limits are counted in PostgreSQL)."""
    assert "redis-cli -h $REDIS_HOST ping" in step.text
    assert redis.Redis.from_url(settings.CELERY_BROKER_URL).ping() is True


@walks("Pre-Deployment Verification", "CloudWatch log groups created")
def log_groups(world: World, step: Step) -> None:
    """Created by `aws provision` ('Secrets stored in AWS Secrets Manager')."""
    groups = world.aws.logs.describe_log_groups()["logGroups"]
    assert sorted(g["logGroupName"] for g in groups) == sorted(
        re.findall(r"--log-group-name (\S+)", step.text)
    )


# --- Phase 1: Ledger Foundation Deployment ---------------------------------------------------


def migrations_applied(*apps: str) -> None:
    loader = MigrationLoader(connection)
    for app in apps:
        nodes = {node for node in loader.graph.nodes if node[0] == app}
        assert nodes and nodes <= loader.applied_migrations.keys(), app


@walks("Phase 1", "Run migration 056 (ledger tables)")
def ledger_migrations(world: World, step: Step) -> None:
    migrations_applied("ledger")


@walks("Phase 1", "Run migration 057 (initial state)")
def initial_state(world: World, step: Step) -> None:
    """Currencies, system accounts and the first phase, seeded from the flags (legacy)."""
    migrations_applied("gateway", "cutover")
    assert {row["code"] for row in rows("SELECT code FROM ledger_currencies")} == {"USD", "USDC"}
    state = phase_state()
    assert (state.phase, state.kill_switch) == ("legacy", False)
    assert PhaseAudit.objects.get().action == "seed"


@walks("Phase 1", "Verify system accounts created")
def system_accounts(world: World, step: Step) -> None:
    listed = rows(statement(SYSTEM_BALANCES))
    assert {row["account_type"] for row in listed} >= {"usdc_buffer", "fiat_buffer"}
    assert {row["balance"] for row in listed} == {Decimal(0)}  # nothing booked yet


@walks("Phase 1", "Deploy application with ledger service enabled")
def deployed(world: World, step: Step) -> None:
    """`kubectl apply -f k8s/deployment.yaml` from deploy/: production's rendered overlay, as
    k8s/render writes it now, valid; the web (`rollout status deployment/stack-service`) and
    every Deployment wait for the migrate Job."""
    applied = DEPLOY / step.applied()
    assert applied.resolve() == K8S / "production" / "deployment.yaml"
    text = applied.read_text()
    assert text.split("\n", 1)[1] == kustomize(K8S / "overlays" / "production"), "run k8s/render"
    resources = valid(list(yaml.safe_load_all(text)))
    assert "stack-service" in by_kind(resources, "Deployment")
    assert "stack-service-migrate" in by_kind(resources, "Job")
    for deployment in by_kind(resources, "Deployment").values():
        (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert "manage.py migrate --check" in init["command"][-1]


@walks("Phase 1", "Verify ledger service initializes")
def ledger_service_ready(world: World, step: Step) -> None:
    """The probes the rollout waits on: /readyz (the database answers) and /healthz."""
    assert http(world, "GET", "/readyz") == (
        200,
        {"status": "ok", "checks": {"database": "ok"}},
    )
    assert http(world, "GET", "/healthz")[0] == 200


@walks("Phase 1", "Test ledger transaction creation")
def ledger_transactions(world: World, step: Step) -> None:
    """There is no test endpoint: the ledger's first transactions are the backfill's, each
    legacy user's balance posted against opening-balance equity (`cutover backfill`)."""
    report = command("cutover", "backfill", "--json")
    assert (report["postings"], report["users_pending_now"]) == (3, 0)
    for user in world.users.values():
        assert balances(user)[0] == balances(user)[1]
    assert balances(world.users["alice"]) == (Decimal("100.00"), Decimal("100.00"))
    assert ledger_verified()["ok"] is True


@walks("Phase 1", "Verify double-entry integrity")
def double_entry(world: World, step: Step) -> None:
    # The backfill posts one transaction per chunk and currency: 3 users, 2 currencies, 5 entries.
    assert rows("SELECT count(*) AS n FROM ledger_entries")[0]["n"] == 5
    assert rows(statement(INTEGRITY)) == []


@walks("Phase 1", "Check CloudWatch metrics")
def ledger_metrics(world: World, step: Step) -> None:
    metrics_exported(world, step)


# --- Phase 2: Treasury Engine Deployment -------------------------------------------------------


@walks("Phase 2", "Run migration 058 (treasury tables)")
def treasury_migrations(world: World, step: Step) -> None:
    migrations_applied("treasury")


@walks("Phase 2", "Verify providers and thresholds seeded")
def providers_and_thresholds(world: World, step: Step) -> None:
    assert [(r["code"], r["enabled"], r["healthy"]) for r in rows(statement(PROVIDERS))] == [
        ("due", True, True)
    ]
    assert {r["currency"] for r in rows(statement(THRESHOLDS))} == {"USD", "USDC"}


@walks("Phase 2", "Configure Due API credentials")
def due_credentials(world: World, step: Step) -> None:
    """`aws provision` stored stack-service/due-api-key from DUE_API_KEY; the checklist's
    `update-secret` puts the key Due gave (here: the sandbox's) as a new version."""
    secret_id = re.search(r"--secret-id (\S+)", step.text)[1]
    before = world.aws.secretsmanager.get_secret_value(SecretId=secret_id)
    world.aws.secretsmanager.update_secret(SecretId=secret_id, SecretString=world.due.api_key)
    after = world.aws.secretsmanager.get_secret_value(SecretId=secret_id)
    assert after["SecretString"] == world.due.api_key == settings.DUE_API_KEY
    assert after["VersionId"] != before["VersionId"]


@walks("Phase 2", "Deploy with treasury scheduler enabled")
def treasury_deployed(world: World, step: Step) -> None:
    """Before the scheduler runs, its buffers hold what the custodians hold (runbook:
    `custody open`, from Circle's wallet and Due's balance)."""
    engine_switch_deployed(step, "ENABLE_TREASURY_SCHEDULER")
    opened = command("custody", "open", "--reason", REASON, "--json")["custody"]
    assert {(row["currency"], row["source"], Decimal(row["reported"])) for row in opened} == {
        ("USDC", "circle", CIRCLE_WALLET_USDC),
        ("USD", "due", DUE_USD),
    }


@walks("Phase 2", "Verify treasury engine initializes")
def treasury_initialized(world: World, step: Step) -> None:
    status = {row["currency"]: row for row in command("treasury", "status", "--json")}
    assert {c: (Decimal(r["balance"]), r["state"]) for c, r in status.items()} == {
        "USDC": (CIRCLE_WALLET_USDC, "ok"),
        "USD": (DUE_USD, "ok"),
    }


@walks("Phase 2", "Verify scheduler starts")
def scheduler_started(world: World, step: Step) -> None:
    """Beat sends `treasury.settlement_cycle` every TREASURY_SCHEDULER_INTERVAL (5m) and the
    monitor every minute; the worker runs the cycle now that the switch is on."""
    schedule = settings.CELERY_BEAT_SCHEDULE
    assert schedule["treasury-settlement-cycle"]["task"] == "treasury.settlement_cycle"
    assert schedule["treasury-settlement-cycle"]["schedule"] == 300
    assert schedule["treasury-monitor"]["schedule"] == 60
    result = settlement_cycle_task.apply().get()
    assert result["cycle"] == SettlementCycle.objects.get().pk


@walks("Phase 2", "Check buffer status")
def buffer_status(world: World, step: Step) -> None:
    assert {r["currency"]: (r["balance"], r["state"]) for r in rows(statement(BUFFER_STATUS))} == {
        "USDC": (CIRCLE_WALLET_USDC, "ok"),
        "USD": (DUE_USD, "ok"),
    }


@walks("Phase 2", "Monitor first settlement cycle")
def first_cycle(world: World, step: Step) -> None:
    cycle = SettlementCycle.objects.get()
    assert (cycle.triggered_by, cycle.jobs_created, cycle.note) == ("celery", 0, "")
    assert cycle.finished_at is not None
    assert {b["currency"]: b["state"] for b in cycle.buffers} == {"USDC": "ok", "USD": "ok"}


@walks("Phase 2", "Verify no conversion jobs created (buffers healthy)")
def no_conversion_jobs(world: World, step: Step) -> None:
    assert rows(statement(RECENT_JOBS)) == []


@walks("Phase 2", "Manually trigger conversion job (testing)")
def cycle_triggered(world: World, step: Step) -> None:
    path = re.search(r"http://localhost:8080(\S+)", step.text)[1]
    assert http(world, "POST", path)[0] == 401
    status, answer = http(world, "POST", path, token=world.secrets["ADMIN_TOKEN"])
    assert status == 200, answer
    assert answer["jobs_created"] == [] and answer["submitted"]["submitted"] == 0
    assert SettlementCycle.objects.filter(triggered_by="api").count() == 1


@walks("Phase 2", "Check CloudWatch metrics")
def treasury_metrics(world: World, step: Step) -> None:
    metrics_exported(world, step)


# --- Phase 3: Onchain Engine Deployment --------------------------------------------------------


@walks("Phase 3", "Configure Circle webhook endpoint")
def webhook_endpoint(world: World, step: Step) -> None:
    """The URL is ours in production (its host allowed, its path the webhook's), answers
    Circle's check before subscribing, takes the three events, and refuses a delivery without
    CIRCLE_WEBHOOK_SECRET's token."""
    url = re.search(r"URL: (\S+)", "\n".join(step.bullets()))[1]
    production = list(yaml.safe_load_all((K8S / "deployment.yaml").read_text()))
    web = app_container(by_kind(production, "Deployment")["stack-service"])
    assert urlsplit(url).hostname in container_environment(production, web)[
        "DJANGO_ALLOWED_HOSTS"
    ].split(",")
    assert resolve(urlsplit(url).path).url_name == "circle-transfers"
    events = re.findall(r"transfers\.\w+", "\n".join(step.bullets()))
    assert set(events) == set(CHECKLIST_ALIASES)
    assert head(world.webhook) == 200
    body = CircleSandbox.transfer_notification(
        transfer_id=str(uuid.uuid4()), address=DEPOSIT_ADDRESS, amount="1.00"
    )
    status, answer = world.circle.deliver(world.webhook, body)
    assert (status, answer["error"]["field"]) == (401, "token")
    assert not CircleNotification.objects.exists()


@walks("Phase 3", "Test webhook signature verification")
def webhook_signature(world: World, step: Step) -> None:
    """The checklist's curl (with the subscriber URL's token, and the key id Circle sends with
    every signature): the made-up signature is refused, nothing is stored."""
    signature = re.search(r'X-Circle-Signature: ([^"]+)"', step.text)[1]
    body = json.loads(
        CircleSandbox.transfer_notification(
            transfer_id=str(uuid.uuid4()),
            address=DEPOSIT_ADDRESS,
            amount="1.00",
            notification_type="transfers.completed",
        )
    )
    status, answer = http(
        world,
        "POST",
        f"/webhooks/circle/transfers?token={world.secrets['CIRCLE_WEBHOOK_SECRET']}",
        body,
        headers={"X-Circle-Signature": signature, "X-Circle-Key-Id": world.circle.key_id},
    )
    assert (status, answer["error"]["field"]) == (401, "X-Circle-Signature"), answer
    assert not CircleNotification.objects.exists()


@walks("Phase 3", "Deploy with onchain engine enabled")
def onchain_deployed(world: World, step: Step) -> None:
    engine_switch_deployed(step, "ENABLE_ONCHAIN_ENGINE")


@walks("Phase 3", "Verify webhook routes registered")
def webhook_routes(world: World, step: Step) -> None:
    assert head(world.webhook) == 200


@walks("Phase 3", "Test deposit processing (testnet)")
def deposit(world: World, step: Step) -> None:
    """Through the Circle sandbox (Circle's wire format, signed): the address registered by
    the payments service, 25 USDC sent to it, the signed notification received and credited;
    in legacy the user's side goes to the legacy store, the buffer's to the ledger."""
    world.api_token = command(
        "cutover",
        "client",
        "--name",
        "payments",
        "--scopes",
        "read,credit,debit,withdraw,addresses",
        "--reason",
        REASON,
        "--json",
    )["token"]
    alice = world.users["alice"]
    address = {"address": DEPOSIT_ADDRESS, "chain": "ETH"}
    assert api(world, "POST", f"/api/v1/users/{alice}/deposit-addresses", address)[0] == 201
    buffer_before = system_balance(code="usdc_buffer")
    world.circle.deposit(address=DEPOSIT_ADDRESS, amount="25.00")
    assert CircleNotification.objects.get().status == "processed"  # the webhook received
    assert system_balance(code="usdc_buffer") == buffer_before + 25
    assert rows(statement(INTEGRITY)) == []
    status, reading = api(world, "GET", f"/api/v1/users/{alice}/balance")
    assert (status, reading["balance"], reading["source"]) == (200, "125.000000", "legacy")


@walks("Phase 3", "Test withdrawal execution (testnet)")
def withdrawal(world: World, step: Step) -> None:
    """Requested through the API, sent by the outbox worker (`onchain send`), executed by
    Circle, its completion notified: the transfer's id is kept (Circle's transfer carries the
    chain's hash)."""
    bob = world.users["bob"]
    order = {"amount": "50.00", "address": WITHDRAWAL_ADDRESS, "chain": "ETH"}
    status, answer = api(world, "POST", f"/api/v1/users/{bob}/withdrawals", order)
    assert (status, answer["status"]) == (201, "pending"), answer
    assert command("onchain", "send", "--json")["submitted"] == 1
    sent = Withdrawal.objects.get()
    transfer = world.circle.transfers[sent.circle_transfer_id]
    assert transfer["destination"]["address"] == WITHDRAWAL_ADDRESS
    world.circle.transfer_finish(sent.circle_transfer_id, "complete")
    (listed,) = command("onchain", "withdrawals", "--json")
    assert (listed["status"], listed["circle_transfer_id"]) == ("completed", transfer["id"])
    assert balances(bob)[0] == Decimal("200.50")


@walks("Phase 3", "Monitor buffer levels")
def buffer_levels(world: World, step: Step) -> None:
    path = re.search(r"http://localhost:8080(\S+)", step.text)[1]
    assert http(world, "GET", path)[0] == 401
    status, answer = http(world, "GET", path, token=world.secrets["ADMIN_TOKEN"])
    assert status == 200
    assert Decimal(answer["balance"]) == system_balance(code="usdc_buffer")
    assert Decimal(answer["balance"]) == world.circle.wallet_balance == Decimal("19975")
    assert answer["below_threshold"] is False


@walks("Phase 3", "Check CloudWatch metrics")
def onchain_metrics(world: World, step: Step) -> None:
    """The deposit and the withdrawal above counted."""
    metrics_exported(world, step)
    body = metrics(world)
    for counter in ("onchain_deposits_processed_total", "onchain_withdrawals_executed_total"):
        before = sample(world.scraped_at_start, counter) or 0
        assert sample(body, counter) == before + 1, counter


# --- Phase 4: Flow Integration (Shadow Mode) ---------------------------------------------------


@walks("Phase 4", "Deploy with shadow mode enabled")
def shadow(world: World, step: Step) -> None:
    """The runbook's legacy -> shadow: the backfill run again (the deposit and withdrawal made
    since), `cutover gates` all met, `cutover advance --to shadow`, logged."""
    deployed_in_phase(step, Phase.SHADOW)
    assert command("cutover", "backfill", "--json")["users_pending_now"] == 0
    evidence = gates()
    assert evidence["passed"] is True, evidence
    advanced = json.loads(
        operator(world, "cutover", "advance", "--to", "shadow", "--reason", REASON, "--json").stdout
    )
    assert (advanced["action"], advanced["from"], advanced["to"]) == ("advance", "legacy", "shadow")
    (line,) = [line for line in world.log_lines if line.get("action") == "advance"]
    assert (line["level"], line["to_phase"], line["audit_id"]) == (
        "INFO",
        "shadow",
        advanced["audit_id"],
    )
    status_has_the_flags(step)


@walks("Phase 4", "Monitor dual-write operations")
def dual_write(world: World, step: Step) -> None:
    status, _ = credit(world, "alice", "10.00")
    assert status == 201
    assert balances(world.users["alice"]) == (Decimal("135.00"), Decimal("135.00"))
    writes = command("cutover", "status", "--json")["ledger_writes_in_phase"]
    assert (writes["posted"], writes["failed"], writes["strict_failures"]) == (1, 0, 0)


@walks("Phase 4", "Check for discrepancies (should be none)")
def no_discrepancies(world: World, step: Step) -> None:
    run = command("cutover", "reconcile", "--json")
    assert (run["clean"], run["differences"], run["users_checked"]) == (True, 0, 3)
    assert not Discrepancy.objects.exists()


@walks("Phase 4", "Run for 48 hours monitoring logs")
def shadow_for_48_hours(world: World, step: Step) -> None:
    """The gate to read_switch refuses before its 48 hours, then finds them with no
    discrepancy, both stores written and every ledger write posted."""
    assert timedelta(hours=48) == settings.CUTOVER_SHADOW_MIN_DURATION
    refusal = refused("cutover", "advance", "--to", "read_switch", "--reason", REASON)
    assert "time_in_phase: needs >= 2 days, 0:00:00, is 0:" in refusal
    time_passes(settings.CUTOVER_SHADOW_MIN_DURATION)
    checks = gates()["checks"]
    assert all(check["ok"] for check in checks.values()), checks
    assert checks["ledger_write_success"]["actual"] == "100.0000% of 1"


@walks("Phase 4", "Deploy with ledger reads enabled")
def read_switch(world: World, step: Step) -> None:
    """`cutover advance --to read_switch --percent 1`, then 10, 50, 100: the API reads the
    ledger."""
    deployed_in_phase(step, Phase.READ_SWITCH)
    for percent in ("1", "10", "50", "100"):
        command(
            "cutover", "advance", "--to", "read_switch", "--percent", percent, "--reason", REASON
        )
    status_has_the_flags(step)
    status, reading = api(world, "GET", f"/api/v1/users/{world.users['alice']}/balance")
    assert (status, reading["balance"], reading["source"]) == (200, "135.000000", "ledger")


@walks("Phase 4", "Monitor balance query performance")
def balance_query_plan(world: World, step: Step) -> None:
    plan = user_balance_plan(world.users["alice"])
    assert "Index Scan" in plan and "actual time=" in plan, plan


@walks("Phase 4", "Verify response times acceptable")
def response_times(world: World, step: Step) -> None:
    """The gate to strict measures the balance reads' p99 against CUTOVER_READ_P99_BUDGET_MS,
    the checklist's p99."""
    (budget,) = re.findall(r"p99 < (\d+)ms", "\n".join(step.bullets()))
    assert int(budget) == settings.CUTOVER_READ_P99_BUDGET_MS
    assert gates()["checks"]["read_p99"]["ok"] is True


@walks("Phase 4", "Deploy with strict mode (staging first)")
def strict(world: World, step: Step) -> None:
    """After read_switch's 48 hours and a clean reconciliation, `cutover advance --to strict`."""
    deployed_in_phase(step, Phase.STRICT)
    assert command("cutover", "reconcile", "--json")["clean"] is True
    time_passes(settings.CUTOVER_READ_SWITCH_MIN_DURATION)
    advanced = command("cutover", "advance", "--to", "strict", "--reason", REASON, "--json")
    assert (advanced["action"], advanced["to"]) == ("advance", "strict")
    status_has_the_flags(step)


@walks("Phase 4", "Monitor for failures (none expected)")
def strict_writes(world: World, step: Step) -> None:
    assert credit(world, "bob", "5.00")[0] == 201
    assert balances(world.users["bob"]) == (Decimal("205.50"), Decimal("205.50"))
    writes = command("cutover", "status", "--json")["ledger_writes_in_phase"]
    assert (writes["posted"], writes["strict_failures"]) == (1, 0)


@walks("Phase 4", "Run for 48+ hours without errors")
def strict_for_72_hours(world: World, step: Step) -> None:
    """Our gate to cutover asks 72 hours in strict (CUTOVER_STRICT_MIN_DURATION)."""
    time_passes(settings.CUTOVER_STRICT_MIN_DURATION)
    assert command("cutover", "reconcile", "--json")["clean"] is True
    evidence = gates()
    assert evidence["passed"] is True, evidence
    assert evidence["checks"]["strict_failures"]["actual"] == "0"


@walks("Phase 4", "Deploy strict mode to production")
def strict_in_production(world: World, step: Step) -> None:
    """Production's manifest in strict; its database takes the same `cutover advance --to
    strict` (the walk has one database: done above)."""
    deployed_in_phase(step, Phase.STRICT)


@walks("Phase 4", "Verify no discrepancies for 72+ hours")
def manual_reconciliation(world: World, step: Step) -> None:
    assert rows(statement(RECONCILIATION)) == [{"count": 0}]


@walks("Phase 4", "Deploy with shadow mode disabled")
def cutover(world: World, step: Step) -> None:
    """`cutover advance --to cutover`: the equality proof under the write fence, the flags of
    cutover (strict without shadow)."""
    deployed_in_phase(step, Phase.CUTOVER)
    advanced = json.loads(
        operator(
            world, "cutover", "advance", "--to", "cutover", "--reason", REASON, "--json"
        ).stdout
    )
    assert (advanced["action"], advanced["to"]) == ("advance", "cutover")
    proof = advanced["evidence"]["proof"]
    assert (proof["name"], proof["ok"]) == ("stores_equal", True), proof
    status_has_the_flags(step)


@walks("Phase 4", "Stop writing to legacy `balances` table")
def legacy_not_written(world: World, step: Step) -> None:
    assert credit(world, "alice", "7.00")[0] == 201
    assert balances(world.users["alice"]) == (Decimal("135.00"), Decimal("142.00"))


@walks("Phase 4", "Mark `balances` table as deprecated")
def deprecated(world: World, step: Step) -> None:
    """Entering cutover wrote the comment, naming when."""
    assert "COMMENT ON TABLE balances IS 'DEPRECATED: Use ledger_accounts instead." in step.text
    (comment,) = rows("SELECT obj_description('balances'::regclass, 'pg_class') AS text")
    assert comment["text"].startswith(
        f"DEPRECATED: balances live in ledger_accounts since the cutover of {date.today()}"
    ), comment


# --- Phase 5: Reconciliation Service (Future) -------------------------------------------------


@walks("Phase 5", "Deploy reconciliation service")
def reconciliation_service(world: World, step: Step) -> None:
    """The worker's reconciliations: custody's (the buffers against Circle and Due) agrees;
    the stores' has nothing left to compare in cutover and says so."""
    assert custody_reconcile_task.apply().get() == {"differing": []}
    skipped = reconciliation_task.apply().get()
    assert "the phase is cutover" in skipped["skipped"]


@walks("Phase 5", "Schedule daily reconciliation jobs")
def reconciliation_scheduled(world: World, step: Step) -> None:
    schedule = settings.CELERY_BEAT_SCHEDULE
    for entry, task in (
        ("cutover-reconcile", "cutover.reconcile"),
        ("custody-reconcile", "custody.reconcile"),
    ):
        assert schedule[entry]["task"] == task
        assert 0 < schedule[entry]["schedule"] <= timedelta(days=1).total_seconds()


@walks("Phase 5", "Configure alerting for discrepancies")
def discrepancy_alerts(world: World, step: Step) -> None:
    rules = alert_rules()
    for name in ("LedgerHighDiscrepancyRate", "CutoverDiscrepanciesOpen"):
        assert "cutover_open_discrepancies" in rules[name]["expr"]
    assert sample(metrics(world), "cutover_open_discrepancies") == 0


@walks("Phase 5", "Archive legacy tables after 90 days")
def legacy_archived(world: World, step: Step) -> None:
    """`cutover archive-legacy`: refused before its 90 days in cutover; `rollback --dry-run`
    proves the way back one last time; then the archive, the point of no return."""
    archive = ("cutover", "archive-legacy", "--reason", REASON, "--json")
    assert "the legacy store is archived after 90 days in cutover" in refused(*archive)
    assert command("cutover", "rollback", "--dry-run", "--json")["would_succeed"] is True
    time_passes(settings.CUTOVER_LEGACY_ARCHIVE_AFTER)
    archived = json.loads(operator(world, *archive).stdout)
    assert (archived["rows"], archived["already_archived"]) == (3, False)
    assert not LegacyBalance.objects.exists()
    assert rows("SELECT count(*) AS n FROM legacy_archive.balances") == [{"n": 3}]


# --- Monitoring & Alerting Setup --------------------------------------------------------------


def alert_rules() -> dict[str, dict]:
    return {
        rule["alert"]: rule for rule in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    }


def alarm_provisioned(world: World, step: Step) -> dict[str, str]:
    """The alarm `aws provision` created, as the step's `put-metric-alarm` writes it; the
    metrics published once (`aws publish`, the worker's task every minute)."""
    (flags,) = [
        command_flags
        for command_flags in checklist_commands("cloudwatch put-metric-alarm")
        if command_flags["alarm-name"] in step.text
    ]
    (alarm,) = world.aws.cloudwatch.describe_alarms(AlarmNames=[flags["alarm-name"]])[
        "MetricAlarms"
    ]
    for flag, written in flags.items():
        actual = alarm["".join(word.capitalize() for word in flag.split("-"))]
        assert actual == type(actual)(written), flag
    if not world.published:
        world.published = command("aws", "publish", "--json")
    return flags


def published(world: World, metric: str) -> list[float]:
    return [p["value"] for p in world.published["data_points"] if p["metric"] == metric]


@walks("Monitoring & Alerting Setup", "High Discrepancy Rate")
def discrepancy_alarm(world: World, step: Step) -> None:
    flags = alarm_provisioned(world, step)
    assert not Discrepancy.objects.exists()
    counts = published(world, flags["metric-name"])
    assert counts and set(counts) == {0.0}


@walks("Monitoring & Alerting Setup", "Ledger Write Failures")
def write_failures_alarm(world: World, step: Step) -> None:
    flags = alarm_provisioned(world, step)
    rate = ledger_write_stats(phase_state().entered_at)["success_rate"]
    assert published(world, flags["metric-name"]) == [float(rate)] == [1.0]
    (point,) = datapoints(world.aws, flags["metric-name"], "Average").values()
    assert point["Average"] == 1.0


@walks("Monitoring & Alerting Setup", "Low System Buffer")
def buffer_alarm(world: World, step: Step) -> None:
    flags = alarm_provisioned(world, step)
    buffer = float(system_balance(code="usdc_buffer"))
    assert published(world, flags["metric-name"]) == [buffer] == [19975.0]
    (point,) = datapoints(world.aws, flags["metric-name"], "Average").values()
    assert point["Average"] == buffer


@walks("Monitoring & Alerting Setup", "Treasury Conversion Failures")
def conversion_alarm(world: World, step: Step) -> None:
    flags = alarm_provisioned(world, step)
    counts = published(world, flags["metric-name"])
    assert counts and set(counts) == {0.0}


def dashboard_walked(world: World, step: Step) -> None:
    """The dashboard has a panel for each the checklist names, and every panel's query reads
    series /metrics exports."""
    name = step.title.removesuffix(" Dashboard")
    (dashboard,) = [
        loaded
        for loaded in (json.loads(path.read_text()) for path in DASHBOARDS)
        if loaded["title"] == name
    ]
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert set(step.bullets()) == set(PANELS[name])
    assert {PANELS[name][bullet] for bullet in step.bullets()} <= titles
    exported = exported_names(metrics(world))
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for series, _ in expression_selectors(target["expr"]):
                assert series in exported, (panel["title"], series)


for _title in ("Ledger Dashboard", "Treasury Dashboard", "Onchain Dashboard"):
    walks("Monitoring & Alerting Setup", _title)(dashboard_walked)


def alerts_configured(world: World, step: Step, alerts: dict[str, str], paging: bool) -> None:
    """Each alert the checklist names is a rule of deploy/prometheus/alerts.yml reading series
    /metrics exports (Alertmanager routes `severity: page` to PagerDuty, `ticket` to the
    queue: its receivers are the installation's)."""
    assert set(step.bullets()) == set(alerts)
    rules = alert_rules()
    exported = exported_names(metrics(world))
    for name in alerts.values():
        if paging:
            assert rules[name]["labels"]["severity"] == "page", name
        for series, _ in expression_selectors(rules[name]["expr"]):
            assert series in exported, (name, series)


@walks("Monitoring & Alerting Setup", "Configure critical alerts")
def critical_alerts(world: World, step: Step) -> None:
    alerts_configured(world, step, PAGED_ALERTS, paging=True)


@walks("Monitoring & Alerting Setup", "Configure warning alerts")
def warning_alerts(world: World, step: Step) -> None:
    """Warnings: the two new ones are tickets; conversion failures page (seed 001's alarm)."""
    alerts_configured(world, step, WARNING_ALERTS, paging=False)
    rules = alert_rules()
    assert rules["ApiLatencyHigh"]["labels"]["severity"] == "ticket"
    assert rules["BufferBelowTarget"]["labels"]["severity"] == "ticket"


# --- Rollback Procedures ----------------------------------------------------------------------


@walks("Rollback Procedures", "Disable ledger integration immediately")
def emergency_rollback(world: World, step: Step) -> None:
    """Our rollback is `cutover rollback` (its `kubectl set env` changes no phase: deploy/
    README.md); after Phase 5's archive it is refused, and the checklist's `set env` on
    cutover's pods is a combination the settings refuse at start. What stops the money now is
    the kill switch."""
    assert "archived" in refused("cutover", "rollback", "--reason", REASON)
    assert phase_state().phase == "cutover"
    set_env = {**flag_values(flags_of(Phase.CUTOVER)), **step.assignments()}
    started = operator(world, "check", expect=2, **set_env)
    assert started.stderr.startswith("configuration error: ")
    assert "matches no phase" in started.stderr
    command("cutover", "killswitch", "on", "--reason", REASON)
    status, answer = credit(world, "alice", "1.00")
    assert (status, answer["error"]["code"]) == (503, "unavailable")
    assert "kill switch engaged" in answer["error"]["message"]
    assert REASON not in answer["error"]["message"]  # the operators' words stay theirs
    command("cutover", "killswitch", "off", "--reason", REASON)


@walks("Rollback Procedures", "Verify services healthy")
def healthy(world: World, step: Step) -> None:
    assert http(world, "GET", "/healthz")[0] == 200
    assert http(world, "GET", "/readyz")[0] == 200
    assert credit(world, "alice", "1.00")[0] == 201


@walks("Rollback Procedures", "Rollback migrations if needed")
def migrations_rolled_back(world: World, step: Step) -> None:
    """The backup first; then each app's latest migration down and up again, losing nothing,
    except where the way down would lose data, refused and changing nothing: cutover 0011's
    once the legacy store is archived, gateway 0002's while a client holds the `addresses`
    scope (the payments service's)."""
    assert "pg_dump $DATABASE_URL > backup_before_rollback.sql" in step.text
    (world.tmp / "backup_before_rollback.sql").write_text(backup_take())
    refusals = {
        ("cutover", "0011_legacy_archive"): "cannot be unapplied: the legacy store was archived",
        ("gateway", "0002_addresses_scope"): "cutover_api_clients_chk_scopes",
    }
    content = database_content()
    for app, (latest, previous) in latest_migrations().items():
        if (app, latest) in refusals:
            with pytest.raises(DatabaseError, match=refusals[app, latest]):
                call_command("migrate", app, previous, interactive=False, verbosity=0)
        else:
            call_command("migrate", app, previous, interactive=False, verbosity=0)
            call_command("migrate", interactive=False, verbosity=0)
        assert database_content() == content, app


@walks("Rollback Procedures", "If catastrophic failure")
def restored(world: World, step: Step) -> None:
    """The pre-deployment backup restored into a new database (all or nothing: deploy/
    runbook.md): the ledger verifies, the legacy store and the phase are as they were."""
    assert "psql $DATABASE_URL < backup_YYYYMMDD_HHMMSS.sql" in step.text
    with restored_copy(world.backup.read_text()):
        assert ledger_verified()["ok"] is True
        assert phase_state().phase == "legacy"
        assert dict(LegacyBalance.objects.values_list("user_id", "buying_power")) == {
            world.users["alice"]: Decimal("100.00"),
            world.users["bob"]: Decimal("250.50"),
            world.users["carol"]: Decimal("40.00"),
        }
        assert not BalanceMutation.objects.exists()


# --- Post-Deployment --------------------------------------------------------------------------


@walks("Post-Deployment", "Monitor all metrics for anomalies")
def no_anomalies(world: World, step: Step) -> None:
    """No state gauge an alert reads is off."""
    body = metrics(world)
    assert sample(body, "metrics_state_readable") == 1
    assert sample(body, 'cutover_phase{phase="cutover"}') == 1
    for gauge in (
        "cutover_kill_switch",
        "cutover_open_discrepancies",
        "cutover_open_custody_discrepancies",
        "cutover_strict_failures_in_phase",
        "onchain_dead_withdrawals",
        "onchain_parked_notifications",
        "onchain_failed_notifications",
        "onchain_open_transfer_discrepancies",
    ):
        assert sample(body, gauge) == 0, gauge


@walks("Post-Deployment", "Review logs for errors")
def no_errors_logged(world: World, step: Step) -> None:
    """What the operators' processes logged (JSON lines, LOG_FORMAT=json): no error, and each
    change they made (the two advances and the archive run as processes)."""
    assert [line for line in world.log_lines if line["level"] in ("ERROR", "CRITICAL")] == []
    actions = [line["action"] for line in world.log_lines if "action" in line]
    assert actions == ["advance", "advance", "legacy.archive"]


@walks("Post-Deployment", "Check system buffer levels")
def buffers_checked(world: World, step: Step) -> None:
    status = {r["currency"]: r["state"] for r in command("treasury", "status", "--json")}
    assert status == {"USDC": "ok", "USD": "ok"}


@walks("Post-Deployment", "Run reconciliation manually daily")
def reconciliation_by_hand(world: World, step: Step) -> None:
    """In cutover the stores' reconciliation says there is nothing to compare; custody's is the
    one left, and agrees."""
    assert "the phase is cutover" in refused("cutover", "reconcile")
    assert command("custody", "reconcile", "--json")["differing"] == 0


@walks("Post-Deployment", "Full system audit")
def audit(world: World, step: Step) -> None:
    """`ledger verify` (balances, entries, hash chains) and the audit trails: every phase
    change and kill-switch flip of the walk, every operator action."""
    assert ledger_verified()["ok"] is True
    trail = list(PhaseAudit.objects.order_by("pk").values_list("action", "to_phase", "reason"))
    assert trail == [
        ("seed", "legacy", trail[0][2]),
        ("advance", "shadow", REASON),
        ("advance", "read_switch", REASON),
        *[("read_percent", "read_switch", REASON)] * 3,  # 10, 50, 100
        ("advance", "strict", REASON),
        ("advance", "cutover", REASON),
        ("kill_switch_on", "cutover", REASON),
        ("kill_switch_off", "cutover", REASON),
    ]
    assert list(OperatorAudit.objects.order_by("pk").values_list("action", flat=True)) == [
        "custody.open",
        "custody.open",
        "api_client.create",
        "deposit_address.add",
        "legacy.archive",
    ]


# --- the walk ---------------------------------------------------------------------------------


def test_the_checklist_walked_top_to_bottom(world):
    for step in checklist_steps():
        if step.key in NOT_RUNNABLE_HERE:
            print(f"not runnable here  {step.section}: {step.title}")
            continue
        print(f"walking  {step.section}: {step.title}")
        WALKS[step.key](world, step)

"""The log as processes write it: every phase change and kill-switch flip is a line naming the
actor, the phases and the reason (commands run as operators run them); the Celery worker, started
as deploy/ starts it, logs at INFO in JSON with the task's id as the correlation id. In this
process, a handler made as the settings make LOG_FORMAT=json's shows what a request in the
admin and an operator action write. (A request through gunicorn: tests/test_production_web.py.)"""

import getpass
import io
import json
import logging
import logging.config
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from django.conf import settings
from django.contrib.auth.models import User

from config.celery import app
from cutover.actors import Actor
from cutover.models import OperatorAudit, PhaseAudit
from cutover.operators import api_client_issue
from cutover.tasks import reconciliation_task
from gateway.log_context import LogContextFilter
from tests.celery import QUIET, celery_running, wait_for
from tests.cutover.factories import database_url
from tests.test_configuration import ROOT, manage

pytestmark = pytest.mark.django_db(transaction=True)
OPERATOR = f"cli:{getpass.getuser()}"  # how Actor.command_line() names the shell's user


def cutover(*args: str, log_format: str = "json") -> list[str]:
    """`manage.py cutover ...` on the test database; its log lines (stderr)."""
    result = manage("cutover", *args, DATABASE_URL=database_url(), LOG_FORMAT=log_format)
    assert result.returncode == 0, result.stderr
    return result.stderr.splitlines()


def the_line(lines: list[str], logger: str) -> dict:
    parsed = [json.loads(text) for text in lines if text.startswith("{")]
    (line,) = [line for line in parsed if line["logger"] == logger]
    return line


def test_phase_changes_and_the_kill_switch_are_json_log_lines():
    engaged = the_line(
        cutover("killswitch", "on", "--reason", "drill: stop the money"), "cutover.phase_machine"
    )
    assert {key: engaged[key] for key in ("level", "action", "actor", "phase", "reason")} == {
        "level": "WARNING",
        "action": "kill_switch_on",
        "actor": OPERATOR,
        "phase": "legacy",
        "reason": "drill: stop the money",
    }
    assert (
        engaged["message"]
        == f"kill_switch_on legacy -> legacy by {OPERATOR}: drill: stop the money"
    )
    assert engaged["audit_id"] == PhaseAudit.objects.get(action="kill_switch_on").pk

    forced = the_line(
        cutover("advance", "--to", "shadow", "--force", "--reason", "gate waived by the CTO"),
        "cutover.phase_machine",
    )
    assert forced["level"] == "WARNING"
    assert (forced["action"], forced["from_phase"], forced["to_phase"]) == (
        "force",
        "legacy",
        "shadow",
    )
    assert (forced["phase"], forced["actor"], forced["reason"]) == (
        "shadow",
        OPERATOR,
        "gate waived by the CTO",
    )

    rolled_back = the_line(
        cutover("rollback", "--reason", "discrepancies"), "cutover.phase_machine"
    )
    assert (rolled_back["action"], rolled_back["from_phase"], rolled_back["to_phase"]) == (
        "rollback",
        "shadow",
        "legacy",
    )
    assert rolled_back["reason"] == "discrepancies"


def test_plain_logs_carry_the_same_for_a_person():
    (line,) = cutover("killswitch", "on", "--reason", "drill", log_format="plain")
    assert re.fullmatch(
        rf"\S+ \S+ WARNING cutover\.phase_machine kill_switch_on legacy -> legacy by "
        rf"{OPERATOR}: drill \[- {OPERATOR} legacy\]",
        line,
    )


def test_the_celery_worker_logs_json_at_info_with_its_task_id(tmp_path):
    """The worker as the systemd unit (and the k8s worker) runs it; the reconciliation task
    logs at INFO, which Celery's own default (WARNING) would drop."""
    unit = (ROOT / "deploy" / "systemd" / "ledger-cutover-worker.service").read_text()
    command = re.search(r"^ExecStart=\S+/celery -A config (.*)$", unit, re.MULTILINE)[1].split()
    queue = f"logs-{os.getpid()}"
    broker = "redis://127.0.0.1:6379/15"
    log = tmp_path / "worker.log"
    worker = (*command, "--concurrency", "1", "-Q", queue, *QUIET)
    environment = {"CELERY_BROKER_URL": broker, "LOG_FORMAT": "json"}
    with log.open("w") as output, celery_running(worker, environment=environment, log=output):
        # On a connection of its own to the worker's broker: the app's producer pool keeps the
        # connection an earlier test in this process opened, whatever the app's broker_url now.
        with app.connection_for_write(broker) as connection:
            task_id = reconciliation_task.apply_async(queue=queue, connection=connection).id

        def task_lines() -> list[dict]:
            return [
                json.loads(text)
                for text in log.read_text().splitlines()
                if text.startswith("{") and json.loads(text).get("correlation_id") == task_id
            ]

        assert wait_for(
            lambda: any(line["logger"] == "cutover.tasks" for line in task_lines()), 60
        ), log.read_text()[-3000:]
    (line,) = [line for line in task_lines() if line["logger"] == "cutover.tasks"]
    assert line["level"] == "INFO"
    assert line["message"].startswith("reconciliation skipped: ")  # legacy: nothing to compare
    assert line["actor"] == "celery"


@pytest.fixture
def json_log():
    """The root logger also writes to a buffer as LOG_FORMAT=json's handler does (the
    settings' formatter and filter); yields a reader of the lines written so far."""
    with log_written("json") as written:
        yield lambda: [json.loads(line) for line in written().splitlines()]


@contextmanager
def log_written(log_format: str) -> Iterator[Callable[[], str]]:
    """The root logger also writes to a buffer as LOG_FORMAT=`log_format`'s handler does;
    yields a reader of what was written so far."""
    formatter_config = dict(settings.LOGGING["formatters"][log_format])
    configurator = logging.config.DictConfigurator(settings.LOGGING)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(configurator.configure_formatter(formatter_config))
    handler.addFilter(LogContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield buffer.getvalue
    finally:
        root.removeHandler(handler)


@pytest.mark.django_db
def test_a_request_cannot_forge_a_plain_log_line(client):
    """Found from outside: a path holding an encoded newline wrote a line of its own, a fake
    "CRITICAL ... rollback" among the real ones. Each record is one line, its control
    characters escaped."""
    forged = "2026-12-03 11:31:00,000 CRITICAL cutover.phase_machine rollback by admin:root"
    path = "/api/v1/users/x%0a" + forged.replace(" ", "%20") + "%00/balance"
    with log_written("plain") as written:
        assert client.get(path).status_code == 400  # NUL in the path
    lines = written().splitlines()
    assert not any(line.startswith(forged) for line in lines)
    assert any(f"x\\x0a{forged}\\x00/balance" in line for line in lines)


@pytest.mark.django_db
def test_an_admin_request_s_lines_name_the_operator(client, json_log):
    client.force_login(User.objects.create_superuser("ops", password="a-long-password-1"))
    response = client.get("/admin/cutover/no-such-page/", HTTP_X_CORRELATION_ID="corr-admin-1")
    assert response.status_code == 404
    assert response["X-Correlation-Id"] == "corr-admin-1"
    (line,) = [line for line in json_log() if line["logger"] == "django.request"]
    assert line["message"] == "Not Found: /admin/cutover/no-such-page/"
    assert (line["correlation_id"], line["actor"]) == ("corr-admin-1", "admin:ops")


@pytest.mark.django_db
def test_an_operator_action_is_a_log_line_once_committed(
    json_log, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as pending:
        client, _ = api_client_issue(
            name="ledger-reader", scopes=["read"], actor=Actor("cli:ops"), reason="reports"
        )
    assert not [line for line in json_log() if line["logger"] == "cutover.operator_audit"]
    for callback in pending:
        callback()  # the commit
    (line,) = [line for line in json_log() if line["logger"] == "cutover.operator_audit"]
    assert line["message"] == f"api_client.create on api_client:{client.pk} by cli:ops: reports"
    assert (line["actor"], line["action"], line["reason"]) == (
        "cli:ops",
        "api_client.create",
        "reports",
    )
    assert line["audit_id"] == OperatorAudit.objects.get(action="api_client.create").pk

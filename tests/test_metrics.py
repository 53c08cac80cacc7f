"""Metrics as production serves them: gunicorn's workers and a Celery worker write into one
PROMETHEUS_MULTIPROC_DIR, so every scrape of /metrics, whichever web worker answers it, adds up
all of them; the state gauges are read from the database at each scrape; /metrics answers only
the bearer of METRICS_TOKEN; the alerting rules shipped in deploy/ name only series /metrics
exports, each with a `for:` and a runbook section."""

import json
import re
import urllib.error
import urllib.request
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis
import yaml
from django.db import connection
from django.utils import timezone

from cutover.actors import Actor
from cutover.discrepancies import discrepancy_known_difference_mark
from cutover.models import (
    CustodyDiscrepancy,
    Discrepancy,
    PhaseState,
    ReconciliationRun,
    StrictFailure,
)
from cutover.phase_machine import kill_switch_set
from cutover.reconciliation import reconciliation_run
from ledger.selectors import system_balance
from onchain.inbox import notification_replay
from onchain.models import CircleNotification, DepositAddress, Withdrawal
from onchain.sandbox import CircleSandbox
from onchain.withdrawals import withdrawal_cancel, withdrawals_send
from rehearsal.bench_http import api_server
from tests.celery import QUIET, celery_running, wait_for
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.onchain.factories import buffer_fund, withdraw
from tests.treasury.factories import KEY, SECRET, buffers, celery_environment, fund
from treasury.bands import threshold_set
from treasury.models import BufferThreshold, ConversionJob, ConversionProvider
from treasury.sandbox import DueSandbox

ROOT = Path(__file__).resolve().parent.parent
BROKER = "redis://127.0.0.1:6379/12"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RUNBOOK = ROOT / "deploy" / "runbook.md"
TOKEN = "Zq8-metrics-token-4Kx7"
PROMQL_WORDS = {
    *("sum", "max", "min", "avg", "delta", "increase", "rate", "avg_over_time", "absent"),
    *("histogram_quantile", "and", "or"),
}
PROMETHEUS_OWN = {"up"}  # written by Prometheus for each target, not by /metrics


def discrepancy_known_difference(discrepancy: Discrepancy) -> None:
    """Accept a discrepancy as a known difference for a day: it stops counting."""
    discrepancy_known_difference_mark(
        discrepancy_id=discrepancy.pk,
        actor=Actor.command_line(),
        reason="expected: fixed upstream",
        expires_at=timezone.now() + timedelta(days=1),
    )


def scrape(port: int, token: str | None = TOKEN) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return response.read().decode()


def sample(body: str, series: str) -> float | None:
    """The value of `series` (a name, with its labels as exported: `name{label="value"}`)."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else None


@pytest.fixture
def metrics_client(client, settings):
    """The test client, scraping /metrics as Prometheus does (bearer METRICS_TOKEN)."""
    settings.METRICS_TOKEN = TOKEN

    def get() -> str:
        response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        return response.content.decode()

    return get


@pytest.mark.django_db(transaction=True)
def test_every_scrape_adds_up_the_web_and_celery_processes(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    fund("usdc_buffer", "1000")
    fund("fiat_buffer", "60000")
    redis.Redis.from_url(BROKER).flushdb()
    with (
        (tmp_path / "worker.log").open("w") as worker_log,
        DueSandbox(api_key=KEY, api_secret=SECRET, settle="failed") as sandbox,
    ):
        environment = {
            **celery_environment(sandbox, BROKER),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        # Laid out as deploy/ runs them: a prefork worker and a beat of its own.
        worker = ("worker", "-c", "2", *QUIET)
        with celery_running(worker, ("beat",), environment=environment, log=worker_log):
            wait_for(lambda: ConversionJob.objects.filter(status="failed").count() >= 2, 90)
    failed = ConversionJob.objects.filter(status="failed").count()
    assert failed >= 2, (tmp_path / "worker.log").read_text()[-3000:]
    connection.close()  # the web workers use the same test database

    rejected = 7
    with api_server(
        connection.settings_dict["NAME"],
        {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "METRICS_TOKEN": TOKEN},
    ) as port:
        for _ in range(rejected):  # unsigned: each refused (401) by whichever worker takes it
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/webhooks/circle/transfers", data=b"{}", method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=5)  # noqa: S310
            assert refused.value.code == 401
        scrapes = [scrape(port) for _ in range(12)]  # several workers answer these

    for body in scrapes:
        assert sample(body, "conversion_jobs_failed_total") == failed  # counted in Celery
        assert sample(body, "system_buffer_usdc") == 1000.0  # set in Celery, the latest value
        outcomes = re.findall(
            r"^circle_webhook_received_total\{outcome=\"[^\"]+\"\} (\S+)$", body, re.MULTILINE
        )
        assert sum(float(n) for n in outcomes) == rejected  # counted across web workers
    assert buffers()["USDC"] == 1000  # failed conversions moved nothing


def legacy_only_users(count: int) -> None:
    """Users with a legacy balance and no ledger account: each a difference to reconcile."""
    for _ in range(count):
        legacy_user("10")


@pytest.mark.django_db(transaction=True)
def test_state_gauges_are_what_the_database_holds_at_each_scrape(
    metrics_client, sandbox, live_server, settings
):
    phase_set("shadow")
    holder = legacy_user("100")
    ledger_balance_set(holder, "100")
    buffer_fund("1000")
    settings.ONCHAIN_WITHDRAWAL_MAX_ATTEMPTS = 1
    withdrawal = withdraw(holder)
    sandbox.fail_next = [503]
    assert withdrawals_send().dead == 1
    webhook = f"{live_server.url}/webhooks/circle/transfers"
    deposit = CircleSandbox.transfer_notification(
        notification_type="transfers.completed", transfer_id="t-1", address="0xlate", amount="25.5"
    )
    assert sandbox.deliver(webhook, deposit)[1]["status"] == "parked"
    legacy_only_users(3)
    assert reconciliation_run(triggered_by="test").new_discrepancies == 3
    StrictFailure.objects.create(
        phase="shadow", user_id=uuid.uuid4(), reference="r-1", error="refused by the ledger"
    )
    kill_switch_set(engaged=True, actor=Actor.command_line(), reason="drill")

    body = metrics_client()
    assert sample(body, 'cutover_phase{phase="shadow"}') == 1
    for other in ("legacy", "read_switch", "strict", "cutover"):
        assert sample(body, f'cutover_phase{{phase="{other}"}}') == 0
    assert sample(body, "cutover_read_percent") == 0
    assert sample(body, "cutover_kill_switch") == 1
    assert sample(body, "cutover_open_discrepancies") == 3
    assert sample(body, "cutover_open_custody_discrepancies") == 0
    assert sample(body, "cutover_strict_failures_in_phase") == 1
    assert 0 <= sample(body, "cutover_reconciliation_age_seconds") < 60
    assert sample(body, "cutover_reconciliation_interval_seconds") == 900  # 15m, the default
    assert sample(body, "onchain_dead_withdrawals") == 1
    assert sample(body, "onchain_parked_notifications") == 1
    assert sample(body, "onchain_failed_notifications") == 0
    assert sample(body, "onchain_open_transfer_discrepancies") == 0
    assert sample(body, "onchain_buffer_alert_threshold") == 5000
    usdc = BufferThreshold.objects.get(currency="USDC")
    assert sample(body, 'treasury_buffer_balance{currency="USDC"}') == 1000
    assert sample(body, 'treasury_buffer_minimum{currency="USDC"}') == float(usdc.minimum)
    assert sample(body, 'treasury_buffer_target{currency="USDC"}') == float(usdc.target)
    assert sample(body, 'treasury_buffer_maximum{currency="USDC"}') == float(usdc.maximum)
    assert sample(body, 'treasury_provider_healthy{provider="due"}') == 1
    assert sample(body, "metrics_state_readable") == 1

    # The database changes; the next scrape says so.
    first = Discrepancy.objects.filter(status="open").first()
    discrepancy_known_difference(first)  # no longer counted
    kill_switch_set(engaged=False, actor=Actor.command_line(), reason="drill over")
    withdrawal_cancel(
        withdrawal_id=withdrawal.pk, actor=Actor.command_line(), reason="absent at Circle"
    )
    DepositAddress.objects.create(address="0xlate", chain="ETH", user_id=legacy_user("0"))
    parked = CircleNotification.objects.get(status="parked").notification_id
    assert notification_replay(notification_id=parked, actor=Actor.command_line()) == "processed"
    CustodyDiscrepancy.objects.create(
        currency="USD", source="due", ledger_balance=0, reported=5, difference=-5
    )
    threshold_set(
        currency="USDC",
        minimum=Decimal(1100),
        target=usdc.target,
        maximum=usdc.maximum,
        actor=Actor.command_line(),
        reason="raised for the test",
    )
    ConversionProvider.objects.filter(code="due").update(healthy=False)
    now = timezone.now()
    PhaseState.objects.update(
        phase="read_switch", read_percent=50, entered_at=now - timedelta(hours=2)
    )
    ReconciliationRun.objects.update(finished_at=now - timedelta(hours=3))
    StrictFailure.objects.update(at=now - timedelta(hours=4))  # before the phase began

    body = metrics_client()
    assert sample(body, 'cutover_phase{phase="read_switch"}') == 1
    assert sample(body, 'cutover_phase{phase="shadow"}') == 0
    assert sample(body, "cutover_read_percent") == 50
    assert sample(body, "cutover_kill_switch") == 0
    assert sample(body, "cutover_open_discrepancies") == 2
    assert sample(body, "cutover_open_custody_discrepancies") == 1
    assert sample(body, "cutover_strict_failures_in_phase") == 0
    # since the phase began: the last run finished before it
    assert 7200 <= sample(body, "cutover_reconciliation_age_seconds") < 7260
    assert Withdrawal.objects.get().status == "failed"
    assert sample(body, "onchain_dead_withdrawals") == 0
    assert sample(body, "onchain_parked_notifications") == 0
    buffer = system_balance(code="usdc_buffer")
    assert buffer == 1025.5
    assert sample(body, 'treasury_buffer_balance{currency="USDC"}') == float(buffer)
    assert sample(body, 'treasury_buffer_minimum{currency="USDC"}') == 1100
    assert sample(body, 'treasury_provider_healthy{provider="due"}') == 0


def test_an_empty_metrics_file_a_killed_worker_left_does_not_fail_the_scrape(
    metrics_client, tmp_path, monkeypatch, db
):
    """A process creates its metrics file, then sizes it: killed between the two, it leaves a
    file of 0 bytes that prometheus_client cannot read, and every scrape after was a 500 (seen
    once in the full run while gunicorn's workers started; prometheus/client_python#1199)."""
    (tmp_path / "counter_4242.db").write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert sample(metrics_client(), "metrics_state_readable") == 1  # a 200, all of it read


def test_metrics_answer_only_the_bearer_of_metrics_token(client, settings, db):
    url = "/metrics"
    settings.METRICS_TOKEN = ""  # unset: nobody is let in, whatever they send
    assert client.get(url, headers={"Authorization": "Bearer "}).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer anything"}).status_code == 403
    settings.METRICS_TOKEN = TOKEN
    for headers, status in (
        ({}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        ({"Authorization": "Bearer wrong-token"}, 403),
    ):
        response = client.get(url, headers=headers)
        assert response.status_code == status
        assert response.json()["error"]["field"] == "Authorization"
        assert b"cutover_phase" not in response.content
    response = client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    assert client.post(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 405


@pytest.mark.django_db(transaction=True)
def test_gunicorn_workers_read_the_state_at_each_scrape_for_the_bearer_only(tmp_path):
    """As deploy/ runs it: four workers sharing a PROMETHEUS_MULTIPROC_DIR."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    phase_set("shadow")
    legacy_only_users(2)
    reconciliation_run(triggered_by="test")
    kill_switch_set(engaged=True, actor=Actor.command_line(), reason="drill")
    connection.close()  # the web workers use the same test database
    with api_server(
        connection.settings_dict["NAME"],
        {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "METRICS_TOKEN": TOKEN},
    ) as port:
        for token, status in ((None, 401), ("wrong-token", 403)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                scrape(port, token)
            assert refused.value.code == status
        scrapes = [scrape(port) for _ in range(8)]  # several workers answer these
        for body in scrapes:
            assert sample(body, "cutover_open_discrepancies") == 2
            assert sample(body, "cutover_kill_switch") == 1
            assert sample(body, "metrics_state_readable") == 1
        # the processes' own series, added up across the workers: the two refused scrapes
        assert 'django_http_responses_total_by_status_total{status="401"} 1.0' in scrapes[-1]
        assert 'django_http_responses_total_by_status_total{status="403"} 1.0' in scrapes[-1]

        discrepancy_known_difference(Discrepancy.objects.filter(status="open").first())
        kill_switch_set(engaged=False, actor=Actor.command_line(), reason="drill over")
        for body in [scrape(port) for _ in range(8)]:
            assert sample(body, "cutover_open_discrepancies") == 1
            assert sample(body, "cutover_kill_switch") == 0


def exported_series(body: str) -> dict[str, list[dict[str, str]]]:
    """Each exported sample name, with the label sets it is exported with."""
    series: dict[str, list[dict[str, str]]] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, labels = line.split(" ")[0].partition("{")
            series.setdefault(name, []).append(dict(re.findall(r'(\w+)="([^"]*)"', labels)))
    return series


def exported_names(body: str) -> set[str]:
    """Every series name a scrape exports: sampled, or declared by its family (a labelled counter
    or histogram nothing has touched yet has no sample; a counter's TYPE line already names it
    with _total)."""
    exported = set(exported_series(body))
    suffixes = {"counter": ("",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", body, re.MULTILINE):
        exported |= {family + suffix for suffix in suffixes.get(kind, ())}
    return exported


def expression_selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """The series a PromQL expression selects, each with its `=` label matchers: what is left
    once grouping clauses, functions, operators, numbers and range durations are taken out."""
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[\d+[smh]\]", " ", expr)
    found = []
    for series, matchers in re.findall(r"(?<![\w.])([a-zA-Z_]\w*)(?:\{([^}]*)\})?", expr):
        if series not in PROMQL_WORDS:
            found.append((series, dict(re.findall(r'(\w+)="([^"]*)"', matchers))))
    return found


def runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings (lower case, spaces as dashes)."""
    headings = re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


@pytest.mark.django_db(transaction=True)
def test_alert_rules_read_exported_series_and_each_has_a_for_and_a_runbook(metrics_client, client):
    phase_set("shadow")
    # A refused delivery, so that the webhook's counter has a sample to export.
    client.post("/webhooks/circle/transfers", data=b"{}", content_type="application/json")
    exported = exported_series(metrics_client())
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    assert config["rule_files"] == [ALERTS.name]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"]
    anchors = runbook_anchors()
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    for rule in rules:
        name, expr = rule["alert"], rule["expr"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["runbook_url"] == f"deploy/runbook.md#{name.lower()}"
        assert name.lower() in anchors, f"deploy/runbook.md has no section {name}"
        # Every selector names an exported series; its `=` matchers, a label set exported.
        for series, equal in expression_selectors(expr):
            if series in PROMETHEUS_OWN:
                assert equal == {"job": job["job_name"]}, name
                continue
            assert series in exported, (name, series)
            assert any(equal.items() <= labels.items() for labels in exported[series]), (
                name,
                series,
                equal,
            )
    alerts = {rule["alert"]: rule["expr"] for rule in rules}
    # The buffer alert compares with the threshold the treasury holds, not a number of its own.
    low_buffer = alerts["LowSystemBuffer"]
    assert "treasury_buffer_minimum" in low_buffer
    assert not re.findall(r"(?<![\w\[])\d+(?![smh\]])", low_buffer)
    assert alerts["TreasuryConversionFailures"].endswith("> 5")
    for required in (
        "KillSwitchEngaged",
        "ReconciliationStale",
        "DeadWithdrawals",
        "ParkedNotifications",
        "CircleBadSignatures",
        "LedgerScrapeAbsent",
    ):
        assert required in alerts
    assert alerts["LedgerScrapeAbsent"].startswith("absent(up{")


@pytest.mark.django_db(transaction=True)
def test_every_dashboard_panel_reads_series_metrics_exports(metrics_client, client):
    phase_set("shadow")
    buffer_fund("10")  # a posting: the ledger's labelled series get a sample
    client.post("/webhooks/circle/transfers", data=b"{}", content_type="application/json")
    exported = exported_names(metrics_client())
    titles = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        titles.add(dashboard["title"])
        assert dashboard["panels"], path.name
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}", (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])
            for target in panel["targets"]:
                selected = expression_selectors(target["expr"])
                assert selected, (path.name, panel["title"])
                for series, _ in selected:
                    assert series in exported, (path.name, panel["title"], series)
    assert titles == {"Ledger", "Treasury", "Onchain", "Cutover"}

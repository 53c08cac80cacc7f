"""Metrics as production serves them: gunicorn's workers and a Celery worker write into one
PROMETHEUS_MULTIPROC_DIR, so every scrape of /metrics, whichever web worker answers it, adds up
all of them; the alerting rules shipped in deploy/ name only series /metrics exports."""

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
import yaml
from django.db import connection

from rehearsal.bench_http import api_server
from tests.celery import QUIET, celery_running, wait_for
from tests.treasury.factories import KEY, SECRET, buffers, celery_environment, fund
from treasury.models import BufferThreshold, ConversionJob
from treasury.sandbox import DueSandbox

ROOT = Path(__file__).resolve().parent.parent
BROKER = "redis://127.0.0.1:6379/12"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMQL_WORDS = {"sum", "delta", "increase", "avg_over_time", "by", "m", "s"}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(body: str, series: str) -> float | None:
    match = re.search(rf"^{re.escape(series)} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else None


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
        connection.settings_dict["NAME"], {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
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


def test_alert_rules_name_exported_series_and_the_seeded_thresholds(client, db):
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in client.get("/metrics").content.decode().splitlines()
        if line and not line.startswith("#")
    }
    for rule in rules:
        names = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", re.sub(r"\[\d+m\]", "", rule["expr"])))
        series = names - PROMQL_WORDS
        assert series and series <= exported, (rule["alert"], series - exported)
    expressions = {rule["alert"]: rule["expr"] for rule in rules}
    usdc_min = BufferThreshold.objects.get(currency="USDC").minimum
    assert expressions["LowSystemBuffer"].endswith(f"< {usdc_min.normalize():f}")
    assert expressions["TreasuryConversionFailures"].endswith("> 5")

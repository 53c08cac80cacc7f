"""/metrics: what the processes counted, and the state the database holds, read at each scrape.

Counters and histograms live in the processes (added up across gunicorn and Celery through
PROMETHEUS_MULTIPROC_DIR); a count kept per process cannot say how many discrepancies are open
now, so the state gauges are read from the database by the worker answering the scrape. Every
host's scrape reads the same database: aggregate them with max(), not sum()."""

import contextlib
import glob
import logging
import os

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cutover.phases import ORDER
from cutover.selectors import (
    open_custody_discrepancy_count,
    open_discrepancy_count,
    phase_state,
    reconciliation_age,
    strict_failure_count_in_phase,
)
from gateway.api import ApiError
from gateway.boundary import bearer_token, token_matches
from onchain.models import InboxStatus
from onchain.selectors import (
    dead_withdrawal_count,
    notification_count,
    open_transfer_discrepancy_count,
)
from treasury.selectors import buffer_status_list, provider_health

log = logging.getLogger(__name__)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _cutover_state() -> list[GaugeMetricFamily]:
    state = phase_state()
    phase = GaugeMetricFamily(
        "cutover_phase",
        "The rollout phase: 1 for the current one, 0 for others",
        labels=["phase"],
    )
    for each in ORDER:
        phase.add_metric([each.value], 1 if state.phase == each else 0)
    return [
        phase,
        _gauge(
            "cutover_read_percent",
            "Share of users reading balances from the ledger in read_switch (percent)",
            state.read_percent,
        ),
        _gauge(
            "cutover_kill_switch", "1 while the kill switch stops money movement", state.kill_switch
        ),
        _gauge(
            "cutover_open_discrepancies",
            "Discrepancies between the legacy store and the ledger not resolved yet",
            open_discrepancy_count(),
        ),
        _gauge(
            "cutover_open_custody_discrepancies",
            "System buffers whose ledger balance differs from their provider's, not resolved yet",
            open_custody_discrepancy_count(),
        ),
        _gauge(
            "cutover_strict_failures_in_phase",
            "Requests failed by strict mode since the current phase began",
            strict_failure_count_in_phase(state),
        ),
        _gauge(
            "cutover_reconciliation_age_seconds",
            "Seconds since the last reconciliation finished (or since the phase began, if later)",
            reconciliation_age(state).total_seconds(),
        ),
        _gauge(
            "cutover_reconciliation_interval_seconds",
            "How often Celery runs the reconciliation (CUTOVER_RECONCILE_INTERVAL)",
            settings.CUTOVER_RECONCILE_INTERVAL.total_seconds(),
        ),
    ]


def _onchain_state() -> list[GaugeMetricFamily]:
    return [
        _gauge(
            "onchain_dead_withdrawals",
            "Withdrawals whose sending gave up, waiting for an operator (money still held)",
            dead_withdrawal_count(),
        ),
        _gauge(
            "onchain_parked_notifications",
            "Circle notifications parked for an operator (a deposit to an unknown address)",
            notification_count(InboxStatus.PARKED),
        ),
        _gauge(
            "onchain_failed_notifications",
            "Circle notifications whose processing failed, waiting for a redelivery or replay",
            notification_count(InboxStatus.FAILED),
        ),
        _gauge(
            "onchain_open_transfer_discrepancies",
            "Notifications contradicting a credited transfer, not resolved yet",
            open_transfer_discrepancy_count(),
        ),
        _gauge(
            "onchain_buffer_alert_threshold",
            "The USDC level the on-chain engine warns below (ONCHAIN_BUFFER_ALERT_THRESHOLD)",
            float(settings.ONCHAIN_BUFFER_ALERT_THRESHOLD),
        ),
    ]


def _treasury_state() -> list[GaugeMetricFamily]:
    families = {
        "balance": "The buffer's balance in the ledger",
        "minimum": "The buffer's minimum (Buffer thresholds): below it, the treasury converts",
        "target": "The level the treasury's conversions aim for",
        "maximum": "The buffer's maximum: above it, the treasury converts the excess",
    }
    gauges = {
        field: GaugeMetricFamily(f"treasury_buffer_{field}", text, labels=["currency"])
        for field, text in families.items()
    }
    for reading in buffer_status_list():
        for field, gauge in gauges.items():
            gauge.add_metric([reading.currency], float(getattr(reading, field)))
    healthy = GaugeMetricFamily(
        "treasury_provider_healthy",
        "1 for an enabled conversion provider that is healthy, 0 after its failures in a row",
        labels=["provider"],
    )
    for code, is_healthy in provider_health():
        healthy.add_metric([code], 1 if is_healthy else 0)
    return [*gauges.values(), healthy]


class DatabaseStateCollector(Collector):
    """The state gauges, read at collection. If the database cannot answer, the scrape still
    carries the processes' metrics, and `metrics_state_readable` 0 says the state is missing."""

    def collect(self):
        try:
            families, readable = [*_cutover_state(), *_onchain_state(), *_treasury_state()], 1
        except DatabaseError:
            log.exception("/metrics could not read the state gauges from the database")
            families, readable = [], 0
        yield from families
        yield _gauge(
            "metrics_state_readable",
            "1 when this scrape read the state gauges from the database",
            readable,
        )


DATABASE_STATE = CollectorRegistry()
DATABASE_STATE.register(DatabaseStateCollector())


class SizedFilesCollector(multiprocess.MultiProcessCollector):
    """prometheus_client's collector of every process's files, without the files a process has
    made but not sized yet (0 bytes): reading one raises, and the whole scrape failed with it
    (prometheus/client_python#1199; here a 500 while gunicorn's workers started). A worker
    killed in that moment leaves one for good: every scrape after it failed."""

    def collect(self):
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(OSError):  # gone meanwhile: a process marked dead
                if os.path.getsize(path) > 0:
                    files.append(path)
        return self.merge(files, accumulate=True)


def _processes_registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Every process's files, added up (a registry per scrape, as prometheus_client asks).
        registry = CollectorRegistry()
        SizedFilesCollector(registry)
        return registry
    return REGISTRY


def _token_refusal(request: HttpRequest) -> JsonResponse | None:
    token = bearer_token(request)
    if token is None:
        error = ApiError(
            401, "unauthenticated", "send Authorization: Bearer <METRICS_TOKEN>", "Authorization"
        )
    elif not token_matches(token, settings.METRICS_TOKEN):
        error = ApiError(403, "forbidden", "the token is not the metrics token", "Authorization")
    else:
        return None
    return JsonResponse(error.body(), status=error.status)


@csrf_exempt  # a bearer token, never cookies: a wrong method is a 405, not a CSRF 403
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Bearer METRICS_TOKEN: the processes' metrics and the database's state gauges."""
    refusal = _token_refusal(request)
    if refusal is not None:
        return refusal
    body = generate_latest(_processes_registry()) + generate_latest(DATABASE_STATE)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)

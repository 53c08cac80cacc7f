"""The web under config.settings.production, as deploy/ runs it (gunicorn, deploy/env.example's
environment): behind a TLS-terminating load balancer, plain HTTP is redirected to HTTPS except
for what the cluster asks on the pod's port (the probes, the metrics scrape); HSTS is sent; and
each request's log lines are JSON carrying its correlation id, the client and the phase; the
admin's static files, collected as the image collects them, are served by the web itself."""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from cutover.actors import Actor
from cutover.models import BalanceMutation
from cutover.operators import api_client_issue
from rehearsal.runtime import database_url
from tests.celery import wait_for
from tests.cutover.factories import ledger_balance_set, legacy_user, phase_set
from tests.test_configuration import ROOT, env_example, manage, strong_secrets

HOST = "stack-service"  # the Host the kubelet's probes send (deploy/k8s/base/web.yaml)
BEHIND_THE_BALANCER = {"Host": HOST, "X-Forwarded-Proto": "https"}


@pytest.fixture(scope="module")
def static_root(tmp_path_factory) -> Path:
    """collectstatic as deploy/Containerfile runs it at build (the base settings: no secrets),
    into a directory of its own."""
    root = tmp_path_factory.mktemp("static")
    result = manage(
        "collectstatic",
        "--noinput",
        DJANGO_SETTINGS_MODULE="config.settings.base",
        DJANGO_STATIC_ROOT=str(root),
    )
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="module")
def web(django_db_setup, static_root, tmp_path_factory) -> Iterator[tuple[int, Path]]:
    """gunicorn (one worker) under the production settings on the test database, serving the
    collected static files; yields its port and the file its output goes to."""
    log = tmp_path_factory.mktemp("web") / "web.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {
        **os.environ,
        **env_example(),
        **strong_secrets(),
        "CIRCLE_WALLET_ID": "1000000001",
        "DJANGO_ALLOWED_HOSTS": HOST,
        "DATABASE_URL": database_url(settings.DATABASES["default"]["NAME"]),
        "DJANGO_STATIC_ROOT": str(static_root),
    }
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "config.wsgi:application"),
                *("--config", "python:config.gunicorn", "--workers", "1"),
                *("--bind", f"127.0.0.1:{port}"),
            ],
            cwd=ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            assert wait_for(lambda: _answers(port) or process.poll() is not None, 30)
            assert process.poll() is None, log.read_text()[-3000:]
            yield port, log
        finally:
            process.terminate()
            process.wait(timeout=30)


def _answers(port: int) -> bool:
    try:
        request(port, "GET", "/healthz", {"Host": HOST})
    except OSError:
        return False
    return True


def request(port: int, method: str, path: str, headers: dict, body: str | None = None):
    """One request over a socket, redirects not followed."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def json_lines(log: Path) -> list[dict]:
    """The log's JSON lines (gunicorn's own start and stop lines are its plain text)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_the_probes_over_plain_http_get_200_not_a_redirect(web, path):
    port, _ = web
    status, headers, body = request(port, "GET", path, {"Host": HOST})
    assert status == 200, (status, headers.get("Location"))
    assert json.loads(body)["status"] == "ok"
    assert "Strict-Transport-Security" not in headers  # HSTS is only sent over HTTPS


@pytest.mark.django_db(transaction=True)  # the phase state the scrape reads, committed
def test_the_metrics_scrape_over_plain_http_is_answered(web):
    port, _ = web
    token = strong_secrets()["METRICS_TOKEN"]
    status, _, body = request(
        port, "GET", "/metrics", {"Host": HOST, "Authorization": f"Bearer {token}"}
    )
    assert status == 200
    assert b"# TYPE " in body


def test_the_api_over_plain_http_is_redirected_to_https(web):
    port, _ = web
    path = "/api/v1/users/00000000-0000-0000-0000-000000000001/balance"
    status, headers, _ = request(port, "GET", path, {"Host": HOST})
    assert status == 301
    assert headers["Location"] == f"https://{HOST}{path}"


def test_through_the_balancer_the_api_answers_with_hsts(web):
    port, _ = web
    path = "/api/v1/users/00000000-0000-0000-0000-000000000001/balance"
    status, headers, body = request(port, "GET", path, BEHIND_THE_BALANCER)
    assert status == 401  # no token: answered, not redirected
    assert json.loads(body)["error"]["field"] == "Authorization"
    assert headers["Strict-Transport-Security"] == "max-age=3600; includeSubDomains"


@pytest.mark.django_db(transaction=True)
def test_a_request_logs_json_with_its_correlation_id_client_and_phase(web):
    port, log = web
    user = legacy_user("100")
    ledger_balance_set(user, "100")
    phase_set("shadow")
    _, token = api_client_issue(name="payments", scopes=["credit"], actor=Actor("test"))
    status, headers, _ = request(
        port,
        "POST",
        f"/api/v1/users/{user}/balance-mutations",
        {
            **BEHIND_THE_BALANCER,
            "Authorization": f"Bearer {token}",
            "Idempotency-Key": "logs-1",
            "X-Correlation-Id": "corr-logs-1",
            "Content-Type": "application/json",
        },
        json.dumps({"direction": "credit", "amount": "5.00", "currency": "USDC"}),
    )
    assert status == 201
    assert headers["X-Correlation-Id"] == "corr-logs-1"
    assert BalanceMutation.objects.get(user_id=user).correlation_id == "corr-logs-1"

    def answered() -> list[dict]:
        return [
            line
            for line in json_lines(log)
            if line.get("correlation_id") == "corr-logs-1" and line["logger"] == "gateway.api"
        ]

    assert wait_for(lambda: answered(), 10), log.read_text()[-3000:]
    (line,) = answered()
    assert line["level"] == "INFO"
    assert line["message"] == f"POST /api/v1/users/{user}/balance-mutations -> 201"
    assert line["status_code"] == 201
    assert line["actor"] == "api:payments"
    assert line["phase"] == "shadow"
    assert line["time"].endswith("+00:00")


def test_a_refused_request_s_lines_all_carry_its_correlation_id(web):
    """Django logs a 4xx itself after the middleware returned: that line carries it too."""
    port, log = web
    path = "/api/v1/users/00000000-0000-0000-0000-000000000002/balance"
    status, headers, _ = request(
        port, "GET", path, {**BEHIND_THE_BALANCER, "X-Correlation-Id": "corr-logs-2"}
    )
    assert status == 401
    assert headers["X-Correlation-Id"] == "corr-logs-2"

    def lines() -> dict[str, dict]:
        return {
            line["logger"]: line
            for line in json_lines(log)
            if line.get("correlation_id") == "corr-logs-2"
        }

    assert wait_for(lambda: len(lines()) == 2, 10), log.read_text()[-3000:]
    assert lines()["gateway.api"]["message"] == f"GET {path} -> 401"
    assert lines()["django.request"]["level"] == "WARNING"
    assert lines()["django.request"]["message"] == f"Unauthorized: {path}"
    assert "actor" not in lines()["gateway.api"]  # no client was authenticated


def test_the_admin_s_stylesheet_is_served_and_cached_for_good(web, static_root):
    port, _ = web
    status, _, page = request(port, "GET", "/admin/login/", BEHIND_THE_BALANCER)
    assert status == 200
    # The login page names the stylesheet by its content's hash, so browsers may keep it.
    (stylesheet,) = re.findall(r'href="(/static/admin/css/base\.[0-9a-f]{12}\.css)"', page.decode())
    status, headers, body = request(port, "GET", stylesheet, BEHIND_THE_BALANCER)
    assert status == 200
    assert headers["Content-Type"] == 'text/css; charset="utf-8"'
    assert headers["Cache-Control"] == "max-age=315360000, public, immutable"
    assert body == (static_root / stylesheet.removeprefix("/static/")).read_bytes()
    assert body.startswith(b"/*\n    DJANGO Admin styles")  # the admin's own, not an error page

    # Compressed for a browser that accepts it, and the unhashed name too, briefly cached.
    status, headers, _ = request(
        port, "GET", stylesheet, {**BEHIND_THE_BALANCER, "Accept-Encoding": "gzip"}
    )
    assert (status, headers["Content-Encoding"], headers["Vary"]) == (
        200,
        "gzip",
        "Accept-Encoding",
    )
    status, headers, _ = request(port, "GET", "/static/admin/css/base.css", BEHIND_THE_BALANCER)
    assert (status, headers["Cache-Control"]) == (200, "max-age=60, public")

    # Over plain HTTP a static file is redirected to HTTPS like every page of the admin.
    status, headers, _ = request(port, "GET", stylesheet, {"Host": HOST})
    assert (status, headers["Location"]) == (301, f"https://{HOST}{stylesheet}")


def test_an_unknown_static_file_is_our_json_404(web):
    port, _ = web
    status, _, body = request(port, "GET", "/static/admin/css/none.css", BEHIND_THE_BALANCER)
    assert status == 404
    assert json.loads(body)["error"]["code"] == "not_found"

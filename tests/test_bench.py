"""`bench webhooks`' floor: routed only by the benchmark's own URLs, and the same load against
it and the product's webhook stores every floor body and credits every product deposit;
`bench reconcile`'s set-based seed and its measurement by real Celery workers."""

import json
import os
import shutil
import subprocess
import time
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client
from django.urls import Resolver404, resolve

from cutover.models import BalanceMutation, LegacyBalance
from ledger.models import Account
from ledger.selectors import ledger_integrity_checks
from onchain.models import CircleNotification, InboxStatus
from onchain.sandbox import CircleSandbox
from rehearsal.bench_floor import FLOOR_PATH, floor_bodies, floor_receive
from rehearsal.bench_http import webhook_users, webhooks_measure, webhooks_server
from rehearsal.bench_reconcile import reconcile_injected, reconcile_measure, reconcile_seed
from rehearsal.benchmarks import OPENING
from rehearsal.cpu import PROC, benchmark_groups, cpu_per_operation, cpu_read, cpu_spent


def test_the_cpu_split_counts_a_reaped_child_once_and_new_processes_whole():
    before = {1: ("postgres: main", 10.0), 2: ("postgres: backend", 3.0), 9: ("other", 5.0)}
    # backend 2 exited and was reaped by the postmaster (1), whose time now holds its 4.0 s;
    # backend 3 started since; 9 belongs to no group
    after = {1: ("postgres: main", 14.5), 3: ("postgres: backend", 1.0), 9: ("other", 7.0)}
    spent = cpu_spent(before, after, lambda pid, command: "pg" if "postgres" in command else None)
    assert spent == {"pg": 2.5}  # 0.5 of the postmaster's own, 1.0 of backend 2's, 1.0 of 3's
    assert cpu_per_operation(spent, 1000) == {"pg": 2500}
    assert cpu_spent(None, after, lambda pid, command: "pg") == {}


def test_a_benchmark_split_names_postgres_its_server_and_its_load_generator():
    classify = benchmark_groups("senders", server="127.0.0.1:8000")
    gunicorn = "python -m gunicorn config.wsgi:application --bind 127.0.0.1:{}"
    assert classify(1, "postgres: 15/main: postgres bench_x 127.0.0.1(5) idle") == "postgres"
    assert classify(1, "/usr/lib/postgresql/15/bin/postgres -D /var/lib/x") == "postgres"
    assert classify(1, "postgres") == "postgres"  # an exited backend, by its name
    assert classify(1, gunicorn.format(8000)) == "server"
    assert classify(1, gunicorn.format(8001)) is None  # another server
    assert classify(os.getpid(), "python manage.py bench webhooks") == "senders"
    assert classify(1, "python manage.py bench webhooks") is None
    assert benchmark_groups("client")(1, gunicorn.format(8000)) is None  # no server named


def test_an_exited_process_not_yet_reaped_is_read_by_its_name():
    """A backend that ends with a measurement's last connection is a zombie for a moment: no
    command line, but its name and its times (counted as PostgreSQL's by the name)."""
    child = subprocess.Popen([shutil.which("true")])
    try:
        # (On a loaded machine the child may take seconds even to run and exit: found in CI.
        # Waited for by its state, Z: its command line also reads empty for a moment while it
        # execs, which a wait on the command line took for its exit, found in CI.)
        deadline = time.monotonic() + 120
        stat = PROC / str(child.pid) / "stat"
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        assert (PROC / str(child.pid) / "cmdline").read_bytes() == b""
        assert cpu_read()[child.pid][0] == "true"
    finally:
        child.wait()


def test_the_product_does_not_route_the_floor():
    with pytest.raises(Resolver404):
        resolve(FLOOR_PATH, urlconf="config.urls")
    assert resolve(FLOOR_PATH, urlconf="rehearsal.bench_urls").func is floor_receive
    response = Client().post(FLOOR_PATH, b"{}", content_type="application/json")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.django_db(transaction=True)
def test_the_same_load_fills_the_floor_and_credits_every_product_deposit():
    users = 5
    addresses = webhook_users(users)
    try:
        with (
            CircleSandbox() as sandbox,
            webhooks_server(connection.settings_dict["NAME"], sandbox) as port,
        ):
            result = webhooks_measure(port, sandbox, addresses, 2, 1, 0.2)
            forged = sandbox.deliver(
                f"http://127.0.0.1:{port}{FLOOR_PATH}",
                b'{"notificationType": "custody.transfer"}',
                signature=sandbox.sign(b"another body"),
            )
        floor = result["floor"]
        assert floor["deliveries"] > 0 and floor["statuses"] == {"200": floor["deliveries"]}
        assert result["deliveries"] > 0 and result["statuses"] == {"200": result["deliveries"]}
        assert result["ratio"] > 0
        # the CPU per accepted notification of gunicorn, PostgreSQL and the senders, each turn's
        for figures in (result, floor):
            split = figures["cpu_us_per_accepted"]
            assert set(split) == {"server", "postgres", "senders"}, split
            assert min(split.values()) > 0, split

        # The floor stored every body it accepted (a redelivery again; the warm-up's too), the
        # forged one not.
        warmup = result["warmup_accepted"]
        assert warmup["product"] > 0 and warmup["floor"] > 0
        stored = [json.loads(body) for body in floor_bodies()]
        assert len(stored) == floor["accepted"] + warmup["floor"]
        assert {body["notificationType"] for body in stored} == {"custody.transfer"}
        status, answer = forged
        assert status == 401 and answer["error"]["field"] == "X-Circle-Signature"

        # The product processed every notification, counted every delivery, and credited each
        # transfer once with its amount; the floor's transfers are not among them.
        notifications = list(CircleNotification.objects.all())
        assert {row.status for row in notifications} == {InboxStatus.PROCESSED}
        assert sum(row.deliveries for row in notifications) == (
            result["accepted"] + warmup["product"]
        )
        notified = {
            f"circle:transfer:{transfer['id']}": Decimal(transfer["amount"]["amount"])
            for transfer in (json.loads(row.body)["notification"] for row in notifications)
        }
        credited = {
            mutation.reference: mutation.amount
            for mutation in BalanceMutation.objects.filter(reason="circle_deposit")
        }
        assert credited == notified
        assert not {body["notification"]["id"] for body in stored} & {
            reference.removeprefix("circle:transfer:") for reference in credited
        }
        with connection.cursor() as cursor:
            cursor.execute("SELECT sum(buying_power) FROM balances")
            (legacy_total,) = cursor.fetchone()
        assert legacy_total == OPENING * users + sum(notified.values())
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS bench_floor_bodies")


@pytest.mark.django_db(transaction=True)
def test_bench_reconcile_seeds_set_based_and_two_workers_find_every_injected_difference():
    reconcile_seed(300, 3)
    assert LegacyBalance.objects.count() == 300
    assert Account.objects.filter(user_id__isnull=False).count() == 300
    assert not [check.name for check in ledger_integrity_checks() if check.problems]
    injected = reconcile_injected(300, 3)
    result = reconcile_measure(connection.settings_dict["NAME"], 2, injected)
    assert (result["status"], result["users_checked"], result["differences_found"]) == (
        "completed",
        300,
        3,
    )
    assert result["all_injected_found"] and result["peak_rss_mb_pool_process"] > 0

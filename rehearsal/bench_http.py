"""The HTTP benchmarks: gunicorn serving this project on loopback (`api_server`), and the load
of `bench reads` and `bench webhooks` (the product's webhook beside its floor) against it."""

import http.client
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime

from django.conf import settings
from django.db import connections

from onchain.models import DepositAddress
from rehearsal.bench_floor import FLOOR_PATH, floor_table_create
from rehearsal.benchmarks import bench_users_in_phase
from rehearsal.cpu import benchmark_groups, cpu_per_operation, cpu_read, cpu_spent
from rehearsal.runtime import database_url, latency_summary

# --- bench reads ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def api_server(database_name: str, environment: dict | None = None) -> Iterator[int]:
    """gunicorn serving this project on a loopback port, on `database_name` (with `environment`
    added to its settings' environment), laid out as deploy/ runs it (config/gunicorn.py, metrics
    shared through a PROMETHEUS_MULTIPROC_DIR); yields the port."""
    port = _free_port()
    with tempfile.TemporaryFile("w+") as log, tempfile.TemporaryDirectory() as metrics_dir:
        env = {
            **os.environ,
            "DATABASE_URL": database_url(database_name),
            "DJANGO_SETTINGS_MODULE": "config.settings.base",
            "LOG_LEVEL": "WARNING",  # one log line per request would measure the log, not the API
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,  # as deploy/ runs it
            **(environment or {}),
        }
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "config.wsgi:application",
                "--config",
                "python:config.gunicorn",
                "--bind",
                f"127.0.0.1:{port}",
                "--log-level",
                "warning",
            ],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + 30
            while not _answers(port):
                if time.time() > deadline or process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"gunicorn did not start: {log.read()[-2000:]}")
                time.sleep(0.1)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=30)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
            return True
    except OSError:
        return False


# The same load before the clock starts, not counted: gunicorn's workers each answer their
# first requests slowly (Django's URL conf and the database connection set up on first use; a
# stall of 160-200 ms seen at 200 requests/s, which an open loop queues into its p99). The
# webhooks' half of it to each endpoint.
WARMUP_SECONDS = 2


def reads_measure(port: int, token: str, users: list, rps: int, seconds: int) -> dict:
    """An open-loop load at `rps` requests/s of GET .../balance (threads, keep-alive
    connections): latency measured from each request's scheduled time, so a slow server
    cannot hide its queueing. The same load for WARMUP_SECONDS first, not counted."""
    _reads_open_loop(port, token, users, rps, WARMUP_SECONDS)
    latencies, errors, achieved = _reads_open_loop(port, token, users, rps, seconds)
    return {
        "requests": len(latencies),
        "errors": errors,
        "achieved_rps": round(achieved, 1),
        "warmup_seconds": WARMUP_SECONDS,
        **latency_summary(latencies),
    }


def _reads_open_loop(
    port: int, token: str, users: list, rps: int, seconds: int
) -> tuple[list, int, float]:
    total = rps * seconds
    interval = 1.0 / rps
    started = time.perf_counter() + 0.5
    latencies, errors, lock = [], [0], threading.Lock()
    local = threading.local()

    def request(index: int) -> None:
        scheduled = started + index * interval
        time.sleep(max(0.0, scheduled - time.perf_counter()))
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        user = users[index % len(users)]
        try:
            local.conn.request(
                "GET",
                f"/api/v1/users/{user}/balance",
                headers={"Authorization": f"Bearer {token}"},
            )
            response = local.conn.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            local.conn.close()
            del local.conn
            ok = False
        elapsed = (time.perf_counter() - scheduled) * 1000
        with lock:
            latencies.append(elapsed)
            errors[0] += not ok

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(request, range(total)))
    return latencies, errors[0], total / (time.perf_counter() - started)


# --- bench webhooks ---------------------------------------------------------------------------


def webhook_users(count: int) -> list[str]:
    """`count` users in shadow, each with a ledger account and a deposit address; the
    addresses."""
    users = bench_users_in_phase(count, "shadow")
    addresses = [f"0x{index:040x}" for index in range(count)]
    DepositAddress.objects.bulk_create(
        DepositAddress(address=address, chain="ETH", user_id=user)
        for address, user in zip(addresses, users, strict=True)
    )
    return addresses


# Signed before either clock starts, this many per second of each run (the floor's rate with
# room to spare): the load generator shares the machine's cores with the server, and signing is
# Circle's work, not ours.
NOTIFICATIONS_PER_SECOND = 2000
PRODUCT_PATH = "/webhooks/circle/transfers"


@contextmanager
def webhooks_server(database_name: str, sandbox) -> Iterator[int]:
    """gunicorn for `bench webhooks` (api_server) trusting `sandbox`'s key and wallet, serving
    the floor beside the product (rehearsal.bench_settings), the floor's table made first;
    yields the port."""
    floor_table_create()
    connections.close_all()  # this process holds no connection while gunicorn's are measured
    environment = {
        "CIRCLE_API_BASE_URL": sandbox.base_url,
        "CIRCLE_API_KEY": "bench",
        "CIRCLE_WALLET_ID": sandbox.wallet_id,
        "DJANGO_SETTINGS_MODULE": "rehearsal.bench_settings",
    }
    with api_server(database_name, environment) as port:
        yield port


# The floor and the product take turns in short slices, in an order that gives both the same
# mean position (the product first, as in the warm-up before them): the machine's
# speed drifts by a third from minute to minute, and measured one after the other, each would
# have seen another machine.
TURNS = "PFFPFPPF"


def webhooks_measure(
    port: int, sandbox, addresses: list[str], senders: int, seconds: int, redeliver: float
) -> dict:
    """The same load against the floor (signature verified, raw body stored: FLOOR_PATH) and
    against the product's webhook, on the same gunicorn, after a warm-up (WARMUP_SECONDS),
    taking turns (TURNS), `seconds` each in all: the product's figures, the floor's under
    "floor", and "ratio", the product's accepted/s over the floor's."""
    rng = random.Random(7)
    run = uuid.uuid4().hex[:8]  # fresh transfer ids: the product credits each of them
    count = NOTIFICATIONS_PER_SECOND * seconds
    paths = {"P": PRODUCT_PATH, "F": FLOOR_PATH}
    supplies = {
        "F": iter(_deposit_notifications(sandbox, addresses, count, f"floor-{run}", rng)),
        "P": iter(_deposit_notifications(sandbox, addresses, count, f"bench-{run}", rng)),
    }
    warmups = {turn: _Tally() for turn in paths}
    warm_seconds = WARMUP_SECONDS / 2  # to each endpoint, the product first
    warm_count = int(NOTIFICATIONS_PER_SECOND * warm_seconds)
    for turn, path in paths.items():
        warm = _deposit_notifications(sandbox, addresses, warm_count, f"warm{turn}-{run}", rng)
        _load(port, path, sandbox.key_id, iter(warm), senders, warm_seconds, 0, warmups[turn])
    tallies = {turn: _Tally() for turn in paths}
    slice_seconds = seconds * 2 / len(TURNS)
    classify = benchmark_groups("senders", server=f"127.0.0.1:{port}")
    for turn in TURNS:
        before = cpu_read()
        _load(
            port,
            paths[turn],
            sandbox.key_id,
            supplies[turn],
            senders,
            slice_seconds,
            redeliver,
            tallies[turn],
        )
        tallies[turn].cpu_add(cpu_spent(before, cpu_read(), classify))
    floor, product = tallies["F"].summary(), tallies["P"].summary()
    floor_rate = floor["accepted_per_second"]
    ratio = product["accepted_per_second"] / floor_rate if floor_rate else 0.0
    return {
        **product,
        "floor": floor,
        "ratio": round(ratio, 3),
        "warmup_seconds": WARMUP_SECONDS,
        # what the warm-up delivered (credited and stored like the rest, not counted above)
        "warmup_accepted": {
            "product": warmups["P"].summary()["accepted"],
            "floor": warmups["F"].summary()["accepted"],
        },
    }


def _deposit_notifications(
    sandbox, addresses: list[str], count: int, prefix: str, rng: random.Random
) -> list[tuple[bytes, str]]:
    """`count` signed Circle Mint v2 `custody.transfer` notifications of completed USDC deposits
    into `sandbox`'s wallet at `addresses` (transfer ids `prefix-N`): (body, signature)."""
    created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    deliveries = []
    for index in range(count):
        transfer = {
            "id": f"{prefix}-{index}",
            "source": {"type": "blockchain", "chain": "ETH"},
            "destination": {
                "type": "wallet",
                "id": sandbox.wallet_id,
                "address": addresses[index % len(addresses)],
                "chain": "ETH",
            },
            "amount": {"amount": f"{rng.randint(1, 10**6) / 100:.2f}", "currency": "USD"},
            "transactionHash": "0x" + rng.randbytes(32).hex(),
            "status": "complete",
            "createDate": created,
        }
        body = sandbox.notification("custody.transfer", transfer)
        deliveries.append((body, sandbox.sign(body)))
    return deliveries


class _Tally:
    """What one endpoint's slices measured: latencies, statuses, seconds spent, CPU by process."""

    def __init__(self):
        self.latencies, self.statuses, self.seconds = [], {}, 0.0
        self.cpu: dict[str, float] = {}  # CPU seconds by process group (rehearsal.cpu)

    def cpu_add(self, spent: dict) -> None:
        for group, seconds in spent.items():
            self.cpu[group] = self.cpu.get(group, 0.0) + seconds

    def summary(self) -> dict:
        accepted = sum(count for status, count in self.statuses.items() if 200 <= status < 300)
        return {
            "deliveries": len(self.latencies),
            "accepted": accepted,
            "statuses": {str(status): count for status, count in sorted(self.statuses.items())},
            "accepted_per_second": round(accepted / self.seconds, 1) if self.seconds else 0.0,
            **latency_summary(self.latencies),
            "cpu_us_per_accepted": cpu_per_operation(self.cpu, accepted),
        }


def _load(
    port: int,
    path: str,
    key_id: str,
    supply: Iterator[tuple[bytes, str]],
    senders: int,
    seconds: float,
    redeliver: float,
    tally: _Tally,
) -> None:
    """`senders` concurrent senders (keep-alive connections) post deliveries from `supply` to
    `path` for `seconds`, a `redeliver` share of them a second time, as Circle does; each
    delivery's latency and status, and the time spent, added to `tally`."""
    rng = random.Random(11)
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()

    def delivery_next() -> tuple[bytes, str] | None:
        with lock:
            return next(supply, None)

    def sender(_: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        redelivery = None
        while time.perf_counter() < deadline:
            delivery = redelivery or delivery_next()
            if delivery is None:  # every prepared notification was sent
                break
            body, signature = delivery
            redelivery = (
                (body, signature) if redelivery is None and rng.random() < redeliver else None
            )
            started = time.perf_counter()
            try:
                conn.request(
                    "POST",
                    path,
                    body=body,
                    headers={
                        "Content-Type": "application/json",
                        "X-Circle-Signature": signature,
                        "X-Circle-Key-Id": key_id,
                    },
                )
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                status = 0
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                tally.latencies.append(elapsed)
                tally.statuses[status] = tally.statuses.get(status, 0) + 1
        conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=senders) as pool:
        list(pool.map(sender, range(senders)))
    tally.seconds += time.perf_counter() - started

"""The crash matrix's machinery (README, "Fault points"): one driver for every fault point, and
the real processes it runs the product in (gunicorn, a Celery worker, manage.py).

A round, for one point: the flow's state is arranged; its process runs with the point armed
(gateway.faults: it SIGKILLs itself at its `after`-th passage through the point) while the flow
drives traffic, until the point has killed `kills` processes; then the process runs again
without the point while the flow's clients retry (the same Idempotency-Key, the same Circle
notification, the next beat run, the operator's command again) until everything has its final
answer; then the flow and the ledger's invariants name whatever went wrong."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from ledger.selectors import ledger_integrity_checks
from tests.celery import QUIET, wait_for
from tests.cutover.factories import database_url
from tests.model import invariants

ROOT = Path(__file__).resolve().parent.parent

# Kills per point: the CI size (about 3 minutes of the README's test command on 2
# cores); scripts/soak asks 100.
KILLS = int(os.environ.get("CRASH_MATRIX_KILLS", "20"))


def fault_environment(point: str, after: int) -> dict[str, str]:
    return {"LEDGER_FAULT_POINT": point, "LEDGER_FAULT_AFTER": str(after)}


class Flow:
    """One money flow under crashes. `serving(environment)` runs the product's process for a
    block with `environment` added (gunicorn, a Celery worker; for a command, nothing: each
    `step` runs one); `step()` drives one round of traffic (or one run); `kills()` counts the
    processes the armed point has killed; `settle()`, with the process restarted without the
    point, retries until every operation has its final answer; `violations()` names what is
    wrong then (the ledger's invariants are the driver's)."""

    after = 2  # the armed process dies at its after-th passage through the point

    def prepare(self) -> None:
        raise NotImplementedError

    @contextmanager
    def serving(self, environment: dict[str, str]) -> Iterator[None]:
        raise NotImplementedError
        yield

    def step(self) -> None:
        raise NotImplementedError

    def kills(self) -> int:
        raise NotImplementedError

    def settle(self) -> None:
        raise NotImplementedError

    def violations(self) -> list[str]:
        raise NotImplementedError


@dataclass(frozen=True)
class CrashRound:
    point: str
    kills: int
    steps: int
    seconds: float
    violations: list[str]


def crash_round(flow: Flow, point: str, kills: int, seconds: float) -> CrashRound:
    """Arrange, run with `point` armed until it killed `kills` processes (within `seconds`),
    restart without it and settle; what went wrong."""
    flow.prepare()
    started = time.monotonic()
    steps = 0
    with flow.serving(fault_environment(point, flow.after)):
        while (died := flow.kills()) < kills:
            if time.monotonic() - started > seconds:
                raise AssertionError(f"{point}: {died} of {kills} kills in {steps} steps")
            flow.step()
            steps += 1
    with flow.serving({}):
        flow.settle()
    return CrashRound(
        point, died, steps, time.monotonic() - started, flow.violations() + ledger_violations()
    )


def ledger_violations() -> list[str]:
    """`ledger verify` (balanced transactions, cached balances, hash chains) and the money
    model's invariants, at rest."""
    found = [
        f"ledger verify: {check.name}: {problem}"
        for check in ledger_integrity_checks()
        for problem in check.problems
    ]
    for invariant in (
        invariants.balances_non_negative,
        invariants.stores_agree_or_named,
        invariants.conservation,
        invariants.holds_match_withdrawals,
        invariants.conversions_within_source_minimum,
        invariants.nothing_stuck,
    ):
        found += [f"{invariant.__name__}: {problem}" for problem in invariant()]
    return found


# Clients over HTTP -------------------------------------------------------------------------

DROPPED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


@dataclass
class Call:
    """A client's operation over HTTP, sent again until it has a final answer: `effect` is what
    it does to `user`'s balance once answered with a success."""

    path: str
    headers: dict[str, str]
    body: bytes | None
    user: uuid.UUID
    effect: Decimal
    method: str = "POST"
    answers: list[tuple[int, dict]] = field(default_factory=list)
    drops: int = 0  # sent, and the connection closed without an answer

    def send(self, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            connection.request(self.method, self.path, body=self.body, headers=self.headers)
            response = connection.getresponse()
            raw = response.read()
        except DROPPED:
            self.drops += 1
            return
        finally:
            connection.close()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"not_json": raw[:200].decode(errors="replace")}
        self.answers.append((response.status, body))


# The processes ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def gunicorn_running(environment: dict[str, str], log: Path) -> Iterator[int]:
    """gunicorn (config/gunicorn.py, two workers) on the test database, its output in `log`;
    yields its port. The app is loaded once in the master (--preload), so a worker killed by a
    fault point is replaced by a fork, not by loading Django again."""
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "LOG_LEVEL": "WARNING",
        **environment,
    }
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "config.wsgi:application"),
                *("--config", "python:config.gunicorn", "--workers", "2", "--preload"),
                *("--bind", f"127.0.0.1:{port}", "--log-level", "warning"),
            ],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            assert wait_for(lambda: _answers(port) or process.poll() is not None, 60)
            assert process.poll() is None, log.read_text()[-3000:]
            yield port
        finally:
            process.terminate()
            process.wait(timeout=60)


def workers_killed(log: Path) -> int:
    """gunicorn's workers that died of SIGKILL, as its master logged them."""
    return log.read_text().count("was sent SIGKILL")


# How soon a worker gives back the message of a pool process that died: Celery notices the
# death at once, but raises WorkerLostError (and puts the message back) only at the pool's next
# upkeep, every 5 s, after worker_lost_wait (10 s) has passed. The matrix kills a pool process
# at every step, so its worker's upkeep runs every 50 ms and waits as long; nothing else differs
# from `celery -A config worker`.
CELERY_WORKER = (
    "import sys; from celery.concurrency import asynpool; from config.celery import app; "
    "asynpool.AsynPool.timers = property(lambda pool: {pool.maintain_pool: 0.05}); "
    "app.conf.worker_lost_wait = 0.05; app.worker_main(sys.argv[1:])"
)


@contextmanager
def celery_worker(queue: str, environment: dict[str, str], log: Path) -> Iterator[None]:
    """One Celery worker (prefork, one pool process, as deployed but smaller) consuming
    `queue`, on the test database, `environment` added, its output in `log`; stopped with
    SIGTERM (a warm shutdown) when the block ends."""
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", CELERY_WORKER, "worker", "-Q", queue, "-c", "1", *QUIET],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": database_url(), **environment},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            yield
        finally:
            process.terminate()
            process.wait(timeout=60)


def manage(*args: str, environment: dict[str, str]) -> subprocess.CompletedProcess:
    """`manage.py` on the test database, `environment` added; its outcome."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url(), **environment},
        capture_output=True,
        text=True,
        timeout=300,
    )

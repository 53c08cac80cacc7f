"""Real Celery processes for the tests: a worker (and a beat) over Redis on the test database,
laid out as deploy/ runs them, stopped with SIGTERM when the block ends."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.cutover.factories import database_url

ROOT = Path(__file__).resolve().parent.parent
QUIET = ("--without-heartbeat", "--without-mingle", "--without-gossip")
WORKER_WITH_BEAT = ("worker", "--beat", "-c", "1", "--pool", "solo", *QUIET)


@contextmanager
def celery_running(
    *commands: tuple[str, ...], environment: dict[str, str], log=subprocess.DEVNULL
) -> Iterator[None]:
    """One process per command (`("worker", ...)`, `("beat",)`), with `environment` added."""
    env = {**os.environ, "DATABASE_URL": database_url(), **environment}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", *command],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for command in commands
    ]
    try:
        yield
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)


def wait_for(condition: Callable[[], bool], seconds: float = 60, every: float = 0.2) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False

"""Scratch databases (`rehearsal.runtime.scratch_database`, what `bench` and `rehearse` run in)
do not outlive their runs: one whose process was killed before it could drop it is dropped by
the next scratch database made on the server, and only then; one in use, or kept on purpose
(`bench --seed-only`), is left alone."""

import os
import signal
import subprocess
import sys

import pytest
from django.db import connection

from rehearsal import runtime
from tests.crash import ROOT
from tests.cutover.factories import database_url

pytestmark = pytest.mark.django_db(transaction=True)

MAKER = """
import os, sys, time
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
import django
django.setup()
from rehearsal.runtime import scratch_database
with scratch_database("orphan", keep=sys.argv[1] == "keep") as name:
    print(name, flush=True)
    time.sleep(600)
"""


def databases() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database")
        return {row[0] for row in cursor.fetchall()}


def maker_started(mode: str) -> tuple[subprocess.Popen, str]:
    """A process inside scratch_database, and the database's name once it is made."""
    maker = subprocess.Popen(
        [sys.executable, "-c", MAKER, mode],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url()},
        stdout=subprocess.PIPE,
        text=True,
    )
    name = maker.stdout.readline().strip()
    assert name.startswith("orphan_"), name
    return maker, name


def killed(maker: subprocess.Popen) -> None:
    maker.send_signal(signal.SIGKILL)  # no finally of its own runs
    maker.wait(timeout=60)


# (Another test's scratch database, made meanwhile on the same server, may be the one that
# drops an orphan: the assertions are on the outcome, whoever dropped it.)


def test_a_killed_runs_scratch_database_is_dropped_by_the_next_one_never_one_in_use():
    maker, name = maker_started("drop")
    try:
        assert name in databases()
        assert name not in runtime.scratch_orphans_drop()  # its maker lives: in use
        with runtime.scratch_database("next"):
            assert name in databases()
    finally:
        killed(maker)

    with runtime.scratch_database("next") as other:
        assert name not in databases()
        assert other in databases()
    assert other not in databases()


def test_a_kept_scratch_database_outlives_its_maker_and_the_next_run():
    maker, name = maker_started("keep")
    killed(maker)  # inside the block: never handed over, so still scratch
    with runtime.scratch_database("kept", keep=True) as kept:
        pass
    try:
        assert name not in databases()
        assert runtime.scratch_orphans_drop() == []
        with runtime.scratch_database("next"):
            assert kept in databases()
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE "{kept}" WITH (FORCE)')

"""The deployment checklist's own drills, run on a populated database: "Test migration rollback"
(`migrate ... down 1`, then `up`: each app's latest migration unapplied and applied again) and
"Backup production database" / "Restore from Backup" (`pg_dump`, then `psql` into a new
database). After each, nothing is lost: every table holds what it held, `ledger verify` is
clean, and the schema is what it was."""

import json
import shutil
import subprocess
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.db.migrations.loader import MigrationLoader

from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.operators import api_client_issue
from cutover.phase_machine import phase_advance
from cutover.reconciliation import reconciliation_run
from onchain.addresses import deposit_address_add
from onchain.withdrawals import withdrawal_request
from rehearsal import runtime
from tests.cutover.factories import custody_open_all, legacy_user
from treasury.cycle import settlement_cycle_run

pytestmark = pytest.mark.django_db(transaction=True)
OPS = Actor("cli:drill")
OUR_APPS = ("ledger", "gateway", "cutover", "onchain", "treasury")


@pytest.fixture(autouse=True)
def short_gates(settings):
    settings.CUTOVER_SHADOW_MIN_DURATION = timedelta(0)


def rollout_populate() -> None:
    """A small rollout in shadow, through the services: legacy users in two currencies
    backfilled, custody opened, mutations, a withdrawal held, a deposit address, an API client,
    a conversion job, and a discrepancy found by reconciliation."""
    users = [legacy_user("100"), legacy_user("250.5"), legacy_user("0.000001")]
    legacy_user("40", currency="USD")
    backfill_run()
    custody_open_all(usdc="350.500001", usd="60000")
    phase_advance(to="shadow", actor=OPS, reason="drill")
    balance_credit(user_id=users[0], amount="25", reference="drill:credit", reason="drill")
    balance_debit(user_id=users[1], amount="0.5", reference="drill:debit", reason="drill")
    withdrawal_request(user_id=users[0], amount="30", address=f"0x{'ab' * 20}", chain="ETH")
    deposit_address_add(
        address=f"0x{'cd' * 20}", chain="ETH", user_id=users[1], actor=OPS, reason="drill"
    )
    api_client_issue(name="drill", scopes=["read", "debit"], actor=OPS, reason="drill")
    assert settlement_cycle_run(triggered_by="drill").jobs_created  # USDC below its minimum
    with connection.cursor() as cursor:  # the legacy store drifts behind the path's back
        cursor.execute("UPDATE balances SET buying_power = 1 WHERE user_id = %s", [users[2]])
    assert reconciliation_run(triggered_by="drill").new_discrepancies == 1


TABLES_SQL = """
    SELECT table_name FROM information_schema.tables
     WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name
"""


def database_content() -> dict[str, tuple[int, str]]:
    """Every table's row count and a digest of its rows (the migration records by name only:
    a migration applied again is recorded at a new time)."""
    content = {}
    with connection.cursor() as cursor:
        cursor.execute(TABLES_SQL)
        for (table,) in cursor.fetchall():
            rows = "t.app || '.' || t.name" if table == "django_migrations" else "t::text"
            cursor.execute(
                f"SELECT count(*), md5(coalesce(string_agg({rows}, chr(10) ORDER BY {rows}), ''))"
                f' FROM "{table}" t'
            )
            content[table] = cursor.fetchone()
    return content


def user_balances() -> dict[str, dict]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT user_id::text, buying_power, currency FROM balances")
        legacy = {user: (amount, currency) for user, amount, currency in cursor.fetchall()}
        cursor.execute("SELECT user_id::text, balance, currency FROM ledger_user_balances")
        ledger = {user: (amount, currency) for user, amount, currency in cursor.fetchall()}
        cursor.execute("SELECT code, balance FROM ledger_system_balances")
        system = dict(cursor.fetchall())
    return {"legacy": legacy, "ledger": ledger, "system": system}


def ledger_verified() -> dict:
    out = StringIO()
    call_command("ledger", "verify", "--json", stdout=out)
    return json.loads(out.getvalue())


def pg_binary(name: str) -> str:
    binary = shutil.which(name)
    assert binary, f"{name} not found: install Debian's postgresql-client package"
    return binary


def run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def schema() -> str:
    """The database's schema as pg_dump writes it, without the random key of its `\\restrict`
    lines (psql's guard against a dump's content running meta-commands)."""
    url = runtime.database_url(connection.settings_dict["NAME"])
    dump = run(pg_binary("pg_dump"), "--schema-only", url).stdout
    return "\n".join(
        line for line in dump.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))
    )


def latest_migrations() -> dict[str, tuple[str, str]]:
    """Each of our apps' latest migration and the one before it."""
    graph = MigrationLoader(connection).graph
    latest = {}
    for app in OUR_APPS:
        (leaf,) = graph.leaf_nodes(app)
        (previous,) = (parent for parent in graph.node_map[leaf].parents if parent[0] == app)
        latest[app] = (leaf[1], previous[1])
    return latest


def test_each_apps_latest_migration_goes_down_and_up_again_losing_nothing():
    """The checklist's `migrate ... down 1` then `migrate ... up`: `manage.py migrate <app>
    <previous>` then `manage.py migrate`, for each app's latest migration, on a database of its
    own holding a rollout in shadow."""
    with runtime.scratch_database("drill"):
        rollout_populate()
        content, balances, shape = database_content(), user_balances(), schema()
        assert ledger_verified()["ok"] is True
        for app, (latest, previous) in latest_migrations().items():
            call_command("migrate", app, previous, interactive=False, verbosity=0)
            applied = MigrationLoader(connection).applied_migrations
            assert (app, latest) not in applied and (app, previous) in applied
            call_command("migrate", interactive=False, verbosity=0)
            assert (app, latest) in MigrationLoader(connection).applied_migrations
            assert database_content() == content, app
            assert user_balances() == balances, app
            assert ledger_verified()["ok"] is True, app
            assert schema() == shape, app


def test_a_backup_restored_into_a_new_database_verifies_and_holds_the_same_balances():
    """The checklist's `pg_dump $DATABASE_URL > backup.sql`, restored with `psql` into a new
    database (stopping at the first error, in one transaction): `ledger verify` passes there
    and every balance and row is what the backup was taken from."""
    rollout_populate()
    content, balances = database_content(), user_balances()
    original = connection.settings_dict["NAME"]
    restored = f"restored_{uuid.uuid4().hex[:10]}"
    backup = run(pg_binary("pg_dump"), runtime.database_url(original)).stdout
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{restored}"')
    try:
        subprocess.run(
            [
                pg_binary("psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "--single-transaction",
                runtime.database_url(restored),
            ],
            input=backup,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        connections.close_all()
        connection.settings_dict["NAME"] = restored
        try:
            verified = ledger_verified()
            assert verified["ok"] is True, verified
            assert user_balances() == balances
            assert database_content() == content
        finally:
            connections.close_all()
            connection.settings_dict["NAME"] = original
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{restored}" WITH (FORCE)')

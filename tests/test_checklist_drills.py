"""The deployment checklist's own drills, run on a populated database: "Test migration rollback"
(`migrate ... down 1`, then `up`: each app's latest migration unapplied and applied again) and
"Backup production database" / "Restore from Backup" (`pg_dump`, then `psql` into a new
database). After each, nothing is lost: every table holds what it held, `ledger verify` is
clean, and the schema is what it was."""

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import DatabaseError, IntegrityError, connection, connections
from django.db.migrations.loader import MigrationLoader
from django.utils import timezone

from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.balance_path import balance_credit, balance_debit
from cutover.legacy_archive import legacy_archive
from cutover.models import PhaseState
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
    settings.CUTOVER_READ_SWITCH_MIN_DURATION = timedelta(0)
    settings.CUTOVER_STRICT_MIN_DURATION = timedelta(0)


def rollout_populate() -> uuid.UUID:
    """A small rollout in shadow, through the services: legacy users in two currencies
    backfilled, custody opened, mutations, a withdrawal held, a deposit address, an API client,
    a conversion job, and a discrepancy found by reconciliation (its user returned)."""
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
    return users[2]


TABLES_SQL = """
    SELECT table_schema, table_name FROM information_schema.tables
     WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
       AND table_type = 'BASE TABLE'
     ORDER BY 1, 2
"""


# What a migration's way down may forget, with the table it made: the processes' bookkeeping,
# no money and no audit. The buffer alert's last observed state (cutover 0012: the next
# observation writes it again), the Celery task deliveries (onchain 0012: which messages ran),
# and the fetches of signing material and the SNS certificate URLs that failed (onchain 0016: a
# rate limit's count and a cache of refusals, both fetched again at worst).
RE_OBSERVED = {
    "cutover_alert_states",
    "celery_task_deliveries",
    "onchain_signing_fetches",
    "onchain_sns_certificate_failures",
}


def database_content() -> dict[str, tuple[int, str]]:
    """Every table's row count and a digest of its rows (the migration records by name only:
    a migration applied again is recorded at a new time), but the RE_OBSERVED ones."""
    content = {}
    with connection.cursor() as cursor:
        cursor.execute(TABLES_SQL)
        for schema_name, table in cursor.fetchall():
            if table in RE_OBSERVED:
                continue
            rows = "t.app || '.' || t.name" if table == "django_migrations" else "t::text"
            cursor.execute(
                f"SELECT count(*), md5(coalesce(string_agg({rows}, chr(10) ORDER BY {rows}), ''))"
                f' FROM "{schema_name}"."{table}" t'
            )
            name = table if schema_name == "public" else f"{schema_name}.{table}"
            content[name] = cursor.fetchone()
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


def run(*args: str, given: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, input=given, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ERROR" not in result.stderr, result.stderr
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

        # A way down that would lose data is refused and changes nothing: gateway 0001 does not
        # know the `addresses` scope, and no client loses one.
        api_client_issue(name="wallets", scopes=["addresses"], actor=OPS, reason="drill")
        content = database_content()
        with pytest.raises(IntegrityError, match="cutover_api_clients_chk_scopes"):
            call_command("migrate", "gateway", "0001", interactive=False, verbosity=0)
        assert database_content() == content and schema() == shape


def backup_take() -> str:
    """The checklist's backup, `pg_dump $DATABASE_URL > backup.sql`, of this process's database."""
    return run(pg_binary("pg_dump"), runtime.database_url(connection.settings_dict["NAME"])).stdout


@contextmanager
def restored_copy(backup: str | None = None) -> Iterator[str]:
    """A backup (by default one taken now) restored with `psql` into a new database (stopping
    at the first error, in one transaction), which this process uses for the block; then
    dropped."""
    original = connection.settings_dict["NAME"]
    restored = f"restored_{uuid.uuid4().hex[:10]}"
    backup = backup_take() if backup is None else backup
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{restored}"')
    try:
        psql = (pg_binary("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction")
        run(*psql, runtime.database_url(restored), given=backup)
        connections.close_all()
        connection.settings_dict["NAME"] = restored
        try:
            yield restored
        finally:
            connections.close_all()
            connection.settings_dict["NAME"] = original
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{restored}" WITH (FORCE)')


def rollout_cut_over_and_archived(drifted_user) -> None:
    """From rollout_populate's shadow: the drift undone (reconciliation resolves it), the gates
    forced to cutover (the equality proof is not), 91 days there, and the legacy store
    archived."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE balances SET buying_power = 0.000001 WHERE user_id = %s", [drifted_user]
        )
    assert reconciliation_run(triggered_by="drill").resolved == 1
    phase_advance(to="read_switch", actor=OPS, force=True, reason="drill", read_percent=100)
    phase_advance(to="strict", actor=OPS, force=True, reason="drill")
    phase_advance(to="cutover", actor=OPS, force=True, reason="drill")
    PhaseState.objects.filter(pk=1).update(entered_at=timezone.now() - timedelta(days=91))
    assert legacy_archive(actor=OPS, reason="drill: phase 5").created


def test_a_backup_restores_into_a_new_database_that_verifies_with_the_same_balances():
    """In shadow, and again after the legacy store's archive (Phase 5): the restored copy
    passes `ledger verify`, holds every row and balance the backup was taken from (the
    archive's too) and keeps the archive's rules."""
    with runtime.scratch_database("drill"):
        drifted = rollout_populate()
        content, balances = database_content(), user_balances()
        with restored_copy():
            assert ledger_verified()["ok"] is True
            assert user_balances() == balances
            assert database_content() == content

        rollout_cut_over_and_archived(drifted)
        content, balances = database_content(), user_balances()
        assert balances["legacy"] == {} and content["legacy_archive.balances"][0] == 4
        with restored_copy():
            assert ledger_verified()["ok"] is True
            assert user_balances() == balances
            assert database_content() == content
            for refused in (
                "UPDATE cutover_phase_state SET phase = 'legacy'",
                "UPDATE balances SET buying_power = 1",
                "DELETE FROM legacy_archive.balances",
            ):
                with (
                    pytest.raises(DatabaseError, match="the legacy store is archived"),
                    connection.cursor() as cursor,
                ):
                    cursor.execute(refused)

"""The deployment checklist's SQL, taken from the checklist itself
(deploy/checklist/ledger-deployment-checklist.md, the seed's copy) and run unchanged against the
migrated database holding users in both stores, postings, system accounts and conversion jobs:
each statement runs and answers what the checklist says it checks. The one edit is the
operator's: `<uuid>` becomes a user's id."""

import re
import shutil
import subprocess
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from ledger.models import Account
from tests.cutover.factories import database_url, ledger_balance_set, legacy_user
from tests.treasury.factories import fund
from treasury.cycle import settlement_cycle_run
from treasury.models import BufferThreshold, ConversionJob, ConversionProvider

CHECKLIST = (
    Path(__file__).resolve().parent.parent / "deploy/checklist/ledger-deployment-checklist.md"
)
SQL_BLOCK = re.compile(r"^[ \t]*```sql\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
PSQL_COMMAND = re.compile(r'psql \$\w+ -c "([^"]*)"')
USER_PLACEHOLDER = "'<uuid>'"


def checklist_statements() -> list[str]:
    """Every statement of the checklist's ```sql blocks, in order, without its comment lines."""
    statements = []
    for block in SQL_BLOCK.findall(CHECKLIST.read_text()):
        code = "\n".join(line for line in block.splitlines() if not line.strip().startswith("--"))
        statements += [statement.strip() for statement in code.split(";") if statement.strip()]
    return statements


def statement(fragment: str) -> str:
    """The checklist's one distinct statement containing `fragment`."""
    found = {text for text in checklist_statements() if fragment in text}
    assert len(found) == 1, f"{fragment!r} is in {len(found)} distinct checklist statements"
    return found.pop()


SYSTEM_ACCOUNTS = "SELECT * FROM ledger_accounts WHERE user_id IS NULL"
SYSTEM_BALANCES = "SELECT id, account_type, currency, balance"
THRESHOLDS = "SELECT * FROM buffer_thresholds"
PROVIDERS = "SELECT * FROM conversion_providers"
INTEGRITY = "le.entry_type = 'debit'"
BUFFER_STATUS = "SELECT * FROM v_buffer_status"
RECENT_JOBS = "SELECT * FROM conversion_jobs"
USER_BALANCE = "FROM v_user_balances"
RECONCILIATION = "FROM users u"
DEPRECATION = "COMMENT ON TABLE balances"
CHECKED = [
    SYSTEM_ACCOUNTS,
    SYSTEM_BALANCES,
    THRESHOLDS,
    PROVIDERS,
    INTEGRITY,
    BUFFER_STATUS,
    RECENT_JOBS,
    USER_BALANCE,
    RECONCILIATION,
    DEPRECATION,
]


def rows(sql: str) -> list[dict]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def user_balance_plan(user_id: uuid.UUID) -> str:
    """The checklist's `EXPLAIN ANALYZE` of `v_user_balances`, for `user_id`: its plan's text."""
    timed = statement(USER_BALANCE)
    assert USER_PLACEHOLDER in timed
    # On a few dozen accounts the planner rightly reads the whole table; told not to, it shows
    # the index a production-sized table is read through.
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
        plan = rows(timed.replace(USER_PLACEHOLDER, f"'{user_id}'"))
    return "\n".join(row["QUERY PLAN"] for row in plan)


@pytest.fixture
def world():
    """Users in both stores (one of them differing, one in the ledger only, one in the legacy
    store only, one in USD, one off by less than a cent), the buffers funded, one settlement
    cycle's conversion job and one job of two hours ago."""
    users = {
        "agrees": legacy_user("100"),
        "differs": legacy_user("50"),
        "ledger_only": uuid.uuid4(),
        "legacy_only": legacy_user("30"),
        "usd": legacy_user("20", currency="USD"),
        "within_a_cent": legacy_user("10.004"),
    }
    ledger_balance_set(users["agrees"], "100")
    ledger_balance_set(users["differs"], "40")
    ledger_balance_set(users["ledger_only"], "7")
    ledger_balance_set(users["usd"], "25", currency="USD")
    ledger_balance_set(users["within_a_cent"], "10")
    fund("usdc_buffer", "1000")  # below its minimum of 5,000
    fund("fiat_buffer", "60000")
    cycle = settlement_cycle_run(triggered_by="test")
    assert len(cycle.jobs_created) == 1, cycle.buffers
    old = ConversionJob.objects.create(
        idempotency_key=uuid.uuid4(),
        buffer_currency="USDC",
        source_currency="USD",
        source_amount=Decimal("100"),
        target_currency="USDC",
        provider=ConversionProvider.objects.get(code="due"),
        status="failed",
        created_by="test",
        created_at=timezone.now() - timedelta(hours=2),
    )
    return {"users": users, "recent_job": cycle.jobs_created[0], "old_job": old.pk}


def test_every_sql_statement_of_the_checklist_is_checked_here():
    distinct = set(checklist_statements())
    assert len(checklist_statements()) == 12 and len(distinct) == 10
    for text in distinct:
        assert sum(fragment in text for fragment in CHECKED) == 1, text


@pytest.mark.django_db(transaction=True)
def test_system_accounts_are_the_accounts_without_a_user(world):
    expected = {row["code"]: row["balance"] for row in rows("SELECT * FROM ledger_system_balances")}
    assert {"usdc_buffer", "fiat_buffer", "opening_balance_equity_usdc"} <= set(expected)
    listed = rows(statement(SYSTEM_ACCOUNTS))
    assert {row["code"]: row["balance"] for row in listed} == expected
    assert {row["user_id"] for row in listed} == {None}

    by_id = {row["id"]: row for row in rows(statement(SYSTEM_BALANCES))}
    assert set(by_id) == {row["id"] for row in listed}
    buffer = Account.objects.get(code="usdc_buffer")
    assert by_id[buffer.pk] == {
        "id": buffer.pk,
        "account_type": "usdc_buffer",
        "currency": "USDC",
        "balance": Decimal("1000"),
    }


@pytest.mark.django_db(transaction=True)
def test_providers_and_thresholds_are_the_seeded_ones(world):
    assert [
        (row["code"], row["enabled"], row["healthy"]) for row in rows(statement(PROVIDERS))
    ] == [("due", True, True)]
    seeded = {
        threshold.currency: (threshold.minimum, threshold.target, threshold.maximum)
        for threshold in BufferThreshold.objects.all()
    }
    assert seeded == {
        "USDC": (Decimal("5000"), Decimal("20000"), Decimal("100000")),
        "USD": (Decimal("10000"), Decimal("50000"), Decimal("500000")),
    }
    assert {
        row["currency"]: (row["minimum"], row["target"], row["maximum"])
        for row in rows(statement(THRESHOLDS))
    } == seeded


@pytest.mark.django_db(transaction=True)
def test_the_integrity_query_finds_no_unbalanced_transaction_and_would_find_one(world):
    entries = rows(
        "SELECT count(*) AS n, count(*) FILTER (WHERE entry_type IS DISTINCT FROM side) AS other"
        " FROM ledger_entries"
    )[0]
    assert entries["n"] > 0 and entries["other"] == 0
    assert rows(statement(INTEGRITY)) == []

    # Inside the database transaction that writes it, before the COMMIT that would refuse it.
    buffer = Account.objects.get(code="usdc_buffer")
    equity = Account.objects.get(code="opening_balance_equity_usdc")
    with pytest.raises(DatabaseError, match="does not balance"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO ledger_transactions (namespace, reference_id, kind, fingerprint)"
                " VALUES ('test', 'unbalanced', 'test', '') RETURNING id"
            )
            unbalanced = cursor.fetchone()[0]
            cursor.execute(
                "INSERT INTO ledger_entries (transaction_id, account_id, currency, side, amount)"
                " VALUES (%s, %s, 'USDC', 'debit', 10), (%s, %s, 'USDC', 'credit', 4)",
                [unbalanced, buffer.pk, unbalanced, equity.pk],
            )
        assert rows(statement(INTEGRITY)) == [
            {"id": unbalanced, "debits": Decimal("10"), "credits": Decimal("4")}
        ]
        with connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    assert rows(statement(INTEGRITY)) == []


@pytest.mark.django_db(transaction=True)
def test_buffer_status_reads_the_buffers_against_their_thresholds(world):
    assert {
        row["currency"]: (row["balance"], row["state"]) for row in rows(statement(BUFFER_STATUS))
    } == {
        "USDC": (Decimal("1000"), "below_min"),
        "USD": (Decimal("60000"), "ok"),
    }


@pytest.mark.django_db(transaction=True)
def test_recent_conversion_jobs_are_those_of_the_last_hour(world):
    listed = rows(statement(RECENT_JOBS))
    assert [row["id"] for row in listed] == [world["recent_job"]]
    assert listed[0]["source_currency"] == "USD" and listed[0]["target_currency"] == "USDC"
    assert listed[0]["status"] == "pending"
    assert ConversionJob.objects.filter(pk=world["old_job"]).exists()


@pytest.mark.django_db(transaction=True)
def test_user_balances_are_the_ledger_balances(world):
    users = world["users"]
    expected = {
        (users["agrees"], "USDC", Decimal("100")),
        (users["differs"], "USDC", Decimal("40")),
        (users["ledger_only"], "USDC", Decimal("7")),
        (users["usd"], "USD", Decimal("25")),
        (users["within_a_cent"], "USDC", Decimal("10")),
    }
    listed = rows("SELECT user_id, currency, balance FROM v_user_balances")
    assert {(row["user_id"], row["currency"], row["balance"]) for row in listed} == expected

    text = user_balance_plan(users["differs"])
    assert "Index Scan" in text and "actual time=" in text and "rows=1 loops=1" in text, text


@pytest.mark.django_db(transaction=True)
def test_the_manual_reconciliation_counts_the_users_whose_stores_differ(world):
    """`differs` (50 against 40) and `ledger_only` (a missing legacy row is 0); not the user in
    the legacy store only (no ledger account yet), the USD user (no usdc_balance account) or
    the one 0.004 apart."""
    users = world["users"]
    assert {row["id"] for row in rows("SELECT id FROM users")} == set(users.values())
    assert rows(statement(RECONCILIATION)) == [{"count": 2}]


@pytest.mark.django_db(transaction=True)
def test_the_legacy_table_can_be_marked_deprecated(world):
    comment = statement(DEPRECATION)
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(comment)
        assert rows("SELECT obj_description('balances'::regclass, 'pg_class') AS text") == [
            {"text": "DEPRECATED: Use ledger_accounts instead. To be archived 2025-XX-XX"}
        ]
        transaction.set_rollback(True)


def psql(command: str) -> str:
    binary = shutil.which("psql")
    assert binary, "psql not found: install Debian's postgresql-client package"
    result = subprocess.run(
        [binary, database_url(), "-X", "-v", "ON_ERROR_STOP=1", "-c", command],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


# `\dt` lists tables only: the ledger's are tables, the checklist's treasury names are views
# over the treasury's tables, which `\dv` lists.
RELATIONS_LISTED = {
    "\\dt ledger*": {
        "ledger_accounts",
        "ledger_currencies",
        "ledger_entries",
        "ledger_transactions",
    },
    "\\dt conversion*": set(),
    "\\dt buffer*": set(),
    "\\dv (conversion|buffer)*": {"conversion_providers", "conversion_jobs", "buffer_thresholds"},
}


def relations_listed() -> dict[str, set[str]]:
    """What each of the checklist's `psql -c "\\d..."` lists (and `\\dv` of its treasury names)."""
    commands = [*PSQL_COMMAND.findall(CHECKLIST.read_text()), "\\dv (conversion|buffer)*"]
    return {
        command: set(re.findall(r"^ public \| (\w+)", psql(command), re.MULTILINE))
        for command in commands
    }


@pytest.mark.django_db
def test_the_psql_listings_find_the_checklists_relations():
    assert relations_listed() == RELATIONS_LISTED

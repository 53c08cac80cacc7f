"""Each app's contract with PostgreSQL: migrations run frozen copies of their SQL, the last of
which is the living definition, and every SQLSTATE an app's SQL raises is mapped to a domain
error in its exceptions.py."""

import importlib
import re
from pathlib import Path

import pytest
from django.db import DatabaseError, connection, transaction

from cutover.balance_path import balance_credit
from cutover.exceptions import AppendOnlyRecord, cutover_error_from
from onchain.exceptions import DepositAddressRefused, onchain_rules
from onchain.models import DepositAddress
from tests.cutover.factories import legacy_user

ROOT = Path(__file__).resolve().parent.parent
SQL_APPS = {
    "ledger": "ledger.sql",
    "cutover": "cutover.sql",
    "onchain": "onchain.sql",
    "treasury": "treasury.sql",
}


def test_migrations_run_frozen_sql_only():
    """A migration never reads a living SQL file (its effect would change with every edit)."""
    for app in SQL_APPS:
        for path in (ROOT / app / "migrations").glob("0*.py"):
            text = path.read_text()
            assert "parent.parent" not in text, f"{path.relative_to(ROOT)} reads {app}/sql/"
            for name in re.findall(r'"(\d{4}_\w+\.sql)"', text):
                assert (path.parent / "sql" / name).exists(), f"{path.name}: {name} missing"


@pytest.mark.parametrize("app", sorted(SQL_APPS))
def test_the_last_frozen_copy_is_the_living_sql(app):
    """ledger/sql/ledger.sql and the others are what the database holds after `migrate`: a
    change to one needs a new migration with its frozen copy."""
    frozen = sorted(
        path
        for path in (ROOT / app / "migrations" / "sql").glob("0*.sql")
        if not path.stem.endswith("_drop")
    )
    living = ROOT / app / "sql" / SQL_APPS[app]
    assert frozen[-1].read_text() == living.read_text(), (
        f"{living.relative_to(ROOT)} differs from {frozen[-1].relative_to(ROOT)}: "
        "add a migration that runs a frozen copy of it"
    )


@pytest.mark.parametrize("app", sorted(SQL_APPS))
def test_every_sqlstate_raised_is_mapped(app):
    raised = set(
        re.findall(r"ERRCODE = '([A-Z0-9]{5})'", (ROOT / app / "sql" / SQL_APPS[app]).read_text())
    )
    mapped = importlib.import_module(f"{app}.exceptions").SQLSTATE_ERRORS
    assert raised and raised <= set(mapped), f"{app}: {sorted(raised - set(mapped))} unmapped"


@pytest.mark.django_db
def test_a_deposit_address_refused_by_postgresql_is_a_domain_error():
    """OC002: a deposit address for a user who holds another currency."""
    user = legacy_user(amount="10", currency="USD")
    with (
        pytest.raises(DepositAddressRefused, match="holds USD, not USDC"),
        onchain_rules(),
        transaction.atomic(),
    ):
        DepositAddress.objects.create(address="0xusd-user", chain="ETH", user_id=user)


@pytest.mark.django_db(transaction=True)
def test_a_change_to_the_append_only_journal_is_a_domain_error():
    """CU001: the audit trail and the balance path's journal are append-only."""
    user = legacy_user("10")
    balance_credit(user_id=user, amount="5", reference="once", reason="t")
    with (
        pytest.raises(DatabaseError) as refused,
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute("DELETE FROM cutover_balance_mutations")
    error = cutover_error_from(refused.value)
    assert isinstance(error, AppendOnlyRecord)
    assert "append-only" in str(error)

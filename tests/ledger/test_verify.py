"""`ledger verify` finds tampering: altered amounts, cached balances and broken chains."""

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from ledger.models import Entry
from ledger.services import Leg, transaction_post
from tests.ledger.factories import UserAccountFactory, fund

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def history():
    alice, bob = UserAccountFactory(), UserAccountFactory()
    fund(alice, "100")
    for index in range(3):
        transaction_post(
            namespace="verify",
            reference_id=f"t{index}",
            kind="transfer",
            legs=[Leg.debit(alice, "10"), Leg.credit(bob, "10")],
        )
    return alice, bob


def verify(*args) -> tuple[str, str | None]:
    out = StringIO()
    try:
        call_command("ledger", "verify", *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), str(exc)
    return out.getvalue(), None


def tamper(statement: str, params: list) -> None:
    """What an attacker with table access could do: the immutability trigger switched off."""
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_immutable")
        cursor.execute(statement, params)
        cursor.execute("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_immutable")


def test_clean_ledger_verifies(history):
    output, error = verify()
    assert error is None
    assert output.count("ok  ") == 4


def test_json_output_for_machines(history):
    output, error = verify("--json")
    report = json.loads(output)
    assert error is None and report["ok"] is True
    assert {c["name"] for c in report["checks"]} == {
        "balanced",
        "two_legs",
        "cached_balances",
        "hash_chains",
    }


def test_tampered_amount_is_caught(history):
    _alice, bob = history
    entry = Entry.objects.filter(account=bob).order_by("seq")[1]
    tamper("UPDATE ledger_entries SET amount = 1000 WHERE id = %s", [entry.pk])
    output, error = verify()
    assert error == "ledger verify failed: balanced, cached_balances, hash_chains"
    assert f"account {bob.pk}, entry {entry.pk} (seq 2): hash does not match" in output
    assert f"transaction {entry.transaction_id}: USDC" in output


def test_rewritten_hash_still_breaks_the_chain(history):
    _alice, bob = history
    entry = Entry.objects.filter(account=bob).order_by("seq")[0]
    tamper("UPDATE ledger_entries SET hash = repeat('a', 64) WHERE id = %s", [entry.pk])
    output, error = verify()
    assert error == "ledger verify failed: hash_chains"
    assert "link to previous entry broken" in output


def test_cached_balance_drift_is_caught(history):
    """PostgreSQL refuses such an update (ledger_accounts_guard); an owner who disables the
    guard to make it is still caught by verify."""
    _alice, bob = history
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("ALTER TABLE ledger_accounts DISABLE TRIGGER ledger_accounts_guard")
        cursor.execute("UPDATE ledger_accounts SET balance = balance + 1 WHERE id = %s", [bob.pk])
        cursor.execute("ALTER TABLE ledger_accounts ENABLE TRIGGER ledger_accounts_guard")
    output, error = verify()
    assert error == "ledger verify failed: cached_balances"
    assert f"account {bob.pk}: cached balance 31.000000 but entries sum to 30.000000" in output


def test_an_account_moved_one_entry_on_by_another_trigger_is_caught(history):
    """What ledger_accounts_guard lets through since ledger 0017 without an entry: an update
    made inside someone else's trigger that moves the count by one and the chain to a new head,
    as the entry trigger's own update does. It lands; `ledger verify` finds it."""
    _alice, bob = history
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            """
            CREATE TABLE test_forge (account_id bigint);
            CREATE FUNCTION test_forge() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                UPDATE ledger_accounts SET balance = balance + 1, entry_count = entry_count + 1,
                       last_hash = repeat('f', 64) WHERE id = NEW.account_id;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_forge BEFORE INSERT ON test_forge
                FOR EACH ROW EXECUTE FUNCTION test_forge();
            """
        )
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("INSERT INTO test_forge VALUES (%s)", [bob.pk])
    finally:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("DROP TABLE test_forge; DROP FUNCTION test_forge()")
    output, error = verify()
    assert error is not None and "cached_balances" in error
    assert f"account {bob.pk}: cached balance 31.000000 but entries sum to 30.000000" in output

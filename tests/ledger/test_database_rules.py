"""The ledger's rules hold against raw SQL too: PostgreSQL refuses what Python would."""

import json
from decimal import Decimal

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction

from ledger.models import Account, Entry, Transaction
from ledger.selectors import system_account
from tests.ledger.factories import UserAccountFactory, fund
from tests.scans import sequential_scans, sequential_scans_since

pytestmark = pytest.mark.django_db(transaction=True)


def sql(statement: str, params: list | None = None) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(statement, params or [])


def insert_transaction(reference: str) -> str:
    return (
        "INSERT INTO ledger_transactions (namespace, reference_id, kind, fingerprint) "
        f"VALUES ('raw', '{reference}', 'raw', 'x') RETURNING id"
    )


def raw_posting(reference: str, legs: list[tuple[int, str, str, str]]) -> None:
    values = ", ".join(
        f"((SELECT id FROM t), {account}, '{currency}', '{side}', {amount})"
        for account, side, amount, currency in legs
    )
    sql(
        f"WITH t AS ({insert_transaction(reference)}) "
        "INSERT INTO ledger_entries (transaction_id, account_id, currency, side, amount) "
        f"VALUES {values}"
    )


def sqlstate(excinfo) -> str:
    return excinfo.value.__cause__.sqlstate


@pytest.fixture
def user():
    account = UserAccountFactory()
    fund(account, "100")
    return Account.objects.get(pk=account.pk)


@pytest.fixture
def clearing():
    return system_account(code="deposits_clearing_usdc")


def test_raw_balanced_posting_is_accepted_and_moves_cached_balances(user, clearing):
    raw_posting("ok", [(clearing.pk, "debit", "5", "USDC"), (user.pk, "credit", "5", "USDC")])
    user.refresh_from_db()
    assert user.balance == Decimal("105")
    entry = Entry.objects.get(transaction__reference_id="ok", account=user)
    assert entry.seq == 2
    assert entry.balance_after == Decimal("105")
    assert len(entry.hash) == 64 and entry.prev_hash != entry.hash


def test_raw_unbalanced_transaction_fails(user, clearing):
    with pytest.raises(DatabaseError) as excinfo:
        raw_posting("bad", [(clearing.pk, "debit", "5", "USDC"), (user.pk, "credit", "4", "USDC")])
    assert sqlstate(excinfo) == "LD006"
    assert not Transaction.objects.filter(reference_id="bad").exists()
    user.refresh_from_db()
    assert user.balance == Decimal("100")


def test_raw_single_leg_transaction_fails(clearing):
    with pytest.raises(DatabaseError) as excinfo:
        raw_posting("one", [(clearing.pk, "debit", "0", "USDC")])
    assert not Transaction.objects.filter(reference_id="one").exists()
    assert sqlstate(excinfo) in {"LD005", "LD008"}


def test_transaction_without_entries_fails_at_commit():
    with pytest.raises(DatabaseError) as excinfo:
        sql(insert_transaction("empty"))
    assert sqlstate(excinfo) == "LD008"
    assert not Transaction.objects.filter(reference_id="empty").exists()


def test_entries_added_later_to_an_existing_transaction_fail(user, clearing):
    raw_posting("first", [(clearing.pk, "debit", "5", "USDC"), (user.pk, "credit", "5", "USDC")])
    txn = Transaction.objects.get(reference_id="first")
    with pytest.raises(DatabaseError) as excinfo:
        sql(
            "INSERT INTO ledger_entries (transaction_id, account_id, currency, side, amount) "
            "VALUES (%s, %s, 'USDC', 'debit', 1), (%s, %s, 'USDC', 'credit', 1)",
            [txn.pk, clearing.pk, txn.pk, user.pk],
        )
    assert sqlstate(excinfo) == "LD008"
    assert Entry.objects.filter(transaction=txn).count() == 2


def test_raw_write_driving_a_user_negative_fails(user, clearing):
    with pytest.raises(DatabaseError) as excinfo:
        raw_posting(
            "neg", [(user.pk, "debit", "100.01", "USDC"), (clearing.pk, "credit", "100.01", "USDC")]
        )
    assert sqlstate(excinfo) == "LD002"
    user.refresh_from_db()
    assert user.balance == Decimal("100")


@pytest.mark.parametrize(
    "assignment",
    [
        "balance = balance + 1",
        "balance = 0",
        "entry_count = entry_count + 1",
        "last_hash = repeat('a', 64)",
        "currency = 'USD'",
        "normal_balance = 'debit'",
        "balance = balance + 1, entry_count = entry_count + 1",
        # as an entry moves it, but from a statement, not from the entry's trigger
        "balance = balance + 1, entry_count = entry_count + 1, last_hash = repeat('b', 64)",
    ],
)
def test_raw_update_of_an_account_is_refused(user, assignment):
    before = Account.objects.values("balance", "entry_count", "last_hash", "currency").get(
        pk=user.pk
    )
    with pytest.raises(DatabaseError) as excinfo:
        sql(f"UPDATE ledger_accounts SET {assignment} WHERE id = %s", [user.pk])
    assert sqlstate(excinfo) == "LD009"
    after = Account.objects.values("balance", "entry_count", "last_hash", "currency").get(
        pk=user.pk
    )
    assert after == before


@pytest.mark.parametrize(
    "columns, values",
    [
        ("balance", "1000000"),
        ("entry_count", "3"),
        ("last_hash", "repeat('a', 64)"),
        ("balance, entry_count", "5, 1"),
    ],
)
def test_raw_insert_of_an_account_holding_money_is_refused(columns, values):
    """An account opened with a balance (or entries, or a chain head) would hold money no entry
    moved, and could be spent: PostgreSQL refuses it, and nothing is written."""
    before = Account.objects.count()
    with pytest.raises(DatabaseError) as excinfo:
        sql(
            "INSERT INTO ledger_accounts (user_id, account_type, currency, normal_balance, "
            f"allow_negative, {columns}) VALUES (gen_random_uuid(), 'usdc_balance', 'USDC', "
            f"'credit', false, {values})"
        )
    assert sqlstate(excinfo) == "LD009"
    assert Account.objects.count() == before


def test_a_raw_insert_of_an_empty_account_opens_it():
    sql(
        "INSERT INTO ledger_accounts (user_id, account_type, currency, normal_balance, "
        "allow_negative) VALUES ('00000000-0000-0000-0000-00000000abcd', 'usdc_balance', 'USDC', "
        "'credit', false)"
    )
    opened = Account.objects.get(user_id="00000000-0000-0000-0000-00000000abcd")
    assert (opened.balance, opened.entry_count) == (Decimal(0), 0)


@pytest.mark.parametrize(
    "assignment",
    [
        "balance = balance + 1",
        "balance = balance + 1, entry_count = entry_count + 1",
        "balance = balance + 1, last_hash = repeat('c', 64)",
        "balance = balance + 1, entry_count = entry_count + 2, last_hash = repeat('c', 64)",
    ],
)
def test_update_from_another_trigger_is_refused_too(user, assignment):
    """Only the entry-apply trigger may move a balance: a trigger of someone else's (one level
    deeper than a raw statement, like the apply's own update) is refused as well unless it
    moves the account exactly one entry on (see ledger_accounts_guard on what that leaves to
    `ledger verify`)."""
    sql(
        f"""
        CREATE TABLE test_sneak (account_id bigint);
        CREATE FUNCTION test_sneak() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE ledger_accounts SET {assignment} WHERE id = NEW.account_id;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_sneak BEFORE INSERT ON test_sneak
            FOR EACH ROW EXECUTE FUNCTION test_sneak();
        """
    )
    try:
        with pytest.raises(DatabaseError) as excinfo:
            sql("INSERT INTO test_sneak VALUES (%s)", [user.pk])
        assert sqlstate(excinfo) == "LD009"
    finally:
        sql("DROP TABLE test_sneak; DROP FUNCTION test_sneak()")
    assert Account.objects.get(pk=user.pk).balance == Decimal("100")


def test_with_the_guard_bypassed_a_user_balance_still_never_goes_below_zero(user):
    """An owner who disables the guard trigger still meets the CHECK constraint."""
    with (
        pytest.raises(IntegrityError) as excinfo,
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute("ALTER TABLE ledger_accounts DISABLE TRIGGER ledger_accounts_guard")
        cursor.execute("UPDATE ledger_accounts SET balance = -1 WHERE id = %s", [user.pk])
    assert "ledger_accounts_chk_non_negative" in str(excinfo.value)


def test_user_account_cannot_be_declared_negative_allowed(user):
    with pytest.raises(IntegrityError) as excinfo:
        sql("UPDATE ledger_accounts SET allow_negative = true WHERE id = %s", [user.pk])
    assert "ledger_accounts_chk_user_never_negative" in str(excinfo.value)


OPEN_ACCOUNT = (
    "INSERT INTO ledger_accounts (user_id, code, account_type, currency, normal_balance, "
    "allow_negative) VALUES ({user_id}, {code}, 'usdc_balance', 'USDC', {side}, {negative})"
)


@pytest.mark.parametrize(
    "values, constraint",
    [
        (
            {
                "user_id": "gen_random_uuid()",
                "code": "NULL",
                "side": "'credit'",
                "negative": "true",
            },
            "ledger_accounts_chk_user_never_negative",
        ),
        (
            {
                "user_id": "gen_random_uuid()",
                "code": "'both'",
                "side": "'credit'",
                "negative": "false",
            },
            "ledger_accounts_chk_user_or_system",
        ),
        (
            {"user_id": "NULL", "code": "NULL", "side": "'debit'", "negative": "true"},
            "ledger_accounts_chk_user_or_system",
        ),
        (
            {"user_id": "NULL", "code": "'sideways'", "side": "'across'", "negative": "true"},
            "ledger_accounts_chk_normal_balance",
        ),
    ],
)
def test_an_account_opened_against_its_kind_is_refused_by_name(values, constraint):
    """Ledger 0016 holds these three rules in a trigger (ledger_accounts_rules) instead of CHECK
    constraints: an insert that breaks one fails as the CHECK failed, by the same name."""
    before = Account.objects.count()
    with pytest.raises(IntegrityError) as excinfo:
        sql(OPEN_ACCOUNT.format(**values))
    assert sqlstate(excinfo) == "23514"
    assert excinfo.value.__cause__.diag.constraint_name == constraint
    assert constraint in str(excinfo.value)
    assert Account.objects.count() == before


@pytest.mark.parametrize(
    "assignment, constraint",
    [
        ("code = 'mine'", "ledger_accounts_chk_user_or_system"),
        ("user_id = NULL", "ledger_accounts_chk_user_or_system"),
    ],
)
def test_a_user_account_is_not_made_a_system_account(user, assignment, constraint):
    with pytest.raises(IntegrityError) as excinfo:
        sql(f"UPDATE ledger_accounts SET {assignment} WHERE id = %s", [user.pk])
    assert excinfo.value.__cause__.diag.constraint_name == constraint
    user.refresh_from_db()
    assert user.user_id is not None and user.code is None


def test_a_posting_updates_accounts_under_the_balance_check_only():
    """The account rules that cannot change with a posting are no CHECK constraints, which
    PostgreSQL would prepare again at every account update (two per posting); the balance's
    own CHECK stays, and the rules' trigger fires only when their columns are written. The
    entries' rules are the entry trigger's (ledger 0017): no CHECK on the entries either."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conname FROM pg_constraint "
            "WHERE conrelid = 'ledger_accounts'::regclass AND contype = 'c'"
        )
        assert [name for (name,) in cursor.fetchall()] == ["ledger_accounts_chk_non_negative"]
        cursor.execute(
            "SELECT conname FROM pg_constraint "
            "WHERE conrelid = 'ledger_entries'::regclass AND contype = 'c'"
        )
        assert cursor.fetchall() == []
        cursor.execute(
            "SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_trigger t "
            "JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum = ANY (t.tgattr) "
            "WHERE t.tgname = 'ledger_accounts_rules'"
        )
        assert cursor.fetchone()[0] == ["allow_negative", "code", "normal_balance", "user_id"]


def test_a_posting_moves_its_accounts_without_calling_the_guard(user, clearing):
    """ledger_accounts_guard's WHEN clause lets the entry trigger's two account updates through
    without calling the guard's function (which read the call stack at each of them); the
    trigger still fires for anything else (the tests above)."""
    legs = json.dumps(
        [
            {"account_id": clearing.pk, "side": "debit", "amount": "1", "currency": "USDC"},
            {"account_id": user.pk, "side": "credit", "amount": "1", "currency": "USDC"},
        ]
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL track_functions = 'all'")
        cursor.execute("SELECT ledger_post_transaction('guard', 'when', 'guard', '{}', %s)", [legs])
        cursor.execute(
            "SELECT funcname, calls FROM pg_stat_xact_user_functions "
            "WHERE funcname IN ('ledger_entry_apply', 'ledger_account_guard')"
        )
        calls = dict(cursor.fetchall())
    assert calls == {"ledger_entry_apply": 2}
    assert Account.objects.get(pk=user.pk).balance == Decimal("101")


@pytest.mark.parametrize(
    "side, amount, code",
    [("across", "1", "23514"), ("debit", "0", "LD005"), ("debit", "-1", "LD005")],
)
def test_an_entry_against_the_entry_rules_is_refused_by_name(user, clearing, side, amount, code):
    """The entries' CHECKs are the entry trigger's (ledger 0017): a side other than debit or
    credit fails as the CHECK did, by its name; an amount that is not positive as LD005 (which
    always came before the CHECK). Nothing is written."""
    before = (Transaction.objects.count(), Entry.objects.count())
    with pytest.raises(DatabaseError) as excinfo:
        raw_posting(
            "rules", [(clearing.pk, side, amount, "USDC"), (user.pk, "credit", amount, "USDC")]
        )
    assert sqlstate(excinfo) == code
    if code == "23514":
        assert excinfo.value.__cause__.diag.constraint_name == "ledger_entries_chk_side"
    assert (Transaction.objects.count(), Entry.objects.count()) == before
    assert Account.objects.get(pk=user.pk).balance == Decimal("100")


def test_duplicate_reference_in_a_namespace_fails(user, clearing):
    raw_posting("dup", [(clearing.pk, "debit", "1", "USDC"), (user.pk, "credit", "1", "USDC")])
    with pytest.raises(IntegrityError) as excinfo:
        raw_posting("dup", [(clearing.pk, "debit", "1", "USDC"), (user.pk, "credit", "1", "USDC")])
    assert "ledger_transactions_uniq_reference" in str(excinfo.value)
    assert Transaction.objects.filter(reference_id="dup").count() == 1


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET amount = amount + 1",
        "DELETE FROM ledger_entries",
        "UPDATE ledger_transactions SET kind = 'other'",
        "DELETE FROM ledger_transactions",
    ],
)
def test_entries_and_transactions_are_immutable(user, statement):
    with pytest.raises(DatabaseError) as excinfo:
        sql(statement)
    assert sqlstate(excinfo) == "LD007"
    user.refresh_from_db()
    assert user.balance == Decimal("100")
    assert Entry.objects.filter(account=user).get().amount == Decimal("100")


def test_amount_finer_than_the_currency_fails():
    usd_user = UserAccountFactory(currency_id="USD", account_type="usd_balance")
    clearing = system_account(code="deposits_clearing_usd")
    with pytest.raises(DatabaseError) as excinfo:
        raw_posting(
            "fine",
            [(clearing.pk, "debit", "1.005", "USD"), (usd_user.pk, "credit", "1.005", "USD")],
        )
    assert sqlstate(excinfo) == "LD005"


def test_entry_currency_must_be_its_accounts(user):
    clearing = system_account(code="deposits_clearing_usd")
    with pytest.raises(DatabaseError) as excinfo:
        raw_posting("cur", [(clearing.pk, "debit", "1", "USD"), (user.pk, "credit", "1", "USD")])
    assert sqlstate(excinfo) == "LD004"


# The entries' foreign keys are gone (ledger 0012): the entry trigger and these rules hold what
# they held.
def test_an_account_with_entries_is_never_deleted(user):
    with pytest.raises(DatabaseError) as excinfo:
        sql("DELETE FROM ledger_accounts WHERE id = %s", [user.pk])
    assert sqlstate(excinfo) == "LD009"
    assert Account.objects.filter(pk=user.pk).exists()
    assert Entry.objects.filter(account=user).count() == user.entry_count == 1


def test_an_account_without_entries_can_be_deleted():
    account = UserAccountFactory()
    sql("DELETE FROM ledger_accounts WHERE id = %s", [account.pk])
    assert not Account.objects.filter(pk=account.pk).exists()


def test_an_accounts_id_never_changes(user):
    with pytest.raises(DatabaseError) as excinfo:
        sql("UPDATE ledger_accounts SET id = id + 1000000 WHERE id = %s", [user.pk])
    assert sqlstate(excinfo) == "LD009"
    assert Entry.objects.get(account_id=user.pk).account_id == user.pk


@pytest.mark.parametrize("missing", ["transaction", "account"])
def test_an_entry_naming_what_does_not_exist_is_refused(user, clearing, missing):
    transaction_id = "999999999" if missing == "transaction" else "(SELECT id FROM t)"
    account_id = 999999999 if missing == "account" else user.pk
    with pytest.raises(DatabaseError) as excinfo:
        sql(
            f"WITH t AS ({insert_transaction('orphan')}) "
            "INSERT INTO ledger_entries (transaction_id, account_id, currency, side, amount) "
            f"VALUES ({transaction_id}, {account_id}, 'USDC', 'credit', 1), "
            f"((SELECT id FROM t), {clearing.pk}, 'USDC', 'debit', 1)"
        )
    assert sqlstate(excinfo) == ("LD008" if missing == "transaction" else "LD003")
    assert not Transaction.objects.filter(reference_id="orphan").exists()
    assert Entry.objects.filter(account=user).count() == 1


def test_the_entry_checks_read_by_index_however_small_the_tables_were_when_planned(user, clearing):
    """The entry trigger's and the commit check's look-ups are planned once per connection and
    kept until the table is analyzed again. Planned when the ledger was nearly empty (a new
    deployment, or one just backfilled, analyzed), a sequential scan looked cheapest and every
    later entry read the whole table: a deposit's cost grew with the ledger (bench webhooks
    halved in 15 s). However small the tables were, they read by index."""
    sql("ANALYZE ledger_transactions")
    sql("ANALYZE ledger_entries")
    legs = json.dumps(
        [
            {"account_id": clearing.pk, "side": "debit", "amount": "1", "currency": "USDC"},
            {"account_id": user.pk, "side": "credit", "amount": "1", "currency": "USDC"},
        ]
    )
    with transaction.atomic(), connection.cursor() as cursor:
        before = sequential_scans("ledger_transactions", "ledger_entries")
        for n in range(3):
            cursor.execute(
                "SELECT ledger_post_transaction('plan', %s, 'plan', '{}', %s)", [f"r{n}", legs]
            )
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the commit check, run now
        sequential = sequential_scans_since(before)
    assert Entry.objects.filter(transaction__namespace="plan").count() == 6
    assert sequential == {"ledger_transactions": 0, "ledger_entries": 0}


@pytest.fixture
def nested_plans():
    """The plans of the statements this connection runs, nested ones too (auto_explain), as
    their texts."""
    plans = []
    connection.ensure_connection()
    raw = connection.connection

    def collect(diagnostic):
        plans.append(diagnostic.message_primary)

    raw.add_notice_handler(collect)
    settings = {"log_min_duration": "0", "log_nested_statements": "on", "log_level": "notice"}
    with connection.cursor() as cursor:
        cursor.execute("LOAD 'auto_explain'")
        for name, value in settings.items():
            cursor.execute(f"SET auto_explain.{name} = {value}")
    yield plans
    raw.remove_notice_handler(collect)
    with connection.cursor() as cursor:
        for name in settings:
            cursor.execute(f"RESET auto_explain.{name}")


def test_the_commit_check_is_planned_once_per_connection(user, clearing, nested_plans):
    """Left to choose, PostgreSQL re-planned the commit check's query at every COMMIT (a tenth
    of a deposit's time in PostgreSQL): it runs a generic plan, kept, from its first call."""
    legs = json.dumps(
        [
            {"account_id": clearing.pk, "side": "debit", "amount": "1", "currency": "USDC"},
            {"account_id": user.pk, "side": "credit", "amount": "1", "currency": "USDC"},
        ]
    )
    sql("SELECT ledger_post_transaction('plan', 'once', 'plan', '{}', %s)", [legs])
    checks = [plan for plan in nested_plans if "WHERE transaction_id = NEW.id" in plan]
    assert len(checks) == 1
    assert "Index Cond: (transaction_id = $" in checks[0]


def test_the_commit_check_is_never_a_parallel_plan(user, clearing, nested_plans):
    """After a backfill (a few transactions of many entries) the statistics make every
    transaction look large, and the commit check's generic plan became a parallel one, set up
    at every COMMIT. Here parallel plans are made as cheap as they can be: still none."""
    many = [
        {"account_id": clearing.pk, "side": "debit", "amount": "0.01", "currency": "USDC"},
        {"account_id": user.pk, "side": "credit", "amount": "0.01", "currency": "USDC"},
    ] * 200
    sql("SELECT ledger_post_transaction('plan', 'backfill', 'plan', '{}', %s)", [json.dumps(many)])
    sql("ANALYZE ledger_entries")
    cheap = {
        "parallel_setup_cost": "0",
        "parallel_tuple_cost": "0",
        "min_parallel_index_scan_size": "0",
        "min_parallel_table_scan_size": "0",
    }
    with connection.cursor() as cursor:
        for name, value in cheap.items():
            cursor.execute(f"SET {name} = {value}")
    try:
        sql(
            "SELECT ledger_post_transaction('plan', 'after', 'plan', '{}', %s)",
            [json.dumps(many[:2])],
        )
    finally:
        with connection.cursor() as cursor:
            for name in cheap:
                cursor.execute(f"RESET {name}")
    checks = [plan for plan in nested_plans if "FROM ledger_entries WHERE transaction_id" in plan]
    assert len(checks) == 2
    assert not [plan for plan in checks if "Gather" in plan or "Parallel" in plan]
    assert Account.objects.get(pk=user.pk).balance == Decimal("102.01")


def test_the_entry_hash_is_inlined_where_it_is_used():
    """ledger_entry_hash is a plain expression to the planner (in the entry trigger and in
    `ledger verify`), not a function whose body is parsed and planned at every call."""
    with connection.cursor() as cursor:
        cursor.execute(
            "EXPLAIN (VERBOSE, COSTS OFF) SELECT ledger_entry_hash(e.prev_hash, e.id, "
            "e.transaction_id, e.account_id, e.currency, e.side, e.amount, e.seq) "
            "FROM ledger_entries e"
        )
        plan = "\n".join(line for (line,) in cursor.fetchall())
    assert "sha256(" in plan
    assert "ledger_entry_hash" not in plan

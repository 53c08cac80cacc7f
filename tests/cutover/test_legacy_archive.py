"""The checklist's Phase 5, "Archive legacy tables after 90 days": refused before its time and
outside cutover, then once (audited; a second run changes nothing), and afterwards the product
keeps working on the ledger while the legacy store stays closed: no write, no rollback."""

import json
import uuid
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from cutover.actors import Actor
from cutover.backfill import backfill_run
from cutover.balance_path import balance_mutation_apply
from cutover.exceptions import (
    AppendOnlyRecord,
    ArchiveRefused,
    LegacyStoreArchived,
    OperatorNotPermitted,
    ReasonRequired,
    TransitionRefused,
    cutover_error_from,
)
from cutover.legacy_archive import legacy_archive
from cutover.models import LegacyArchive, LegacyBalance, OperatorAudit, PhaseState
from cutover.phase_machine import kill_switch_set, phase_rollback, phase_rollback_rehearse
from cutover.selectors import balance_get, user_currency
from onchain.addresses import deposit_address_add
from tests.cutover.factories import legacy_user, phase_set
from tests.test_deployment_checklist import RECONCILIATION, statement

pytestmark = pytest.mark.django_db
OPS = Actor("cli:ops")
REASON = "90 days in cutover, legacy no longer read"


def in_cutover_for(days: float) -> None:
    phase_set("cutover")
    PhaseState.objects.filter(pk=1).update(entered_at=timezone.now() - timedelta(days=days))


@pytest.fixture
def users() -> dict[str, uuid.UUID]:
    """Users as the cutover leaves them: backfilled, both stores equal, in two currencies, one
    with a zero legacy balance (no ledger account)."""
    found = {
        "usdc": legacy_user("100.5"),
        "other": legacy_user("20"),
        "usd": legacy_user("40", currency="USD"),
        "empty": legacy_user("0"),
    }
    assert backfill_run().postings == 3
    return found


def rows(sql: str, params=()) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def legacy_rows(table: str = "balances") -> set[tuple]:
    return set(rows(f"SELECT user_id, buying_power, currency FROM {table}"))


def archive_table_exists() -> bool:
    return rows("SELECT to_regclass('legacy_archive.balances')")[0][0] is not None


def archive_cmd(*args: str) -> str:
    out = StringIO()
    call_command("cutover", "archive-legacy", *args, stdout=out)
    return out.getvalue()


def test_refused_before_its_time_in_cutover_saying_when(users):
    in_cutover_for(89.5)
    entered = PhaseState.objects.get(pk=1).entered_at
    before = legacy_rows()
    with pytest.raises(ArchiveRefused) as refused:
        legacy_archive(actor=OPS, reason=REASON)
    assert str(refused.value) == (
        f"in cutover since {entered:%Y-%m-%d %H:%M} UTC (89.5 days); the legacy store is "
        "archived after 90 days in cutover (CUTOVER_LEGACY_ARCHIVE_AFTER): from "
        f"{entered + timedelta(days=90):%Y-%m-%d %H:%M} UTC"
    )
    assert legacy_rows() == before
    assert not LegacyArchive.objects.exists() and not archive_table_exists()
    assert not OperatorAudit.objects.filter(action="legacy.archive").exists()


@pytest.mark.parametrize("phase", ["legacy", "shadow", "read_switch", "strict"])
def test_refused_outside_cutover_however_long_ago(users, phase):
    phase_set(phase)
    PhaseState.objects.filter(pk=1).update(entered_at=timezone.now() - timedelta(days=400))
    with pytest.raises(
        ArchiveRefused,
        match=f"^the legacy store is archived in cutover only, after 90 days there; the phase "
        f"is {phase}$",
    ):
        legacy_archive(actor=OPS, reason=REASON)
    assert len(legacy_rows()) == 4 and not archive_table_exists()


def test_the_time_is_a_setting(users, settings):
    settings.CUTOVER_LEGACY_ARCHIVE_AFTER = timedelta(days=30)
    in_cutover_for(29)
    with pytest.raises(ArchiveRefused, match=r"archived after 30 days in cutover"):
        legacy_archive(actor=OPS, reason=REASON)
    in_cutover_for(31)
    assert legacy_archive(actor=OPS, reason=REASON).archive.min_time_in_cutover == timedelta(
        days=30
    )


def test_after_90_days_the_rows_move_to_the_archive_once_audited(users):
    in_cutover_for(91)
    entered = PhaseState.objects.get(pk=1).entered_at
    before = legacy_rows()
    ledger_before = set(rows("SELECT user_id, balance, currency FROM ledger_user_balances"))

    result = legacy_archive(actor=OPS, reason=REASON)

    assert result.created
    assert legacy_rows("legacy_archive.balances") == before
    assert legacy_rows() == set()
    assert set(rows("SELECT user_id, balance, currency FROM ledger_user_balances")) == ledger_before
    archive = LegacyArchive.objects.get()
    assert (archive.table_name, archive.archived_as, archive.rows) == (
        "balances",
        "legacy_archive.balances",
        4,
    )
    assert archive.totals == {
        "USD": {"rows": 1, "total": "40.000000"},
        "USDC": {"rows": 3, "total": "120.500000"},
    }
    assert archive.cutover_entered_at == entered
    assert archive.min_time_in_cutover == timedelta(days=90)
    assert (archive.archived_by, archive.reason) == ("cli:ops", REASON)
    audit = OperatorAudit.objects.get(action="legacy.archive")
    assert audit == result.audit
    assert (audit.actor, audit.target, audit.reason) == ("cli:ops", "table:balances", REASON)
    assert audit.before == {
        "phase": "cutover",
        "in_cutover_since": entered.isoformat(),
        "rows": 4,
        "totals": archive.totals,
    }
    assert audit.after == {"archived_as": "legacy_archive.balances", "rows": 4, "rows_left": 0}
    (live, kept) = rows(
        "SELECT obj_description('balances'::regclass, 'pg_class'),"
        " obj_description('legacy_archive.balances'::regclass, 'pg_class')"
    )[0]
    assert live.startswith("ARCHIVED: balances live in ledger_accounts; the legacy rows were")
    assert "after 91 days in cutover" in live and "(4 rows)" in kept

    again = legacy_archive(actor=OPS, reason="once more")
    assert not again.created and again.archive == archive and again.audit is None
    assert LegacyArchive.objects.count() == 1
    assert OperatorAudit.objects.filter(action="legacy.archive").count() == 1
    assert legacy_rows("legacy_archive.balances") == before


def test_needs_a_reason_and_the_permission(users):
    in_cutover_for(91)
    with pytest.raises(ReasonRequired, match="needs a written --reason"):
        legacy_archive(actor=OPS, reason="  ")
    clerk = User.objects.create_user("clerk", is_staff=True)
    with pytest.raises(OperatorNotPermitted, match=r"lacks the permission cutover\.archive_legacy"):
        legacy_archive(actor=Actor.for_user(clerk), reason=REASON)
    assert not LegacyArchive.objects.exists() and not archive_table_exists()


def refused_by_postgresql(sql: str, params=()) -> Exception:
    with (
        pytest.raises(DatabaseError) as raised,
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(sql, params)
    return cutover_error_from(raised.value)


def test_after_the_archive_there_is_no_way_back_and_no_legacy_write(users):
    in_cutover_for(91)
    legacy_archive(actor=OPS, reason=REASON)

    message = (
        "rollback refused: the legacy store was archived into legacy_archive.balances at .* by "
        "cli:ops; there is no legacy store to roll back to"
    )
    with pytest.raises(TransitionRefused, match=message):
        phase_rollback(actor=OPS, reason="incident")
    with pytest.raises(TransitionRefused, match=message):
        phase_rollback_rehearse()
    assert PhaseState.objects.get(pk=1).phase == "cutover"
    assert legacy_rows() == set()

    # PostgreSQL holds it too, whoever writes.
    left = refused_by_postgresql("UPDATE cutover_phase_state SET phase = 'legacy' WHERE id = 1")
    assert isinstance(left, LegacyStoreArchived)
    assert "no legacy store to go back to (cutover -> legacy refused)" in str(left)
    for sql in (
        f"INSERT INTO balances (user_id, buying_power) VALUES ('{uuid.uuid4()}', 1)",
        "UPDATE legacy_archive.balances SET buying_power = 0",
        "DELETE FROM legacy_archive.balances",
        "TRUNCATE legacy_archive.balances",
    ):
        refused = refused_by_postgresql(sql)
        assert isinstance(refused, LegacyStoreArchived), sql
        assert "the legacy store is archived" in str(refused)
    assert len(legacy_rows("legacy_archive.balances")) == 4
    assert isinstance(
        refused_by_postgresql("DELETE FROM cutover_legacy_archives"), AppendOnlyRecord
    )


def test_postgresql_records_an_archive_only_in_cutover_after_its_time(users):
    phase_set("strict")
    entered = PhaseState.objects.get(pk=1).entered_at
    insert = (
        "INSERT INTO cutover_legacy_archives (table_name, archived_as, rows, totals,"
        " cutover_entered_at, min_time_in_cutover, archived_by, reason)"
        " VALUES ('balances', 'x', 0, '{}', %s, interval '90 days', 'sql', 'r')"
    )
    outside = refused_by_postgresql(insert, [entered])
    assert isinstance(outside, ArchiveRefused) and "the phase is strict" in str(outside)
    in_cutover_for(10)
    entered = PhaseState.objects.get(pk=1).entered_at
    early = refused_by_postgresql(insert, [entered])
    assert isinstance(early, ArchiveRefused) and "after 90 days in cutover" in str(early)
    assert not LegacyArchive.objects.exists()


def test_the_product_keeps_working_on_the_ledger_after_the_archive(users, admin_client):
    in_cutover_for(91)
    legacy_archive(actor=OPS, reason=REASON)
    kill_switch_set(engaged=True, actor=OPS, reason="drill")
    kill_switch_set(engaged=False, actor=OPS, reason="drill over")
    newcomer = uuid.uuid4()
    with transaction.atomic():
        credit = balance_mutation_apply(
            user_id=users["usdc"], direction="credit", amount="9.5", reference="a1", reason="t"
        )
        balance_mutation_apply(
            user_id=newcomer, direction="credit", amount="3", reference="a2", reason="t"
        )
        balance_mutation_apply(
            user_id=users["usd"],
            direction="debit",
            amount="15",
            reference="a3",
            reason="t",
            currency="USD",
        )
    assert (credit.phase, credit.legacy_balance, credit.ledger_status) == (
        "cutover",
        None,
        "posted",
    )
    assert balance_get(user_id=users["usdc"]).amount == Decimal("110")
    assert balance_get(user_id=users["usd"], currency="USD").amount == Decimal("25")
    assert balance_get(user_id=newcomer).amount == Decimal("3")
    assert legacy_rows() == set()
    # One currency per user, now from the ledger alone.
    assert user_currency(users["usd"]) == "USD" and user_currency(users["empty"]) is None
    added = deposit_address_add(
        address=f"0x{'ef' * 20}", chain="ETH", user_id=newcomer, actor=OPS, reason="t"
    )
    assert added.created
    # The checklist's `users` are the ledger's users now; its manual reconciliation (a check
    # for before the cutover) finds no legacy row to agree with any USDC balance.
    assert {row[0] for row in rows("SELECT id FROM users")} == {
        users["usdc"],
        users["other"],
        users["usd"],
        newcomer,
    }
    assert rows(statement(RECONCILIATION)) == [(3,)]
    assert not LegacyBalance.objects.exists()
    listing = admin_client.get("/admin/cutover/legacyarchive/")
    assert listing.status_code == 200 and b"legacy_archive.balances" in listing.content
    assert admin_client.get("/admin/cutover/legacybalance/").status_code == 200


def test_the_command_archives_once_and_says_so(users):
    in_cutover_for(100)
    with pytest.raises(CommandError, match="archiving the legacy store needs a written --reason"):
        archive_cmd("--reason", " ")
    first = json.loads(archive_cmd("--reason", REASON, "--json"))
    audit = OperatorAudit.objects.get(action="legacy.archive")
    assert first == {
        "table": "balances",
        "archived_as": "legacy_archive.balances",
        "rows": 4,
        "totals": {
            "USD": {"rows": 1, "total": "40.000000"},
            "USDC": {"rows": 3, "total": "120.500000"},
        },
        "cutover_entered_at": PhaseState.objects.get(pk=1).entered_at.isoformat(),
        "archived_at": LegacyArchive.objects.get().archived_at.isoformat(),
        "days_in_cutover": "100 days",
        "archived_by": audit.actor,
        "reason": REASON,
        "already_archived": False,
        "operator_audit_id": audit.pk,
    }
    second = json.loads(archive_cmd("--reason", "again", "--json"))
    assert second == {**first, "already_archived": True, "operator_audit_id": None}
    assert "is already archived into legacy_archive.balances" in archive_cmd("--reason", "again")
    status = StringIO()
    call_command("cutover", "status", "--json", stdout=status)
    assert json.loads(status.getvalue())["legacy_archive"] == {
        key: first[key] for key in first if key not in ("already_archived", "operator_audit_id")
    }
    with pytest.raises(CommandError, match="rollback refused: the legacy store was archived"):
        call_command("cutover", "rollback", "--reason", "incident", stdout=StringIO())


def test_the_command_refusal_names_the_wait(users):
    in_cutover_for(3)
    with pytest.raises(CommandError, match=r"^in cutover since .* \(3 days\); the legacy store"):
        archive_cmd("--reason", REASON)
    assert not LegacyArchive.objects.exists() and len(legacy_rows()) == 4


def test_cutover_0011_cannot_be_unapplied_once_archived(users):
    """Its way down would drop the archive's record and schema: refused, nothing changes."""
    in_cutover_for(91)
    legacy_archive(actor=OPS, reason=REASON)
    with pytest.raises(DatabaseError, match="cutover 0011 cannot be unapplied: the legacy store"):
        call_command("migrate", "cutover", "0010", interactive=False, verbosity=0)
    assert LegacyArchive.objects.count() == 1
    assert len(legacy_rows("legacy_archive.balances")) == 4

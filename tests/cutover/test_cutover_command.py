"""`manage.py cutover ...`: the operators' controls, with clear errors naming what is wrong,
exit statuses a script can act on, --json on each and output for people without reprs."""

import json
import uuid
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from cutover.models import (
    CustodyOpening,
    LegacyBalance,
    OperatorAudit,
    PhaseAudit,
    PhaseState,
    ReconciliationRun,
)
from gateway.models import ApiClient
from tests.cutover.factories import (
    OPERATOR,
    custody_open_all,
    database_url,
    ledger_balance_set,
    legacy_user,
    phase_set,
)
from tests.test_configuration import manage

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args) -> str:
    out = StringIO()
    call_command("cutover", *args, stdout=out)
    return out.getvalue()


def gate_not_met() -> dict:
    """`cutover gates --json` while the gate is not met: the evidence, then exit status 1."""
    out = StringIO()
    with pytest.raises(CommandError, match=r"^gate \w+ -> \w+ not met: ") as refused:
        call_command("cutover", "gates", "--json", stdout=out)
    assert refused.value.returncode == 1
    return json.loads(out.getvalue())


def test_status_reports_phase_flags_and_kill_switch():
    status = json.loads(run("status", "--json"))
    assert status["phase"] == "legacy" and status["next_phase"] == "shadow"
    assert status["flags"]["BALANCE_SOURCE"] == "legacy"
    assert status["kill_switch"] is False


def test_gates_shows_the_evidence_without_changing_anything():
    legacy_user("5")
    gate = gate_not_met()
    assert gate["to"] == "shadow" and gate["passed"] is False
    assert PhaseState.objects.get(pk=1).phase == "legacy"


def test_advance_refusals_are_command_errors():
    with pytest.raises(CommandError, match="legacy -> cutover is not a legal transition"):
        run("advance", "--to", "cutover")
    with pytest.raises(CommandError, match="--force needs a written --reason"):
        run("advance", "--to", "shadow", "--force")
    legacy_user("5")
    with pytest.raises(CommandError, match="gate legacy -> shadow not met: backfill"):
        run("advance", "--to", "shadow")
    assert not PhaseAudit.objects.exclude(action="seed").exists()


def test_backfill_then_advance_then_rollback():
    legacy_user("5")
    summary = json.loads(run("backfill", "--json"))
    assert summary["postings"] == 1 and summary["users_pending_now"] == 0
    run(
        "custody",
        "open",
        "--currency",
        "USDC",
        "--reported",
        "5",
        "--source",
        "circle",
        "--reason",
        "opening",
    )
    run(
        "custody",
        "open",
        "--currency",
        "USD",
        "--reported",
        "0",
        "--source",
        "due",
        "--reason",
        "opening",
    )
    audit = json.loads(run("advance", "--to", "shadow", "--reason", "verified", "--json"))
    assert audit["action"] == "advance" and audit["actor"].startswith("cli:")
    assert json.loads(run("reconcile", "--json"))["clean"] is True
    rolled = json.loads(run("rollback", "--reason", "drill", "--json"))
    assert (rolled["from"], rolled["to"]) == ("shadow", "legacy")


def test_killswitch_on_and_off():
    assert "kill_switch_on" in run("killswitch", "on", "--reason", "incident")
    assert PhaseState.objects.get(pk=1).kill_switch
    with pytest.raises(CommandError, match="already on"):
        run("killswitch", "on", "--reason", "again")
    run("killswitch", "off", "--reason", "resolved")
    assert not PhaseState.objects.get(pk=1).kill_switch


def test_client_token_is_shown_once_and_names_are_unique():
    created = json.loads(run("client", "--name", "payments", "--scopes", "read,credit", "--json"))
    client = ApiClient.objects.get(name="payments")
    assert created["token"] and client.token_sha256 != created["token"]
    assert client.scopes == ["read", "credit"] and created["scopes"] == ["read", "credit"]
    audit = OperatorAudit.objects.get(target=f"api_client:{client.pk}")
    assert audit.action == "api_client.create" and audit.actor.startswith("cli:")
    with pytest.raises(CommandError, match="--name: a client named 'payments' already exists"):
        run("client", "--name", "payments", "--scopes", "read")


def test_client_scopes_and_limits_are_checked_naming_the_flag():
    user_id = str(uuid.uuid4())
    with pytest.raises(CommandError, match=r"--scopes: .*--user-id may not have the credit"):
        run("client", "--name", "alice", "--user-id", user_id, "--scopes", "read,credit")
    with pytest.raises(CommandError, match="--scopes"):
        run("client", "--name", "alice", "--scopes", "read,mint")
    with pytest.raises(CommandError, match="--max-amount"):
        run("client", "--name", "alice", "--scopes", "read", "--max-amount", "-5")
    with pytest.raises(CommandError, match="--daily-limit"):
        run("client", "--name", "alice", "--scopes", "read", "--daily-limit", "lots")
    assert not ApiClient.objects.exists() and not OperatorAudit.objects.exists()
    created = json.loads(
        run(
            "client",
            "--name",
            "alice",
            "--user-id",
            user_id,
            "--scopes",
            "read,debit",
            "--max-amount",
            "50",
            "--daily-limit",
            "200.5",
            "--json",
        )
    )
    assert (created["max_amount"], created["daily_limit"]) == ("50", "200.5")
    client = ApiClient.objects.get(name="alice")
    assert client.max_amount == Decimal("50") and str(client.user_id) == user_id


def test_reconcile_outside_dual_write_is_a_clear_error():
    with pytest.raises(CommandError, match="the phase is legacy"):
        run("reconcile")


def test_custody_open_and_status():
    gate = gate_not_met()
    custody = {c["name"]: c for c in gate["checks"] if c["name"].startswith("custody_")}
    assert custody["custody_usdc"]["actual"] == "not opened" and not custody["custody_usdc"]["ok"]
    opened = json.loads(
        run(
            "custody",
            "open",
            "--currency",
            "USDC",
            "--reported",
            "123.45",
            "--source",
            "circle",
            "--reason",
            "opening",
            "--json",
        )
    )
    assert opened["reported"] == "123.45" and opened["source"] == "circle"
    assert opened["ledger_transaction_id"] is not None
    status = {
        row["currency"]: row for row in json.loads(run("custody", "status", "--json"))["custody"]
    }
    assert status["USDC"]["opened"] is True and status["USDC"]["buffer_balance"] == "123.450000"
    assert status["USD"]["opened"] is False
    gate = gate_not_met()
    custody = {c["name"]: c for c in gate["checks"] if c["name"].startswith("custody_")}
    assert custody["custody_usdc"]["ok"] and not custody["custody_usd"]["ok"]
    assert "custody" in run("custody", "status")


@pytest.mark.parametrize(
    ("reported", "message"),
    [
        ("-1", "--reported: a provider's balance cannot be negative"),
        ("1.001", "--reported: amount 1.001 has more than 2 decimal places for USD"),
        ("abc", "--reported: amount 'abc' must be a plain decimal in ASCII digits"),
        ("1e3", "--reported: amount '1e3' must be a plain decimal in ASCII digits"),
    ],
)
def test_custody_open_refusals_name_the_flag_and_change_nothing(reported, message):
    with pytest.raises(CommandError, match=message):
        run(
            "custody",
            "open",
            "--currency",
            "USD",
            "--reported",
            reported,
            "--source",
            "due",
            "--reason",
            "opening",
        )
    assert not CustodyOpening.objects.exists()


def test_custody_open_twice_is_refused():
    run(
        "custody",
        "open",
        "--currency",
        "USD",
        "--reported",
        "0",
        "--source",
        "due",
        "--reason",
        "opening",
    )
    with pytest.raises(CommandError, match="custody for USD is already open"):
        run(
            "custody",
            "open",
            "--currency",
            "USD",
            "--reported",
            "10",
            "--source",
            "due",
            "--reason",
            "again",
        )


def cutover(*args: str):
    """`manage.py cutover ...` in a process of its own, as a script or CI job runs it."""
    return manage("cutover", *args, DATABASE_URL=database_url())


def test_gates_and_reconcile_tell_a_script_by_their_exit_status():
    result = cutover("gates", "--json")  # custody not opened yet
    assert result.returncode == 1
    gate = json.loads(result.stdout)
    assert (gate["from"], gate["to"], gate["passed"]) == ("legacy", "shadow", False)
    assert {c["name"] for c in gate["checks"] if not c["ok"]} == {"custody_usdc", "custody_usd"}
    assert result.stderr.startswith("CommandError: gate legacy -> shadow not met: custody_usdc")
    assert "Traceback" not in result.stderr
    custody_open_all()
    result = cutover("gates", "--json")
    assert (result.returncode, json.loads(result.stdout)["passed"]) == (0, True)

    phase_set("shadow")
    user = legacy_user("5")
    ledger_balance_set(user, "5")
    result = cutover("reconcile", "--json")
    assert (result.returncode, json.loads(result.stdout)["clean"]) == (0, True)
    LegacyBalance.objects.filter(user_id=user).update(buying_power="7")
    result = cutover("reconcile")  # for a person: the same verdict
    assert result.returncode == 1
    assert "differences" in result.stdout
    assert result.stderr.startswith("CommandError: 1 user(s) differ between legacy and ledger")
    out = StringIO()
    with pytest.raises(CommandError, match="differ") as refused:
        call_command("cutover", "reconcile", "--json", stdout=out)
    assert refused.value.returncode == 1
    report = json.loads(out.getvalue())
    assert (report["differences"], report["clean"]) == (1, False)
    # Each run, by hand or by a script, is recorded as the operator's.
    assert set(ReconciliationRun.objects.values_list("triggered_by", flat=True)) == {OPERATOR}


@pytest.mark.django_db
def test_killswitch_json_is_its_audit_row_naming_the_operator():
    engaged = json.loads(run("killswitch", "on", "--reason", "incident 42", "--json"))
    audit = PhaseAudit.objects.get(pk=engaged["audit_id"])
    assert (audit.action, audit.actor, audit.reason) == ("kill_switch_on", OPERATOR, "incident 42")
    assert (engaged["action"], engaged["actor"], engaged["reason"]) == (
        "kill_switch_on",
        OPERATOR,
        "incident 42",
    )
    released = json.loads(run("killswitch", "off", "--reason", "resolved", "--json"))
    assert released["action"] == "kill_switch_off" and released["actor"] == OPERATOR
    assert not PhaseState.objects.get(pk=1).kill_switch
    with pytest.raises(CommandError, match="argument state: invalid choice: 'maybe'"):
        run("killswitch", "maybe", "--reason", "r")


@pytest.mark.django_db
def test_output_for_people_has_no_python_reprs():
    phase_set("shadow")
    legacy_user("5")
    for shown in (run("status"), run("rollback", "--dry-run")):
        assert not set("{}[]'") & set(shown), shown
        assert not {"None", "True", "False"} & set(shown.split()), shown
    status = run("status")
    assert "USE_LEDGER_INTEGRATION=true" in status and "LEDGER_SHADOW_MODE=true" in status
    assert "a rollback would succeed now; nothing changed" in run("rollback", "--dry-run")
    assert PhaseState.objects.get(pk=1).phase == "shadow"


@pytest.mark.django_db
def test_backfill_shows_its_progress_with_the_time_left():
    legacy_user("5")
    legacy_user("7")
    shown = run("backfill", "--chunk-size", "1")
    assert "backfill" in shown and "2/2" in shown and "eta" in shown
    assert "users pending now" in shown

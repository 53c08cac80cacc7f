"""The operators' commands: rehearse (on the test server and on the embedded default) and
bench, with their errors."""

import json
import subprocess
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from ledger.models import Account, Transaction
from ledger.selectors import ledger_integrity_checks
from rehearsal import embedded_db
from tests.test_configuration import manage as configuration_manage
from tests.test_rehearsal_report import assert_self_contained_report

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db(transaction=True)


# The drills the rehearsal adds to the rollout, each proven by an invariant of its report.
REHEARSAL_DRILLS = {
    "rollback_kept_every_currency",
    "pre_shadow_money_withdrawn",
    "conversion_with_lost_answer_booked_once",
    "custody_agrees",
}


def test_rehearse_walks_the_rollout_and_checks_every_invariant(tmp_path):
    overridden = {
        name: getattr(settings, name)
        for name in (
            "CUTOVER_SHADOW_MIN_DURATION",
            "TREASURY_SUBMIT_MAX_ATTEMPTS",
            "CIRCLE_API_BASE_URL",
            "DUE_API_BASE_URL",
        )
    }
    out = StringIO()
    html = tmp_path / "rehearsal.html"
    call_command(
        "rehearse",
        *("--users", "40", "--operations", "200", "--workers", "2", "--json"),
        *("--html", str(html)),
        stdout=out,
    )
    report = json.loads(out.getvalue())
    assert report["ok"] is True
    assert_self_contained_report(html, report)  # the same run, as a document
    # the run pointed the settings at its sandboxes and short gates, and only for the run
    assert {name: getattr(settings, name) for name in overridden} == overridden
    assert [s["phase"] for s in report["stages"]] == [
        "legacy",
        "shadow",
        "read_switch",
        "read_switch",
        "read_switch",
        "read_switch",
        "strict",
        "cutover",
    ]
    results = [(g["transition"], g["result"]) for g in report["gates"]]
    assert ("shadow -> read_switch", "blocked") in results  # the injected drift held the gate
    assert results[-2:] == [
        ("cutover -> legacy (dry run)", "rehearsed"),
        ("cutover -> legacy (drill)", "rollback"),
    ]
    invariants = {c["name"]: c for c in report["invariants"]}
    assert set(invariants) >= {
        "balanced",
        "cached_balances",
        "hash_chains",
        "drift_caught",
        "conservation",
        "rollback_rebuilt_legacy",
        "onchain_exactly_once",
        "treasury_restored_the_buffer",
        *REHEARSAL_DRILLS,
    }
    assert all(invariants[name]["ok"] for name in REHEARSAL_DRILLS)

    # Two currencies went through cutover and back, each kept to the cent.
    assert report["users_by_currency"] == {"USDC": 36, "USD": 4}
    rollback = report["rollback"]
    assert rollback["second_currency_credit"].startswith("refused")
    assert rollback["dry_run_proof"] is True
    for totals in rollback["currencies"].values():
        assert Decimal(totals["ledger_before"]) > 0
        assert totals["ledger_before"] == totals["legacy_after"] == totals["ledger_after"]

    # Money booked before shadow left through a withdrawal sent in legacy, completed in shadow.
    pre = report["pre_shadow_withdrawal"]
    assert (pre["requested_in"], pre["status_in_legacy"]) == ("legacy", "submitted")
    assert (pre["completed_in"], pre["status"]) == ("shadow", "completed")
    assert pre["pending_after"] == pre["pending_before"]
    assert Decimal(pre["buffer_before"]) - Decimal(pre["buffer_after"]) == Decimal(pre["amount"])

    # The conversion whose submit answer was lost stayed open while Due could not be asked
    # (its transfer never created again), then was found and booked once.
    lost = report["treasury"]["lost_answer"]
    assert (lost["status_before_monitor"], lost["status"]) == ("pending", "completed")
    assert lost["conversions_at_due"] == lost["postings"] == lost["creations_sent"] == 1

    # Custody opened from what the sandboxes reported, and agrees with them at the end.
    assert set(report["custody_opened"]) == {"USDC", "USD"}
    assert {r["currency"]: r["agrees"] for r in report["custody_reconciled"]} == {
        "USDC": True,
        "USD": True,
    }
    assert report["all_traffic"]["replays"] > 0
    # It ran in a scratch database: nothing of it is left in this one.
    assert not Transaction.objects.exists()
    assert ledger_integrity_checks()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rehearse", "--users", "1"], "--users: at least 2 users"),
        (["bench", "posting", "--accounts", "1", "--seconds", "1"], "--accounts: at least 2"),
    ],
)
def test_command_errors_name_the_flag(args, message):
    with pytest.raises(CommandError, match=message):
        call_command(*args, stdout=StringIO())


def test_bench_posting_prints_ours_beside_pgbench():
    out = StringIO()
    call_command(
        "bench",
        "posting",
        "--clients",
        "2",
        "--seconds",
        "1",
        "--accounts",
        "20",
        "--json",
        stdout=out,
    )
    report = json.loads(out.getvalue())
    result = report["results"][0]
    assert result["clients"] == 2
    assert result["ours"]["postings"] > 0 and result["pgbench"]["postings"] > 0
    assert "legacy" not in result and "goal" not in report  # transfers: no legacy write to compare
    assert result["ratio"] > 0
    assert result["ours"]["p50_ms"] <= result["ours"]["p95_ms"] <= result["ours"]["p99_ms"]
    # All of it in a scratch database: the ledger is append-only.
    assert not Transaction.objects.exists() and not Account.objects.filter(user_id__isnull=False)


def test_bench_tables_print_whole_into_a_log(monkeypatch):
    """Piped or logged (no terminal), rich assumed 80 columns and cut the table's headers and
    figures to "…": an operator reading a CI log saw "ours…" and "17.…"."""
    monkeypatch.delenv("COLUMNS", raising=False)
    out = StringIO()
    call_command(
        "bench", "posting", "--phase", "shadow", "--clients", "2", "--seconds", "1",
        "--accounts", "20", stdout=out,
    )  # fmt: skip
    table = out.getvalue()
    assert "…" not in table
    for header in ("ours/s", "legacy p95 ms", "p95 / legacy", "pgbench/s", "ratio"):
        assert header in table


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    """manage.py in a subprocess on the settings operators run (not the tests' own)."""
    return configuration_manage(*args, DJANGO_SETTINGS_MODULE="config.settings.base", **env)


def test_the_settings_embedded_default_is_the_cluster_the_commands_start():
    # base.py names the embedded cluster's URL without importing the rehearsal app.
    assert embedded_db.database_url() == settings.EMBEDDED_DATABASE_URL


@pytest.mark.django_db(transaction=False)
def test_rehearse_and_bench_run_on_the_embedded_default_without_database_url(monkeypatch):
    # One test for both: the embedded cluster is stopped by the command that started it.
    monkeypatch.delenv("DATABASE_URL")
    result = manage("rehearse", "--users", "10", "--operations", "100", "--workers", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["all_traffic"]["applied"] > 0
    assert {c["name"] for c in report["invariants"] if c["ok"]} >= REHEARSAL_DRILLS
    assert (embedded_db.DATA_DIR / "PG_VERSION").exists()
    assert not (embedded_db.DATA_DIR / "postmaster.pid").exists()  # stopped after

    # gunicorn's workers reach the embedded cluster through its Unix socket
    result = manage(
        "bench", "webhooks", "--senders", "2", "--seconds", "1", "--users", "5", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["deliveries"] > 0 and set(report["statuses"]) == {"200"}


@pytest.mark.django_db(transaction=False)
def test_an_unreachable_database_is_named_without_a_traceback():
    url = "postgres://postgres@127.0.0.1:5432/no_such_database"
    for args in (("rehearse", "--users", "2"), ("cutover", "status"), ("ledger", "verify")):
        result = manage(*args, DATABASE_URL=url)
        assert result.returncode == 1
        assert result.stderr.startswith("database error (DATABASE_URL): ")
        assert "no_such_database" in result.stderr
        assert "Traceback" not in result.stderr


def test_bench_posting_through_the_shadow_balance_path():
    out = StringIO()
    call_command(
        "bench",
        "posting",
        "--phase",
        "shadow",
        "--clients",
        "2",
        "--seconds",
        "1",
        "--accounts",
        "20",
        "--json",
        stdout=out,
    )
    report = json.loads(out.getvalue())
    assert report["path"] == "balance path (shadow)"
    result = report["results"][0]
    assert result["ours"]["postings"] > 0 and result["pgbench"]["postings"] > 0
    # beside legacy-only, measured in the same run, and the goal it is held to
    assert result["legacy"]["postings"] > 0
    assert result["p95_over_legacy"] == round(
        result["ours"]["p95_ms"] / result["legacy"]["p95_ms"], 2
    )
    assert report["goal"] == {
        "clients": 16,
        "phase": "shadow",
        "p95_over_legacy_at_most": 1.6,
        "ratio_at_least": 0.55,
    }
    # where each measurement's CPU went, per posting: PostgreSQL's and the client's
    for name in ("ours", "legacy", "pgbench"):
        split = result[name]["cpu_us_per_posting"]
        assert set(split) == {"postgres", "client"} and min(split.values()) > 0, (name, split)


def test_bench_reconcile_finds_every_injected_difference():
    out = StringIO()
    call_command(
        "bench",
        "reconcile",
        *("--users", "3000", "--differences", "7", "--workers", "2", "--json"),
        stdout=out,
    )
    report = json.loads(out.getvalue())
    (result,) = report["results"]
    assert (result["workers"], result["status"], result["users_checked"]) == (2, "completed", 3000)
    assert result["differences_found"] == report["differences_injected"] == 7
    assert result["all_injected_found"] and result["peak_rss_mb_pool_process"] > 0


def test_bench_reads_serves_every_request():
    out = StringIO()
    call_command(
        "bench", "reads", "--rps", "20", "--seconds", "2", "--users", "30", "--json", stdout=out
    )
    report = json.loads(out.getvalue())
    # 40 counted, after the warm-up's requests (not counted)
    assert report["requests"] == 40 and report["errors"] == 0 and report["warmup_seconds"] == 2
    assert report["p50_ms"] <= report["p99_ms"]


def test_bench_webhooks_accepts_every_signed_delivery():
    out = StringIO()
    call_command(
        "bench",
        "webhooks",
        "--senders",
        "2",
        "--seconds",
        "1",
        "--users",
        "5",
        "--json",
        stdout=out,
    )
    report = json.loads(out.getvalue())
    assert report["deliveries"] > 0 and report["accepted"] == report["deliveries"]
    assert set(report["statuses"]) == {"200"}
    floor = report["floor"]
    assert floor["deliveries"] > 0 and floor["accepted"] == floor["deliveries"]
    assert report["ratio"] > 0 and report["goal_ratio"] == 0.6
    assert report["warmup_seconds"] == 2  # before the clock, not in the counts above
    assert not Transaction.objects.exists()  # all of it in a scratch database


def test_bench_webhooks_refuses_a_share_outside_zero_to_one():
    with pytest.raises(CommandError, match="--redeliver"):
        call_command("bench", "webhooks", "--redeliver", "1.5", stdout=StringIO())

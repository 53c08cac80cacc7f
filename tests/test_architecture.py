"""The layers of README.md's Layout section, enforced with import-linter."""

import re
import subprocess
import sys
from pathlib import Path

from django.apps import apps

ROOT = Path(__file__).resolve().parent.parent


def test_layers_contract_is_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Layers KEPT" in result.stdout


# Every installed app of the project (import-linter's layers); only `ledger` may name its tables.
APPS = [
    "ledger",
    "gateway",
    "cutover",
    "onchain",
    "treasury",
    "custody",
    "aws",
    "config",
    "rehearsal",
]
LEDGER_TABLES = ("ledger_accounts", "ledger_transactions", "ledger_entries", "ledger_currencies")
# A table named where SQL reads or writes it (prose such as a table comment's text is not).
LEDGER_TABLE_IN_SQL = re.compile(
    r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE|ON)\s+(?:public\.)?(" + "|".join(LEDGER_TABLES) + r")\b",
    re.IGNORECASE,
)


def _source_files(app: str):
    for path in sorted((ROOT / app).rglob("*")):
        if path.suffix in (".py", ".sql") and "migrations" not in path.parts:
            yield path


def test_ledger_tables_are_named_in_sql_only_by_the_ledger():
    """Other apps read and write the ledger through its views and functions (ledger/sql/
    ledger.sql: ledger_user_balances, ledger_system_balances, ledger_user_account_open) and its
    Python selectors and services, never its tables. Migrations are history and stay as run."""
    ledger_models = apps.get_app_config("ledger").get_models()
    assert {model._meta.db_table for model in ledger_models} == set(LEDGER_TABLES)
    found = []
    for app in APPS:
        if app == "ledger":
            continue
        for path in _source_files(app):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if LEDGER_TABLE_IN_SQL.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "ledger tables named outside the ledger:\n" + "\n".join(found)

"""Advisory lock keys: one registry, unique keys, and jobs that do not block one another
(issue 9, path 10: the reconciliation and the settlement cycle shared key 7401002, so each
made the other skip)."""

import re
from pathlib import Path

import pytest

from cutover import locks
from cutover.reconciliation import reconciliation_run
from tests.cutover.factories import phase_set
from tests.cutover.test_reconciliation import other_connection
from treasury.cycle import settlement_cycle_run

ROOT = Path(__file__).resolve().parent.parent.parent
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


def test_keys_are_unique():
    keys = list(locks.REGISTRY.values())
    assert len(keys) == len(set(keys))
    named = {v for k, v in vars(locks).items() if k.endswith("_LOCK")}
    assert named == set(keys), "every *_LOCK constant is in the registry"


def test_no_key_is_written_outside_the_registry():
    """Source and SQL name keys only through cutover.locks. A literal key in SQL (the phase
    lock in cutover/sql/cutover.sql, the transfer lock in onchain/sql/onchain.sql, and the
    frozen copies their migrations run) must equal the registry's and name it on its line.
    Every advisory lock call in Python passes a key as a parameter, never a number."""
    literal = re.compile(r"\b7_?401_?\d{3}\b")
    call_with_literal = re.compile(r"pg_(?:try_)?advisory_\w*lock\w*\(\s*\d")
    named = {v: k for k, v in vars(locks).items() if k.endswith("_LOCK")}
    found = set()
    for app in APPS:
        for path in (ROOT / app).rglob("*"):
            if path.suffix not in (".py", ".sql") or path.name == "locks.py":
                continue
            for line in path.read_text().splitlines():
                for number in literal.findall(line):
                    key = int(number.replace("_", ""))
                    assert key in named, f"{path}: {key} is not in the registry"
                    assert named[key] in line, f"{path}: {line.strip()}"
                    found.add((path.relative_to(ROOT).as_posix(), key))
                if path.suffix == ".py":
                    assert not call_with_literal.search(line), f"{path}: {line.strip()}"
    assert ("cutover/sql/cutover.sql", locks.PHASE_LOCK) in found
    assert ("onchain/sql/onchain.sql", locks.CIRCLE_TRANSFER_LOCK) in found


@pytest.mark.django_db(transaction=True)
def test_reconciliation_runs_while_a_settlement_cycle_holds_its_lock():
    phase_set("shadow")
    with other_connection() as other:
        other.execute("SELECT pg_advisory_lock(%s)", [locks.SETTLEMENT_CYCLE_LOCK])
        assert reconciliation_run(triggered_by="test").clean
        other.execute("SELECT pg_advisory_unlock(%s)", [locks.SETTLEMENT_CYCLE_LOCK])


@pytest.mark.django_db(transaction=True)
def test_settlement_cycle_runs_while_a_reconciliation_holds_its_lock():
    with other_connection() as other:
        other.execute("SELECT pg_advisory_lock(%s)", [locks.RECONCILE_LOCK])
        assert settlement_cycle_run(triggered_by="test").skipped == ""
        other.execute("SELECT pg_advisory_unlock(%s)", [locks.RECONCILE_LOCK])

"""The money model over the real product (tests/model/machine.py), in two profiles:

- `ci` (default): bounded, part of the normal suite; it first replays every failing example
  kept in tests/model/examples (Hypothesis' example database, committed with the repo);
- `nightly` (HYPOTHESIS_PROFILE=nightly, run by scripts/soak): >= 1,000 examples x 100 steps,
  shrinking what it finds and saving it in tests/model/examples (commit what it adds).

Only the nightly at its full size writes the example database: Hypothesis deletes a saved
example that no longer fails, and a run with fewer steps (CI's 30, or MODEL_STEPS) replays a
longer example cut short, so it would delete examples that still fail. A nightly find longer
than CI's 30 steps is therefore replayed in full by CI only once it is written out in
tests/model/test_regressions.py (the keys of the database also change with every edit of
the machine's class: the written-out regressions are what lasts).

The figures (examples, steps, invariant checks, failures, seconds) are printed at the end."""

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase
from hypothesis.stateful import run_state_machine_as_test

from tests.model.machine import Context, MoneyMachine

pytestmark = pytest.mark.django_db(transaction=True)
EXAMPLES = DirectoryBasedExampleDatabase(str(Path(__file__).resolve().parent / "examples"))

# CI does not shrink (a shrink of a slow stateful example takes minutes): it reports the
# example as found; the nightly shrinks, and what it shrinks is kept in the example database.
PROFILES = {
    "ci": {
        "max_examples": 50,
        "stateful_step_count": 30,
        "phases": [Phase.explicit, Phase.reuse, Phase.generate],
    },
    "nightly": {"max_examples": 1000, "stateful_step_count": 100, "phases": list(Phase)},
}


def profile() -> settings:
    """The chosen profile; MODEL_EXAMPLES and MODEL_STEPS override its two sizes."""
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    if name not in PROFILES:
        raise pytest.UsageError(f"HYPOTHESIS_PROFILE must be one of {', '.join(PROFILES)}")
    chosen = dict(PROFILES[name])
    overridden = False
    for variable, setting in (
        ("MODEL_EXAMPLES", "max_examples"),
        ("MODEL_STEPS", "stateful_step_count"),
    ):
        if os.environ.get(variable):
            chosen[setting] = int(os.environ[variable])
            overridden = True
    writable = name == "nightly" and not overridden
    return settings(
        **chosen,
        database=EXAMPLES if writable else ReadOnlyDatabase(EXAMPLES),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=True,
    )


# The nightly profile runs for hours: the suite's per-test timeout applies to CI's only.
@pytest.mark.timeout(0 if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else 600)
def test_money_model(product, capsys):
    chosen = profile()
    Context.stats = {"examples": 0, "steps": 0, "invariant_checks": 0}
    started = time.monotonic()
    failures = 0
    try:
        run_state_machine_as_test(MoneyMachine, settings=chosen)
    except BaseException as exc:
        failures = len(getattr(exc, "exceptions", [exc]))
        raise
    finally:
        figures = {
            "profile": os.environ.get("HYPOTHESIS_PROFILE", "ci"),
            **Context.stats,
            "failures": failures,
            "seconds": round(time.monotonic() - started, 1),
        }
        with capsys.disabled():
            print(f"\nmoney model: {json.dumps(figures)}")

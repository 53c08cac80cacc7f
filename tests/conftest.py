"""Shared fixtures. Tests run against the real PostgreSQL named by DATABASE_URL; tests that need
database rules to fire at COMMIT use `django_db(transaction=True)`."""

import importlib

import pytest
from django.apps import apps

# Data migrations whose rows a transactional test's flush removes: run again before each test.
DATA_MIGRATIONS = [
    importlib.import_module("ledger.migrations.0003_system_accounts").create,
    importlib.import_module("ledger.migrations.0004_clearing_shards").create,
    importlib.import_module("cutover.migrations.0003_seed_phase").seed,
    importlib.import_module("treasury.migrations.0002_rules_and_seed").seed,
]


@pytest.fixture(autouse=True)
def _data_migrations(request):
    """Currencies, system accounts and the first phase state, idempotently."""
    if request.node.get_closest_marker("django_db"):
        request.getfixturevalue("_django_db_helper")
        for migration in DATA_MIGRATIONS:
            migration(apps, None)

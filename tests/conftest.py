"""Shared fixtures. Tests run against the real PostgreSQL named by DATABASE_URL; ledger tests
that need the database rules to fire at COMMIT use `django_db(transaction=True)`."""

import importlib

import pytest
from django.apps import apps

SYSTEM_ACCOUNTS = importlib.import_module("ledger.migrations.0003_system_accounts")


@pytest.fixture(autouse=True)
def _system_accounts(request):
    """Transactional tests flush every table when they end; put the currencies and system
    accounts (a data migration) back before each database test. Idempotent."""
    if request.node.get_closest_marker("django_db"):
        request.getfixturevalue("_django_db_helper")
        SYSTEM_ACCOUNTS.create(apps, None)

"""The data migrations whose rows a transactional test's flush removes: run again before each
test (tests/conftest.py) and after each reset of the money model (tests/model/world.py)."""

import importlib

DATA_MIGRATIONS = [
    importlib.import_module("ledger.migrations.0003_system_accounts").create,
    importlib.import_module("ledger.migrations.0004_clearing_shards").create,
    importlib.import_module("ledger.migrations.0008_hot_accounts").create,
    importlib.import_module("ledger.migrations.0010_buffer_shards").create,
    importlib.import_module("ledger.migrations.0011_equity_shards").create,
    importlib.import_module("cutover.migrations.0003_seed_phase").seed,
    importlib.import_module("treasury.migrations.0002_rules_and_seed").seed,
]

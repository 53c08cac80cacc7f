"""The treasury tests' fixtures: funded buffers. (The Due sandbox over HTTP is in
tests/conftest.py: custody's tests use it too.)"""

import pytest

from tests.treasury.factories import fund


@pytest.fixture
def usdc_low():
    """USDC buffer 1,000 (below its 5,000 minimum), fiat buffer 60,000 (in its band)."""
    fund("usdc_buffer", "1000")
    fund("fiat_buffer", "60000")

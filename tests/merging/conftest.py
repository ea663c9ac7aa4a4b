"""Fixtures for tests/merging."""

from __future__ import annotations

import pytest
from merging_helpers import make_endpoints


@pytest.fixture
def endpoints():
    return make_endpoints(3)

"""These tests run many small forwards of the tiny model: one thread each (see tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield

"""The simulator's marker (registered here, so ``--strict-markers`` accepts it)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sim: the randomized fault-injecting simulator (tests/sim; minutes, own servers)",
    )

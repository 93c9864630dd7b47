"""Every integration test starts and ends with ``beam.core.faults`` inert: no hook, no bug
switch, the injected clock at real time (tests that inject faults need not clean up)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from beam.core import faults


@pytest.fixture(autouse=True)
def _no_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()

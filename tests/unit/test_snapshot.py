"""The in-process copy (keys, prices): loaded on first use, reloaded after invalidate()."""

from __future__ import annotations

from beam.core.snapshot import Snapshot


async def test_first_use_and_invalidate_reload_whatever_the_max_age() -> None:
    """The copy is stale before its first load and after invalidate(), however large
    max_age_seconds is. (It used to mark both as loaded at monotonic time 0.0, which is
    not old enough on a host up for less than max_age_seconds: a NOTIFY was ignored.)"""
    loads: list[int] = []

    async def load() -> int:
        loads.append(len(loads) + 1)
        return loads[-1]

    copy = Snapshot("test", load, 0, max_age_seconds=1e12)
    assert await copy.get() == 1
    assert await copy.get() == 1
    copy.invalidate()
    assert await copy.get() == 2
    assert await copy.get() == 2
    assert loads == [1, 2]

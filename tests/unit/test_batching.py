"""Natural batching (beam.adapters.batching): no store needed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from beam.adapters.batching import Batcher


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay

    async def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def test_an_idle_batcher_sends_at_once() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder, max_items=8, max_in_flight=1)
    assert await batcher.submit(1) == 10
    assert recorder.batches == [[1]]


async def test_callers_arriving_during_a_batch_share_the_next_one() -> None:
    recorder = Recorder(delay=0.01)
    batcher = Batcher(recorder, max_items=4, max_in_flight=1)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    # All ten arrive before the first batch leaves: batches of at most four, one at a time.
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_one_bad_item_fails_only_its_caller() -> None:
    batcher = Batcher(Recorder(delay=0.01), max_items=8, max_in_flight=1)
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, -2, 3)), return_exceptions=True)
    assert results[0] == 10
    assert isinstance(results[1], ValueError)
    assert results[2] == 30


async def test_a_failed_batch_fails_each_of_its_callers() -> None:
    async def down(items: Sequence[int]) -> list[int | BaseException]:
        raise ConnectionError("store down")

    batcher = Batcher(down, max_items=8, max_in_flight=1)
    with pytest.raises(ConnectionError):
        await batcher.submit(1)


async def test_a_caller_that_leaves_does_not_cancel_its_item() -> None:
    recorder = Recorder(delay=0.05)
    batcher = Batcher(recorder, max_items=8, max_in_flight=1)
    caller = asyncio.ensure_future(batcher.submit(7))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await batcher.close()
    assert recorder.batches == [[7]]

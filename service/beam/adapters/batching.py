"""Natural batching: concurrent callers share one round trip (and one commit).

A caller submits one item and awaits its own result. When no batch is in flight, the item
goes at once (no added latency when idle); while ``max_in_flight`` batches are running,
new items wait and leave together in the next one, up to ``max_items``. So under load a
PostgreSQL round trip and its fsync are shared by many calls, and the wait never exceeds
one batch's duration. This is group commit without a timer (the technique of
TigerBeetle's and PostgreSQL's own commit batching).

``run_batch`` answers one result (or one exception) per item, in order: one item's failure
never fails the others. An exception from ``run_batch`` itself (the store unreachable)
fails every item of that batch. A caller that stops waiting (cancelled) does not cancel
its item: the batch it joined runs to the end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

RunBatch = Callable[[Sequence[_Item]], Awaitable[Sequence[_Result | BaseException]]]


class Batcher(Generic[_Item, _Result]):
    def __init__(
        self,
        run_batch: RunBatch[_Item, _Result],
        *,
        max_items: int = 64,
        max_in_flight: int = 4,
    ) -> None:
        assert max_items >= 1
        assert max_in_flight >= 1
        self._run_batch = run_batch
        self.max_items = max_items
        self.max_in_flight = max_in_flight
        self._pending: deque[tuple[_Item, asyncio.Future[_Result]]] = deque()
        self._flushers: set[asyncio.Task[None]] = set()
        self._active = 0
        self.batches = 0  # how many batches ran (for tests and metrics)
        self.items = 0

    async def submit(self, item: _Item) -> _Result:
        future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)  # a caller that left must not leave it unread
        self._pending.append((item, future))
        if self._active < self.max_in_flight:
            # Counted here and uncounted by the flusher itself, synchronously, right after
            # it saw the queue empty: no item can arrive in between and find no flusher.
            self._active += 1
            task = asyncio.create_task(self._flush(), name="beam-batch")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        try:
            await self._drain()
        finally:
            self._active -= 1

    async def _drain(self) -> None:
        while self._pending:
            batch = [
                self._pending.popleft() for _ in range(min(self.max_items, len(self._pending)))
            ]
            items = [item for item, _ in batch]
            self.batches += 1
            self.items += len(items)
            try:
                results: Sequence[_Result | BaseException] = await self._run_batch(items)
                assert len(results) == len(items), "run_batch must answer every item"
            except BaseException as error:
                results = [error] * len(items)
                if isinstance(error, asyncio.CancelledError):
                    _settle(batch, results)
                    raise
            _settle(batch, results)

    async def close(self, timeout_seconds: float = 10.0) -> None:
        """Wait (bounded) for the batches in flight."""
        if self._flushers:
            await asyncio.wait(list(self._flushers), timeout=timeout_seconds)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(
    batch: Sequence[tuple[object, asyncio.Future[_Result]]],
    results: Sequence[_Result | BaseException],
) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

"""An in-process copy of a PostgreSQL table that the hot path reads without a round trip.

Used for API keys and prices. The copy reloads when it is older than ``max_age_seconds``
or after ``invalidate()`` (PostgreSQL NOTIFY); concurrent callers that find it stale wait
for one reload, not one each. When PostgreSQL is unreachable and a copy exists, the copy
keeps serving (nothing can change in PostgreSQL during the outage either) and the reload
is retried after ``max_age_seconds``: enforcement must not stop with the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from beam.errors import BeamError, Reason

log = logging.getLogger(__name__)

T = TypeVar("T")


class Snapshot(Generic[T]):
    def __init__(
        self, name: str, load: Callable[[], Awaitable[T]], empty: T, max_age_seconds: float
    ) -> None:
        self._name = name
        self._load = load
        self._max_age = max_age_seconds
        self.value: T = empty
        self._loaded = False
        # Never loaded / invalidated: older than any max age. Not 0.0: time.monotonic()
        # may count from boot, and a host up for less than max_age_seconds would keep it.
        self._loaded_at = -math.inf
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._loaded_at = -math.inf

    async def reload(self) -> T:
        async with self._lock:
            await self._reload_locked()
        return self.value

    async def get(self) -> T:
        if time.monotonic() - self._loaded_at > self._max_age:
            stale_since = self._loaded_at
            async with self._lock:
                if self._loaded_at == stale_since:
                    await self._reload_or_keep()
        return self.value

    async def _reload_locked(self) -> None:
        self.value = await self._load()
        self._loaded = True
        self._loaded_at = time.monotonic()

    async def _reload_or_keep(self) -> None:
        try:
            await self._reload_locked()
        except BeamError as error:
            if error.reason is not Reason.STORE_UNAVAILABLE or not self._loaded:
                raise
            log.warning("%s reload failed; serving the cached copy: %s", self._name, error)
            self._loaded_at = time.monotonic()

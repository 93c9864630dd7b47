"""Model prices: read from PostgreSQL, cached in process, locked into holds.

The service only reads prices (the operator or ``beam apply`` writes them). The cache
reloads on NOTIFY ``beam_model_prices`` and at least every ``max_age_seconds``. A model
without a price is UNKNOWN_MODEL: never charged zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from beam.adapters.postgres_store import PostgresStore
from beam.constants import MAX_PRICE_GRAINS_PER_MILLION
from beam.core.money import Prices
from beam.errors import BeamError, Reason, invalid
from beam.records import PriceRecord

log = logging.getLogger(__name__)

_MISS_RELOAD_INTERVAL_SECONDS = 1.0


class PriceBook:
    def __init__(self, postgres: PostgresStore, *, max_age_seconds: float = 5.0) -> None:
        self._postgres = postgres
        self._max_age = max_age_seconds
        self._prices: dict[tuple[str, str], Prices] = {}
        self._loaded_at = 0.0
        self._last_miss_reload = 0.0
        self._lock = asyncio.Lock()

    async def reload(self) -> None:
        async with self._lock:
            await self._load()

    async def _load(self) -> None:
        records = await self._postgres.load_prices()
        self._prices = {(r.tenant, r.model): _prices(r) for r in records}
        self._loaded_at = time.monotonic()

    async def _load_or_keep(self) -> None:
        try:
            await self._load()
        except BeamError as error:
            # PostgreSQL is down: holds keep being priced from the cached list (prices
            # cannot change during the outage either); retry after max age.
            if error.reason is not Reason.STORE_UNAVAILABLE or not self._prices:
                raise
            log.warning("price reload failed; serving cached prices: %s", error)
            self._loaded_at = time.monotonic()

    def invalidate(self) -> None:
        self._loaded_at = 0.0

    async def lookup(self, tenant: str, model: str) -> Prices | None:
        now = time.monotonic()
        if now - self._loaded_at > self._max_age:
            # Concurrent callers that found the cache stale wait for one reload.
            stale_since = self._loaded_at
            async with self._lock:
                if self._loaded_at == stale_since:
                    await self._load_or_keep()
        found = self._prices.get((tenant, model))
        if found is None and now - self._last_miss_reload > _MISS_RELOAD_INTERVAL_SECONDS:
            self._last_miss_reload = now
            await self.reload()
            found = self._prices.get((tenant, model))
        return found

    async def require(self, tenant: str, model: str, field: str = "model") -> Prices:
        if not model:
            raise invalid(field, "a model is required to price tokens", Reason.MISSING_FIELD)
        prices = await self.lookup(tenant, model)
        if prices is None:
            raise BeamError(
                Reason.UNKNOWN_MODEL, f"{field}: no price for model {model!r}", field=field
            )
        return prices


def _prices(record: PriceRecord) -> Prices:
    return Prices(
        model=record.model,
        input_grains_per_million=record.input_grains_per_million,
        output_grains_per_million=record.output_grains_per_million,
        cached_input_grains_per_million=record.cached_input_grains_per_million,
    )


def parse_price_entries(
    tenant: str, entries: Sequence[Mapping[str, Any]], effective_from: datetime | None = None
) -> list[PriceRecord]:
    """Validate a price list (BeamPriceList ``spec.models`` shape); all or nothing."""
    when = effective_from or datetime(2000, 1, 1, tzinfo=UTC)
    seen: set[str] = set()
    records = []
    for index, entry in enumerate(entries):
        where = f"models[{index}]"
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            raise invalid(f"{where}.model", "required", Reason.MISSING_FIELD)
        if model in seen:
            raise invalid(f"{where}.model", f"duplicate model {model!r}")
        seen.add(model)
        values = [
            _price_value(entry, f"{where}.{name}", name, required)
            for name, required in (
                ("inputGrainsPerMillion", True),
                ("outputGrainsPerMillion", True),
                ("cachedInputGrainsPerMillion", False),
            )
        ]
        cached = values[2] if values[2] is not None else values[0]
        assert values[0] is not None
        assert values[1] is not None
        assert cached is not None
        records.append(PriceRecord(tenant, model, 0, values[0], values[1], cached, when))
    return records


def _price_value(entry: Mapping[str, Any], field: str, name: str, required: bool) -> int | None:
    value = entry.get(name)
    if value is None:
        if required:
            raise invalid(field, "required", Reason.MISSING_FIELD)
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, "must be an integer number of grains per million tokens")
    if not 0 <= value <= MAX_PRICE_GRAINS_PER_MILLION:
        raise invalid(
            field, f"must be between 0 and {MAX_PRICE_GRAINS_PER_MILLION}", Reason.OUT_OF_RANGE
        )
    return value


def load_price_file(path: Path, tenant: str) -> list[PriceRecord]:
    """A YAML file with ``models:`` entries (the dev price list, or a BeamPriceList spec)."""
    document = yaml.safe_load(path.read_text())
    if isinstance(document, dict) and "spec" in document:
        document = document["spec"]
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        raise invalid("models", f"{path}: expected a 'models' list")
    return parse_price_entries(tenant, document["models"])

"""Model prices: read from PostgreSQL, cached in process, locked into holds.

The service only reads prices (the operator or ``beam apply`` writes them). The cache
reloads on NOTIFY ``beam_model_prices`` and at least every ``max_age_seconds``. A model
without a price is UNKNOWN_MODEL: never charged zero.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from beam.adapters.postgres_store import PostgresStore
from beam.constants import MAX_PRICE_GRAINS_PER_MILLION
from beam.core.money import Prices
from beam.core.snapshot import Snapshot
from beam.errors import BeamError, Reason, invalid
from beam.records import PriceRecord

_MISS_RELOAD_INTERVAL_SECONDS = 1.0


class PriceBook:
    def __init__(self, postgres: PostgresStore, *, max_age_seconds: float = 5.0) -> None:
        self._postgres = postgres
        self._prices: Snapshot[dict[tuple[str, str], Prices]] = Snapshot(
            "prices", self._load, {}, max_age_seconds
        )
        self._last_miss_reload = 0.0

    async def _load(self) -> dict[tuple[str, str], Prices]:
        records = await self._postgres.load_prices()
        return {(r.tenant, r.model): _prices(r) for r in records}

    async def reload(self) -> None:
        await self._prices.reload()

    def invalidate(self) -> None:
        self._prices.invalidate()

    async def lookup(self, tenant: str, model: str) -> Prices | None:
        found = (await self._prices.get()).get((tenant, model))
        now = time.monotonic()
        if found is None and now - self._last_miss_reload > _MISS_RELOAD_INTERVAL_SECONDS:
            self._last_miss_reload = now
            found = (await self._prices.reload()).get((tenant, model))
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

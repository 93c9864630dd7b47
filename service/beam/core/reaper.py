"""Settle abandoned holds: a hold nobody finalizes expires and is charged what it consumed.

Scripts already expire overdue holds lazily whenever they touch a customer (the unused part
returns to ``available`` at once). The reaper covers idle customers and does the part a
script cannot: writing the settlement to PostgreSQL. For each customer with hold sets it
runs ``expire_holds`` (one round trip), records each expiring hold as an ``expiry`` ledger
entry (idempotent by request id: if a late Finalize won the race, its settlement stands),
then releases the hold in Redis.

Every replica may run a reaper; they do not coordinate. Two reapers settling the same hold
write the ledger once (the request row is unique) and release the hold once (the script
deletes it atomically). Work per pass is bounded by ``batch_size``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from beam.constants import SCRIPT_EXPIRE_HOLDS, customer_keys, parse_customer_key
from beam.core.ledger import Ledger, now_ms
from beam.errors import BeamError
from beam.observability import REAPER_PASSES, REAPER_SETTLED
from beam.records import Settlement, SettlementStatus

log = logging.getLogger(__name__)

_FIELDS_PER_HOLD = 11


@dataclass(frozen=True, slots=True)
class ReaperStats:
    customers_scanned: int
    holds_settled: int


class Reaper:
    def __init__(self, ledger: Ledger, *, batch_size: int = 500) -> None:
        self.ledger = ledger
        self.batch_size = batch_size
        self.settled_total = 0

    async def run_once(self) -> ReaperStats:
        seen: set[tuple[str, str]] = set()
        settled = 0
        async for key in self.ledger.redis.scan_hold_sets():
            parsed = parse_customer_key(key)
            if parsed is None or parsed in seen:
                continue
            seen.add(parsed)
            settled += await self.reap_customer(*parsed)
            if settled >= self.batch_size or len(seen) >= self.batch_size * 20:
                break
        self.settled_total += settled
        return ReaperStats(len(seen), settled)

    async def reap_customer(self, tenant: str, customer_id: str) -> int:
        limit = max(1, min(self.batch_size, 100))
        flat = await self.ledger.redis.run(
            SCRIPT_EXPIRE_HOLDS,
            customer_keys(tenant, customer_id),
            [now_ms(), limit],
            idempotent=True,
        )
        settled = 0
        for offset in range(0, len(flat), _FIELDS_PER_HOLD):
            fields = flat[offset : offset + _FIELDS_PER_HOLD]
            settlement = _expiry(tenant, customer_id, fields)
            try:
                recorded = await self.ledger.postgres.record_settlement(settlement, None)
            except BeamError as error:
                log.warning(
                    "reaper could not settle hold",
                    extra={"customer_id": customer_id, "reason": error.reason.value},
                )
                continue
            await self.ledger.settle_in_redis(recorded)
            settled += 1
        return settled

    async def run_forever(self, interval_seconds: float) -> None:
        while True:
            try:
                stats = await self.run_once()
                REAPER_PASSES.labels("ok").inc()
                REAPER_SETTLED.inc(stats.holds_settled)
                if stats.holds_settled:
                    log.info(
                        "reaper settled expired holds",
                        extra={"holds": stats.holds_settled},
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                REAPER_PASSES.labels("failed").inc()
                log.exception("reaper pass failed; retrying next interval")
            await asyncio.sleep(interval_seconds)


def _expiry(tenant: str, customer_id: str, fields: list[str]) -> Settlement:
    (request_id, amount, consumed, in_tokens, out_tokens, cached_tokens, model, estimated,
     _created, _has_prices, _fp) = fields  # fmt: skip
    return Settlement(
        tenant=tenant,
        customer_id=customer_id,
        request_id=request_id,
        status=SettlementStatus.EXPIRED,
        model=model,
        estimated_grains=int(estimated or 0),
        reserved_grains=int(amount or 0),
        consumed_grains=int(consumed or 0),
        charged_grains=int(consumed or 0),
        refunded_grains=0,
        overage_grains=0,
        prompt_tokens=int(in_tokens or 0) + int(cached_tokens or 0),
        completion_tokens=int(out_tokens or 0),
        cached_prompt_tokens=int(cached_tokens or 0),
    )

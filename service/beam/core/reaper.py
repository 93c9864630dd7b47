"""Settle abandoned holds, and finish settlements whose process died half-way.

Scripts already expire overdue holds lazily whenever they touch a customer (the unused part
returns to ``available`` at once). The reaper covers idle customers and does what a script
cannot: writing to PostgreSQL. For each customer with holds, one ``expire_holds`` round
trip returns two kinds of work:

* **expiring holds**: each is recorded as an ``expiry`` ledger entry (charged what it
  consumed; idempotent by request id and hold nonce: if a late Finalize won the race, its
  settlement stands), then released;
* **settling holds** pending for more than a grace period: a process committed (or was
  about to commit) their settlement and never updated Redis, because it was killed. The
  ledger decides: committed -> Redis adopts it now; never committed and past the hold's
  deadline -> the hold is abandoned (``Ledger.complete_settling``).

One customer's failure (a bad row, a store error) is logged and counted and never stops
the pass for anyone else. The SCAN cursor is carried from one pass to the next, so every
customer is reached however many there are; work per pass is bounded by ``batch_size``.

Every replica may run a reaper; they do not coordinate. Two reapers settling the same hold
write the ledger once (the request row is unique) and release the hold once (by nonce).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from beam.adapters.postgres_store import PostgresStore
from beam.adapters.redis_store import RedisStore
from beam.adapters.scripts import HoldView, Scripts
from beam.constants import SETTLE_REPAIR_GRACE_MS, parse_customer_key
from beam.core import faults
from beam.core.faults import now_ms
from beam.core.ledger import Ledger
from beam.observability import REAPER_FAILURES, REAPER_PASSES, REAPER_SETTLED, SPENT
from beam.records import RecordOutcome, Settlement, SettlementStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReaperStats:
    customers_scanned: int
    holds_settled: int
    holds_completed: int = 0
    failures: int = 0


class Reaper:
    def __init__(
        self,
        redis: RedisStore,
        scripts: Scripts,
        postgres: PostgresStore,
        ledger: Ledger,
        *,
        batch_size: int = 500,
        repair_grace_ms: int = SETTLE_REPAIR_GRACE_MS,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.postgres = postgres
        self.ledger = ledger
        self.batch_size = batch_size
        self.repair_grace_ms = repair_grace_ms
        self.settled_total = 0
        self._keys: AsyncIterator[str] | None = None

    async def run_once(self) -> ReaperStats:
        """One bounded pass, continuing the previous pass's SCAN where it stopped."""
        seen: set[tuple[str, str]] = set()
        settled = completed = failures = 0
        async for key in self._scan():
            parsed = parse_customer_key(key)
            if parsed is None or parsed in seen:
                continue
            seen.add(parsed)
            done, fixed, failed = await self.reap_customer(*parsed)
            settled, completed, failures = settled + done, completed + fixed, failures + failed
            if settled >= self.batch_size or len(seen) >= self.batch_size * 20:
                break
        self.settled_total += settled
        return ReaperStats(len(seen), settled, completed, failures)

    async def _scan(self) -> AsyncIterator[str]:
        if self._keys is None:
            self._keys = self.redis.scan_hold_sets().__aiter__()
        while True:
            try:
                key = await self._keys.__anext__()
            except StopAsyncIteration:
                self._keys = None  # the next pass starts a new SCAN
                return
            except BaseException:
                self._keys = None
                raise
            yield key

    async def reap_customer(self, tenant: str, customer_id: str) -> tuple[int, int, int]:
        """Settle what expired and finish what was left settling; returns
        (holds settled, settlements completed or abandoned, failures)."""
        limit = max(1, min(self.batch_size, 100))
        try:
            work = await self.scripts.reaper_work(
                tenant, customer_id, now_ms=now_ms(), limit=limit, grace_ms=self.repair_grace_ms
            )
        except Exception:
            if faults.enabled(faults.BUG_REAPER_POISON):
                raise
            self._failed(tenant, customer_id, "")
            return 0, 0, 1
        settled = completed = failures = 0
        for hold in work.expiring:
            if await self._isolated(
                tenant, customer_id, hold, self._expire(tenant, customer_id, hold)
            ):
                settled += 1
            else:
                failures += 1
        for hold in work.settling:
            repair = self.ledger.complete_settling(tenant, customer_id, hold)
            if await self._isolated(tenant, customer_id, hold, repair):
                completed += 1
            else:
                failures += 1
        return settled, completed, failures

    async def _isolated(self, tenant: str, customer_id: str, hold: HoldView, work: object) -> bool:
        """Run one hold's work; its failure is logged and counted, never raised."""
        assert asyncio.iscoroutine(work)
        try:
            await work
            return True
        except Exception:
            if faults.enabled(faults.BUG_REAPER_POISON):
                raise
            self._failed(tenant, customer_id, hold.hold_id)
            return False

    @staticmethod
    def _failed(tenant: str, customer_id: str, hold_id: str) -> None:
        REAPER_FAILURES.inc()
        log.warning(
            "reaper could not settle a hold; retrying next pass",
            exc_info=True,
            extra={"tenant": tenant, "customer_id": customer_id, "hold_id": hold_id},
        )

    async def _expire(self, tenant: str, customer_id: str, hold: HoldView) -> None:
        """Record an expired hold at what it consumed, then release it."""
        recorded = await self.postgres.record_settlement(_expiry(tenant, customer_id, hold), None)
        await faults.point(faults.REAPER_COMMITTED)
        first = recorded.settlement
        # Only while it is still expiring: a Finalize may have taken the hold over meanwhile
        # (it then settles it, with an adjustment, and keeps it reserved until then).
        if recorded.outcome is RecordOutcome.OTHER_HOLD:
            await self.ledger.release(
                tenant,
                customer_id,
                hold.hold_id,
                hold.nonce,
                recorded.orphan_entry,
                only_status="expiring",
            )
            return
        await self.ledger.release(
            tenant, customer_id, hold.hold_id, hold.nonce, first, first, only_status="expiring"
        )
        if recorded.outcome is RecordOutcome.NEW:
            SPENT.labels(first.model or "none").inc(first.charged_grains)

    async def run_forever(self, interval_seconds: float) -> None:
        while True:
            try:
                stats = await self.run_once()
                REAPER_PASSES.labels("ok").inc()
                REAPER_SETTLED.inc(stats.holds_settled)
                if stats.holds_settled or stats.holds_completed:
                    log.info(
                        "reaper settled expired holds",
                        extra={
                            "holds": stats.holds_settled,
                            "completed": stats.holds_completed,
                            "failures": stats.failures,
                        },
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                REAPER_PASSES.labels("failed").inc()
                log.exception("reaper pass failed; retrying next interval")
            await asyncio.sleep(interval_seconds)


def _expiry(tenant: str, customer_id: str, hold: HoldView) -> Settlement:
    return Settlement(
        tenant=tenant,
        customer_id=customer_id,
        request_id=hold.hold_id,
        status=SettlementStatus.EXPIRED,
        model=hold.model,
        estimated_grains=hold.estimated,
        reserved_grains=hold.amount,
        consumed_grains=hold.consumed,
        charged_grains=hold.consumed,
        refunded_grains=0,
        overage_grains=0,
        prompt_tokens=hold.in_tokens + hold.cached_tokens,
        completion_tokens=hold.out_tokens,
        cached_prompt_tokens=hold.cached_tokens,
        hold_nonce=hold.nonce,
    )

"""Usage analytics from PostgreSQL: spend per customer, model and time bucket.

Reads ``usage_events`` (one row per ledger entry that spends: settlement, expiry,
adjustment; see migrations/0005_usage_analytics.sql), so every bucket's ``charged_grains``
is the sum of those ledger entries in it. Buckets are by settlement time, in UTC.

Two engines answer the same question the same way:

- plain PostgreSQL: ``date_trunc(<bucket>, time, 'UTC')`` over ``usage_events``;
- TimescaleDB: ``time_bucket`` over the hypertable for minute buckets, and the hourly
  continuous aggregate ``usage_hourly`` (real-time: rows newer than its last refresh are
  read from the hypertable) for hour and day buckets and the top customers, once
  ``beam_state`` says it is complete (its history materialized); until then the hypertable.

``apply_policies`` sets TimescaleDB's retention and compression from settings and
materializes the aggregate's history; it is idempotent and does nothing on plain
PostgreSQL. Every query is bounded by its caller (``beam.core.usage``): a time range and a
row limit.

Every read runs on the read pool (``PostgresStore.read_pool``, BEAM_DATABASE_READ_POOL_MAX),
waited for at most ``READ_WAIT_SECONDS``: however many usage queries run and however long
they take, they never hold a connection a settlement needs. ``apply_policies`` writes
(``beam migrate``), so it uses the main pool.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg

from beam.adapters.postgres_store import READ_WAIT_SECONDS, read_connection
from beam.errors import BeamError, Reason

log = logging.getLogger(__name__)

# beam_state row: 'complete' once usage_hourly holds the whole history (migrations 0005 and
# 0008, which recreates the aggregate and so takes 'complete' back).
AGGREGATE_STATE = "usage_hourly"
AGGREGATE_COMPLETE = "complete"
AGGREGATE_VIEW = "usage_hourly"
# How long a "not (yet) usable" verdict about the aggregate is kept before asking again.
_RECHECK_SECONDS = 60.0


class Bucket(StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"


@dataclass(frozen=True, slots=True)
class UsageRow:
    start: datetime
    model: str
    requests: int
    charged_grains: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    # Of requests and charged_grains: requests let through while Beam was unreachable
    # (migrations/0008_let_through.sql) and the grains their settlements charged.
    let_through_requests: int
    let_through_grains: int


@dataclass(frozen=True, slots=True)
class CustomerSpend:
    customer_id: str
    requests: int
    charged_grains: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    let_through_requests: int
    let_through_grains: int


@dataclass(frozen=True, slots=True)
class UsagePolicies:
    """TimescaleDB policies; 0 days = none (keep everything, never compress)."""

    raw_retention_days: int = 0
    compress_after_days: int = 7
    hourly_retention_days: int = 0


# The sums every answer carries, over usage_events (raw) or usage_hourly (aggregate).
_RAW_SUMS = """sum(request_count)::bigint AS requests, sum(cost_grains)::bigint AS charged_grains,
    sum(prompt_tokens)::bigint AS prompt_tokens,
    sum(completion_tokens)::bigint AS completion_tokens,
    sum(cached_prompt_tokens)::bigint AS cached_prompt_tokens,
    sum(CASE WHEN let_through THEN request_count ELSE 0 END)::bigint AS let_through_requests,
    sum(CASE WHEN let_through THEN cost_grains ELSE 0 END)::bigint AS let_through_grains"""
_AGGREGATE_SUMS = """sum(requests)::bigint AS requests,
    sum(charged_grains)::bigint AS charged_grains, sum(prompt_tokens)::bigint AS prompt_tokens,
    sum(completion_tokens)::bigint AS completion_tokens,
    sum(cached_prompt_tokens)::bigint AS cached_prompt_tokens,
    sum(let_through_requests)::bigint AS let_through_requests,
    sum(let_through_grains)::bigint AS let_through_grains"""

# Bucket start expressions. Every one is in UTC: date_trunc with an explicit zone (never
# the session's TimeZone), time_bucket of a timestamptz (UTC-aligned for these widths).
_POSTGRES_BUCKETS = {
    Bucket.MINUTE: "date_trunc('minute', time, 'UTC')",
    Bucket.HOUR: "date_trunc('hour', time, 'UTC')",
    Bucket.DAY: "date_trunc('day', time, 'UTC')",
}
_TIMESCALE_BUCKETS = {
    Bucket.MINUTE: "time_bucket(INTERVAL '1 minute', time)",
    Bucket.HOUR: "time_bucket(INTERVAL '1 hour', time)",
    Bucket.DAY: "time_bucket(INTERVAL '1 day', time)",
}
_AGGREGATE_BUCKETS = {
    Bucket.HOUR: "bucket",
    Bucket.DAY: "time_bucket(INTERVAL '1 day', bucket)",
}

_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)


@contextlib.contextmanager
def _unavailable_as_store_error() -> Iterator[None]:
    """PostgreSQL out of reach is STORE_UNAVAILABLE, as for every other store call."""
    try:
        yield
    except _UNAVAILABLE as error:
        raise BeamError(
            Reason.STORE_UNAVAILABLE, f"postgresql unavailable: {type(error).__name__}"
        ) from error


class UsageStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        read_pool: asyncpg.Pool | None = None,
        *,
        read_wait_seconds: float = READ_WAIT_SECONDS,
    ) -> None:
        """``pool`` for the policies (writes), ``read_pool`` for every query (None: ``pool``,
        for a tool that opens one pool)."""
        self.pool = pool
        self.read_pool = pool if read_pool is None else read_pool
        self.read_wait_seconds = read_wait_seconds
        self._timescale: bool | None = None
        self._aggregate_ok = False
        self._aggregate_checked_at = -1e9

    def _reading(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        return read_connection(self.read_pool, self.read_wait_seconds)

    # -- which engine -------------------------------------------------------------------------

    async def timescale(self) -> bool:
        """Whether ``usage_events`` is a TimescaleDB hypertable (asked once per process)."""
        if self._timescale is None:
            with _unavailable_as_store_error():
                async with self._reading() as conn:
                    self._timescale = bool(
                        await conn.fetchval(
                            """SELECT EXISTS (SELECT 1 FROM pg_extension
                                              WHERE extname = 'timescaledb')
                               AND to_regclass('timescaledb_information.hypertables')
                                   IS NOT NULL"""
                        )
                    ) and bool(
                        await conn.fetchval(
                            """SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                                              WHERE hypertable_name = 'usage_events'
                                                AND hypertable_schema = current_schema())"""
                        )
                    )
        return self._timescale

    async def aggregate_usable(self) -> bool:
        """Whether the hourly continuous aggregate exists and holds the whole history.

        Asked again every ``_RECHECK_SECONDS`` either way: a migration may take it back
        (0008 recreates it), and a process must not keep trusting an aggregate without its
        history."""
        now = time.monotonic()
        if now - self._aggregate_checked_at < _RECHECK_SECONDS:
            return self._aggregate_ok
        self._aggregate_checked_at = now
        if not await self.timescale():
            return False
        with _unavailable_as_store_error():
            async with self._reading() as conn:
                ok = await conn.fetchval(
                    """SELECT to_regclass($1) IS NOT NULL
                              AND EXISTS (SELECT 1 FROM beam_state
                                          WHERE name = $2 AND value = $3)""",
                    AGGREGATE_VIEW,
                    AGGREGATE_STATE,
                    AGGREGATE_COMPLETE,
                )
        self._aggregate_ok = bool(ok)
        return self._aggregate_ok

    # -- reads --------------------------------------------------------------------------------

    async def customer_usage(
        self,
        tenant: str,
        customer_id: str,
        start: datetime,
        end: datetime,
        bucket: Bucket,
        *,
        by_model: bool,
        limit: int,
    ) -> list[UsageRow]:
        """Buckets of [start, end) with at least one event, oldest first (then by model);
        at most ``limit`` rows. ``start`` and ``end`` are on bucket boundaries."""
        if bucket is not Bucket.MINUTE and await self.aggregate_usable():
            source, sums, column = AGGREGATE_VIEW, _AGGREGATE_SUMS, "bucket"
            expression = _AGGREGATE_BUCKETS[bucket]
        else:
            source, sums, column = "usage_events", _RAW_SUMS, "time"
            engines = _TIMESCALE_BUCKETS if await self.timescale() else _POSTGRES_BUCKETS
            expression = engines[bucket]
        model = "model" if by_model else "''"
        query = f"""SELECT {expression} AS start, {model} AS model, {sums}
                    FROM {source}
                    WHERE tenant = $1 AND customer_id = $2 AND {column} >= $3 AND {column} < $4
                    GROUP BY 1, 2 ORDER BY 1, 2 LIMIT $5"""  # noqa: S608 (constants only)
        with _unavailable_as_store_error():
            async with self._reading() as conn:
                rows = await conn.fetch(query, tenant, customer_id, start, end, limit)
        return [
            UsageRow(
                start=r["start"],
                model=r["model"],
                requests=r["requests"] or 0,
                charged_grains=r["charged_grains"] or 0,
                prompt_tokens=r["prompt_tokens"] or 0,
                completion_tokens=r["completion_tokens"] or 0,
                cached_prompt_tokens=r["cached_prompt_tokens"] or 0,
                let_through_requests=r["let_through_requests"] or 0,
                let_through_grains=r["let_through_grains"] or 0,
            )
            for r in rows
        ]

    async def top_customers(
        self,
        tenant: str,
        start: datetime,
        end: datetime,
        *,
        limit: int,
        customers: Sequence[str] = (),
    ) -> list[CustomerSpend]:
        """The tenant's customers by spend over [start, end) (hour boundaries), most first;
        among ``customers`` when given (filtered before the limit)."""
        if await self.aggregate_usable():
            source, sums, column = AGGREGATE_VIEW, _AGGREGATE_SUMS, "bucket"
        else:
            source, sums, column = "usage_events", _RAW_SUMS, "time"
        query = f"""SELECT customer_id, {sums} FROM {source}
                    WHERE tenant = $1 AND {column} >= $2 AND {column} < $3
                      AND (cardinality($4::text[]) = 0 OR customer_id = ANY($4::text[]))
                    GROUP BY customer_id
                    ORDER BY charged_grains DESC, customer_id LIMIT $5"""  # noqa: S608
        with _unavailable_as_store_error():
            async with self._reading() as conn:
                rows = await conn.fetch(query, tenant, start, end, list(customers), limit)
        return [
            CustomerSpend(
                customer_id=r["customer_id"],
                requests=r["requests"] or 0,
                charged_grains=r["charged_grains"] or 0,
                prompt_tokens=r["prompt_tokens"] or 0,
                completion_tokens=r["completion_tokens"] or 0,
                cached_prompt_tokens=r["cached_prompt_tokens"] or 0,
                let_through_requests=r["let_through_requests"] or 0,
                let_through_grains=r["let_through_grains"] or 0,
            )
            for r in rows
        ]

    async def spent_since(self, tenant: str, customer_id: str, since: datetime) -> int:
        """Grains a customer spent (settlements, expiries, adjustments) since ``since``."""
        with _unavailable_as_store_error():
            async with self._reading() as conn:
                spent = await conn.fetchval(
                    """SELECT COALESCE(sum(cost_grains), 0)::bigint FROM usage_events
                       WHERE tenant = $1 AND customer_id = $2 AND time >= $3""",
                    tenant,
                    customer_id,
                    since,
                )
        return int(spent)

    # -- TimescaleDB policies -----------------------------------------------------------------

    async def apply_policies(self, policies: UsagePolicies) -> list[str]:
        """Set retention and compression from ``policies`` and materialize the hourly
        aggregate's history once. Returns what was done (nothing on plain PostgreSQL).

        Runs outside a transaction: ``refresh_continuous_aggregate`` cannot run in one."""
        if not await self.timescale():
            return []
        done: list[str] = []
        async with self.pool.acquire() as conn:
            aggregate = bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL",
                                                 AGGREGATE_VIEW))  # fmt: skip
            rebuilt = 0
            if aggregate and not await self._complete(conn):
                # The aggregate is new (0005, or recreated by 0008): its history comes from
                # usage_events, whose raw retention may have dropped events the old aggregate
                # still held. Rebuild every missing event from the ledger first (it keeps
                # every entry); the raw retention drops them again, after they are counted.
                rebuilt = int(await conn.fetchval("SELECT beam_usage_backfill()") or 0)
                # Everything up to the current hour; the refresh policy (3 days, every 30
                # minutes) and real-time aggregation take it from there.
                await conn.execute(
                    f"CALL refresh_continuous_aggregate('{AGGREGATE_VIEW}', NULL::timestamptz, "
                    "date_trunc('hour', now()))"
                )
                await conn.execute(
                    """INSERT INTO beam_state (name, value) VALUES ($1, $2)
                       ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value,
                           updated_at = now()""",
                    AGGREGATE_STATE,
                    AGGREGATE_COMPLETE,
                )
                done.append("usage_hourly: history materialized")
                if rebuilt:
                    done.append(f"usage_events: {rebuilt} events rebuilt from the ledger")
            done += await self._compression(conn, policies.compress_after_days)
            done += await self._retention(conn, "usage_events", policies.raw_retention_days)
            if aggregate:
                done += await self._retention(conn, AGGREGATE_VIEW, policies.hourly_retention_days)
        self._aggregate_checked_at = -1e9
        return done

    @staticmethod
    async def _complete(conn: asyncpg.Connection) -> bool:
        value = await conn.fetchval("SELECT value FROM beam_state WHERE name = $1",
                                    AGGREGATE_STATE)  # fmt: skip
        return bool(value == AGGREGATE_COMPLETE)

    @staticmethod
    async def _compression(conn: asyncpg.Connection, days: int) -> list[str]:
        await conn.execute("SELECT remove_compression_policy('usage_events', if_exists => TRUE)")
        if days <= 0:
            return ["usage_events: no compression policy"]
        enabled = await conn.fetchval(
            """SELECT compression_enabled FROM timescaledb_information.hypertables
               WHERE hypertable_name = 'usage_events' AND hypertable_schema = current_schema()"""
        )
        if not enabled:
            await conn.execute(
                """ALTER TABLE usage_events SET (timescaledb.compress,
                       timescaledb.compress_segmentby = 'tenant, customer_id',
                       timescaledb.compress_orderby = 'time DESC')"""
            )
        await conn.execute(
            "SELECT add_compression_policy('usage_events', make_interval(days => $1))", days
        )
        return [f"usage_events: compressed after {days} days"]

    @staticmethod
    async def _retention(conn: asyncpg.Connection, relation: str, days: int) -> list[str]:
        await conn.execute(
            "SELECT remove_retention_policy($1::text::regclass, if_exists => TRUE)", relation
        )
        if days <= 0:
            return [f"{relation}: kept forever"]
        await conn.execute(
            "SELECT add_retention_policy($1::text::regclass, make_interval(days => $2))",
            relation,
            days,
        )
        return [f"{relation}: dropped after {days} days"]

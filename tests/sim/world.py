"""The simulator's own stores: one PostgreSQL and one restartable redis-server.

They are the simulator's alone, so it can restart them, lose Redis writes on purpose and
wipe both between schedules. Redis runs without AOF: ``SAVE`` takes a snapshot, ``kill``
+ restart loads that snapshot back, and every write after it is lost, as after a crash of
a Redis whose last writes were never persisted or replicated. PostgreSQL runs with
``fsync=on`` (beam_dev.servers): a kill loses nothing that committed.

Between schedules both stores are emptied (``FLUSHALL``; every table but the schema's
bookkeeping) so a schedule's behaviour depends on its seed only, and a soak of thousands
of schedules does not slow down as the tables grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from beam.adapters.migrations import migrate
from beam.config import ServiceSettings
from beam.core import faults
from beam.core.pricing import parse_price_entries
from beam.core.runtime import Runtime
from beam.records import EntryType
from beam_dev import servers as devservers
from tests.sim.steps import ADJUST_QUEUED, HOLD_TTL_SECONDS
from tests.support.stack import PRICES, Stores

_KEEP_TABLES = ("schema_migrations",)


# Holds one script may sum or list in the simulator (production: 256): small, so the
# stepwise scans of many holds run under faults (lua/scan_holds.lua).
HOLDS_PER_SCRIPT = 2


class World:
    def __init__(self, workdir: Path | None = None) -> None:
        self._tmp = None if workdir is not None else tempfile.mkdtemp(prefix="beam-sim-")
        self.workdir = Path(workdir or self._tmp or ".").resolve()
        self.postgres: devservers.PostgresServer | None = None
        self.redis: devservers.RedisServer | None = None
        self.stores: Stores | None = None
        self.pg: asyncpg.Connection | None = None
        self.rd: aioredis.Redis | None = None
        self.migrated = False

    # -- servers --------------------------------------------------------------------------

    def start(self) -> World:
        self.postgres = devservers.PostgresServer(self.workdir / "postgres")
        self.postgres.start()
        self.redis = devservers.RedisServer(self.workdir / "redis", appendonly=False)
        self.redis.start()
        self.stores = Stores(self.workdir, "standalone", self.postgres, self.redis)
        return self

    def stop(self) -> None:
        for server in (self.redis, self.postgres):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def settings(self) -> ServiceSettings:
        """A small pool on purpose: a quarter of it (one connection) settles at a time, so
        the settlements of a burst queue up and share group commits. Two holds per script:
        every sync, resync and audit of a customer with more takes the stepwise scan
        (scan_holds, the holds counter) in the middle of the schedule's traffic."""
        assert self.stores is not None
        return self.stores.settings(
            hold_ttl_seconds=HOLD_TTL_SECONDS,
            database_pool_min=1,
            database_pool_max=4,
            redis_holds_per_script=HOLDS_PER_SCRIPT,
            migrate_on_start=not self.migrated,
        )

    async def runtime(self) -> Runtime:
        rt = await Runtime.create(self.settings(), background=False)
        self.migrated = True
        _instrument(rt)
        return rt

    # -- the simulator's own connections (for observing, never for the core) --------------

    async def connect(self) -> None:
        assert self.postgres is not None
        assert self.redis is not None
        await self.disconnect()
        self.pg = await asyncpg.connect(self.postgres.dsn)
        self.rd = aioredis.Redis(
            host=self.redis.host, port=self.redis.port, decode_responses=True, socket_timeout=10
        )

    async def disconnect(self) -> None:
        if self.pg is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pg.close(), 5)
            self.pg = None
        if self.rd is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.rd.aclose(), 5)
            self.rd = None

    # -- between schedules ----------------------------------------------------------------

    async def wipe(self, tenants: list[str], *, snapshot: bool = True) -> None:
        """Empty both stores, then seed the schedule's tenants' prices. ``snapshot``: save
        the empty Redis, so a restart before any other snapshot comes back empty."""
        assert self.pg is not None
        assert self.rd is not None
        if not self.migrated:
            await migrate(self.pg)
            self.migrated = True
        await self.rd.flushall()
        if snapshot:
            await self.rd.save()
        tables = [
            r["table_name"]
            for r in await self.pg.fetch(
                """SELECT table_name FROM information_schema.tables
                   WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"""
            )
            if r["table_name"] not in _KEEP_TABLES
        ]
        async with self.pg.transaction():
            # Replica mode skips triggers, among them the ledger's append-only guard: this
            # is the simulator's own database, emptied between schedules.
            await self.pg.execute("SET LOCAL session_replication_role = replica")
            for table in tables:
                await self.pg.execute(f'DELETE FROM "{table}"')  # noqa: S608 - own names
        for tenant in tenants:
            for record in parse_price_entries(tenant, PRICES):
                await self.pg.execute(
                    """INSERT INTO model_prices (tenant, model, version,
                           input_grains_per_million, output_grains_per_million,
                           cached_input_grains_per_million, effective_from, source)
                       VALUES ($1, $2, 1, $3, $4, $5, $6, 'sim')""",
                    tenant,
                    record.model,
                    record.input_grains_per_million,
                    record.output_grains_per_million,
                    record.cached_input_grains_per_million,
                    record.effective_from,
                )

    # -- faults of the stores -------------------------------------------------------------

    async def redis_snapshot(self) -> None:
        assert self.rd is not None
        await self.rd.save()

    async def redis_restart(self) -> None:
        """kill -9 and restart: Redis comes back with the last snapshot only."""
        assert self.redis is not None
        await self.disconnect()
        server = self.redis
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.restart)
        await self.connect()

    async def postgres_restart(self) -> None:
        """kill -9 of every PostgreSQL process, then WAL recovery (nothing committed lost)."""
        assert self.postgres is not None
        await self.disconnect()
        server = self.postgres
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)
        await self.connect()


def _instrument(rt: Runtime) -> None:
    """The simulator's own fault point ``ADJUST_QUEUED``: a late Finalize's adjustment
    about to be committed (its claim reserving it), where a paused process or a commit
    queued for a pool connection waits. The core has no point there; the store is wrapped."""
    store = rt.postgres
    append_entry = store.append_entry

    async def queued(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("fence") is not None and kwargs.get("entry_type") is EntryType.ADJUSTMENT:
            await faults.point(ADJUST_QUEUED)
        return await append_entry(*args, **kwargs)

    store.append_entry = queued  # type: ignore[method-assign]


async def stop_runtime(rt: Runtime | None) -> None:
    """Stop a Runtime whose process is "dead": errors are expected and ignored."""
    if rt is None:
        return
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(rt.stop(), 20)

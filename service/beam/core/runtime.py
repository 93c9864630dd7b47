"""Wires the stores, caches and background work of one Beam process.

Both servers (gRPC and REST) share one ``Runtime``: one Redis client, one PostgreSQL pool,
one key cache, one price cache, one reaper. Background tasks are owned here and cancelled
on ``stop``; nothing else starts tasks.

The request-token key is a dependency, not a setting the runtime digs out: only the
service's settings carry it (``ServiceSettings``), and every other process (the operator,
the integrity job) builds its runtime with ``UnsignedTokens``, which cannot issue or
verify a token. Those calls (Check, Deduct, Finalize) are the service's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from beam.adapters.postgres_store import PostgresStore
from beam.adapters.redis_store import RedisStore
from beam.adapters.scripts import Scripts
from beam.config import RuntimeSettings, ServiceSettings
from beam.constants import CHANNEL_API_KEYS, CHANNEL_PRICES
from beam.core.admin import Admin
from beam.core.auth import Authenticator, RequestTokens
from beam.core.ledger import Ledger
from beam.core.pricing import PriceBook
from beam.core.reaper import Reaper
from beam.core.reconcile import Reconciler

log = logging.getLogger(__name__)

# beam_state row: the identity of the Redis server(s) the accounts were last synced against.
_REDIS_IDENTITY = "redis_identity"


def _identity_text(identity: frozenset[str]) -> str:
    return ",".join(sorted(identity))


class UnsignedTokens(RequestTokens):
    """The request tokens of a process that holds no key. Reaching ``issue`` or ``verify``
    here is a programmer error (a service call in a process that is not the service), so
    it crashes instead of signing with a key nobody else knows."""

    def __init__(self) -> None:  # no key, on purpose: there is nothing to sign with
        pass

    def issue(self, tenant: str, customer_id: str, request_id: str, nonce: str) -> str:
        raise RuntimeError("this process holds no request-token key: only the service issues")

    def verify(self, token: str, tenant: str, customer_id: str, request_id: str) -> str:
        raise RuntimeError("this process holds no request-token key: only the service verifies")


def tokens_of(settings: RuntimeSettings) -> RequestTokens:
    """The service's key when these are the service's settings, else tokens that cannot sign."""
    if isinstance(settings, ServiceSettings):
        return RequestTokens(settings.request_token_secret.get_secret_value())
    return UnsignedTokens()


class Runtime:
    def __init__(
        self,
        settings: RuntimeSettings,
        redis: RedisStore,
        postgres: PostgresStore,
        tokens: RequestTokens,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.postgres = postgres
        self.auth = Authenticator(
            postgres, dev_mode=settings.is_dev, max_age_seconds=settings.cache_max_age_seconds
        )
        self.prices = PriceBook(postgres, max_age_seconds=settings.cache_max_age_seconds)
        self.tokens = tokens
        self.scripts = Scripts(redis, holds_per_script=settings.redis_holds_per_script)
        self.ledger = Ledger(
            self.scripts,
            postgres,
            self.prices,
            self.tokens,
            default_hold_ttl_seconds=settings.hold_ttl_seconds,
        )
        self.admin = Admin(self.ledger, self.scripts, postgres)
        self.reconciler = Reconciler(self.admin, postgres, self.ledger.reload_account, self.prices)
        self.reaper = Reaper(
            redis, self.scripts, postgres, self.ledger, batch_size=settings.reaper_batch_size
        )
        self._tasks: list[asyncio.Task[Any]] = []
        self._listener: Any = None
        # The Redis identity read before the last start-up resync check (watch_redis).
        self._redis_identity: frozenset[str] | None = None

    @classmethod
    async def create(
        cls,
        settings: RuntimeSettings,
        *,
        tokens: RequestTokens | None = None,
        background: bool = True,
    ) -> Runtime:
        """The one place a process builds its runtime (service, operator, CLI, tests).
        ``tokens`` defaults to ``tokens_of(settings)``. A failed step closes what the earlier
        ones opened, so a caller that retries start-up (the operator's startup handler)
        never leaks a pool."""
        postgres = await PostgresStore.connect(settings)
        redis: RedisStore | None = None
        try:
            if settings.migrate_on_start:
                await postgres.migrate()
            redis = RedisStore.connect(settings)
            runtime = cls(
                settings, redis, postgres, tokens if tokens is not None else tokens_of(settings)
            )
            await runtime.start(background=background)
        except BaseException:
            if redis is not None:
                await redis.close()
            await postgres.close()
            raise
        return runtime

    async def start(self, *, background: bool = True) -> None:
        await self.auth.reload()
        await self.prices.reload()
        await self.resync_if_redis_changed()
        self._listener = await self.postgres.listen(
            [CHANNEL_API_KEYS, CHANNEL_PRICES], self._on_notify
        )
        if background:
            interval = self.settings.reaper_interval_seconds
            self._tasks.append(
                asyncio.create_task(self.reaper.run_forever(interval), name="beam-reaper")
            )
            self._tasks.append(
                asyncio.create_task(self.watch_redis(interval), name="beam-redis-watch")
            )

    async def resync_if_redis_changed(self) -> bool:
        """Resync every account when Redis is not the server the accounts were last synced
        against (its identity is recorded in PostgreSQL). This catches what a running
        replica's watch cannot: Redis and every replica restarting together after Redis
        lost its last writes (AOF ``everysec``). The identity recorded is the one read
        before the sync, and ``watch_redis`` starts from it: if Redis changed again during
        the sync, the watch syncs again. Returns whether it resynced."""
        identity = await self.redis.identity()
        if identity:
            self._redis_identity = identity  # where watch_redis starts from
        current = _identity_text(identity)
        if not current or await self.postgres.get_state(_REDIS_IDENTITY) == current:
            return False
        log.warning("redis is not the server last synced against: resyncing accounts")
        synced, kept = await self.admin.sync_tenant(None)
        await self.postgres.set_state(_REDIS_IDENTITY, current)
        log.warning("resync done", extra={"customers": synced, "open_holds_kept": kept})
        return True

    async def watch_redis(self, interval_seconds: float) -> None:
        """Resync every account from PostgreSQL when Redis restarts or fails over.

        Replication is asynchronous: a promoted replica (or a restart from an AOF fsynced
        once a second) may miss the last writes, among them a balance adopted after a
        settlement. The ledger is still right, so a resync makes Redis right again; until it
        runs, the window is the last second of writes. Every replica may do this; a sync is
        idempotent."""
        # Starts from the identity the start-up resync read before it synced (not the first
        # one this loop reads): a restart during or right after that resync counts too.
        known = self._redis_identity
        while True:
            try:
                current = await self.redis.identity()
                if known is not None and current and current != known:
                    log.warning("redis restarted or failed over: resyncing accounts")
                    synced, kept = await self.admin.sync_tenant(None)
                    await self.postgres.set_state(_REDIS_IDENTITY, _identity_text(current))
                    log.warning(
                        "resync after redis change done",
                        extra={"customers": synced, "open_holds_kept": kept},
                    )
                if current:
                    known = current
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a store outage: try again next interval
                log.info("redis watch: %s", error)
            await asyncio.sleep(interval_seconds)

    def _on_notify(self, channel: str, _payload: str) -> None:
        # Reload on the next call (cheap, and it never runs inside asyncpg's callback).
        if channel == CHANNEL_API_KEYS:
            self.auth.invalidate()
        elif channel == CHANNEL_PRICES:
            self.prices.invalidate()

    async def ready(self) -> dict[str, bool]:
        redis_ok, postgres_ok = await asyncio.gather(self.redis.ping(), self.postgres.ping())
        return {"redis": redis_ok, "postgres": postgres_ok}

    async def stop(self) -> None:
        await self.ledger.drain(timeout_seconds=10)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=10)
        self._tasks.clear()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self.postgres.release(self._listener)
            self._listener = None
        await self.redis.close()
        await self.postgres.close()

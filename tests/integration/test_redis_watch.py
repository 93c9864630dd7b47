"""After a Redis restart or failover, every replica resyncs accounts from the ledger.

A restart from an AOF fsynced once a second, or a promoted replica, may miss the last
writes, among them a balance adopted after a settlement. Simulated here by rewriting the
cached balance (the "lost" adoption), then restarting Redis: the watch notices the new
run id and puts the ledger's balance back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from beam.constants import account_key
from beam.core.auth import Principal
from beam.core.runtime import Runtime
from beam.records import Customer, Role
from beam_dev import servers as devservers
from tests.support.stack import Stores, Tenant


async def test_restart_triggers_a_resync_from_the_ledger(
    stores: Stores, tenant: Tenant, tmp_path: Path
) -> None:
    redis = devservers.RedisServer(tmp_path / "redis", appendfsync="always")
    redis.start()
    try:
        async with asyncio.timeout(60):  # a hang fails here, with the stuck await's stack
            await _restart_and_resync(stores, tenant, redis)
    finally:
        redis.stop()


async def _restart_and_resync(
    stores: Stores, tenant: Tenant, redis: devservers.RedisServer
) -> None:
    settings = stores.settings(redis_url=redis.url, reaper_interval_seconds=0.2)
    runtime = await Runtime.create(settings, background=True)
    try:
        admin = Principal(tenant.name, Role.ADMIN, "t", frozenset())
        await runtime.admin.create_customer(admin, Customer(tenant.name, "c"), 5_000)
        await asyncio.sleep(0.5)  # the watch has seen the first identity
        key = account_key(tenant.name, "c")
        client = redis.client()
        client.hset(key, mapping={"balance": 9_999})  # a stale cached balance
        assert (await runtime.ledger.balance(admin, "c")).balance == 9_999
        await asyncio.to_thread(redis.kill)
        await asyncio.to_thread(redis.restart)
        for _ in range(100):  # bounded: 10 s
            await asyncio.sleep(0.1)
            try:
                if (await runtime.ledger.balance(admin, "c")).balance == 5_000:
                    break
            except Exception:  # noqa: S112 - Redis is coming back
                continue
        assert (await runtime.ledger.balance(admin, "c")).balance == 5_000
        report = await runtime.admin.verify_integrity(admin, "c")
        assert [r.problems for r in report] == [[]]
    finally:
        await runtime.stop()

"""Adversarial review of 439fcbe (a customer's holds summed or listed in bounded ZSCAN steps,
proven consistent by the holds counter ``hseq``) and e0f6177 (read-only PostgreSQL paths on
a pool of their own): each test is a schedule against the real stores (PostgreSQL, Redis;
Redis restarted for real where a restart is the fault) that breaks an invariant of
docs/ARCHITECTURE.md; each failed before the fix of a27d9e2 and passes now.
Fixtures and style as tests/integration/test_bounded_scripts.py.
Prices: "cheap" costs 1 grain per input token and 2 per output token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors

from beam.constants import (
    SCRIPT_AUDIT_ACCOUNT,
    SCRIPT_EXPIRE_HOLDS,
    SCRIPT_LOAD_ACCOUNT,
    SCRIPT_SCAN_HOLDS,
    SETTLE_REPAIR_GRACE_MS,
    customer_keys,
    expiring_holds_key,
    hold_key,
    open_holds_key,
    settling_holds_key,
)
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand
from beam.core.faults import now_ms
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from beam_dev import servers as devservers
from tests.support.money import CUSTOMER, RedisSnapshot, customer, redis_account, settle
from tests.support.stack import Stores, Tenant, fresh_database, provision_tenant


async def open_holds(rt: Runtime, p: Principal, count: int, prefix: str = "r") -> list[str]:
    """``count`` open holds of 1,000 grains each (as tests/integration/test_bounded_scripts)."""
    tokens = []
    for i in range(count):
        check = await rt.ledger.check(
            p, CheckCommand(CUSTOMER, f"{prefix}{i}", 1_000, 1.0, "cheap")
        )
        assert check.approved
        tokens.append(check.request_token)
    return tokens


async def streams(rt: Runtime, p: Principal, token: str) -> bool:
    """Does a Deduct of 100 output tokens on request r (token ``token``) go through? A
    settled request's Deduct is refused: ``success`` false, or REQUEST_ALREADY_SETTLED."""
    try:
        answer = await rt.ledger.deduct(
            p, DeductCommand(CUSTOMER, "r", token, 100, "cheap", True, 1)
        )
    except BeamError as refused:
        if refused.reason is not Reason.REQUEST_ALREADY_SETTLED:
            raise
        return False
    return bool(answer.success)


async def sum_of_holds(rt: Runtime, tenant: str, cid: str = CUSTOMER) -> int:
    """Σ amount over every hold in the three sets, read key by key (no Beam script)."""
    client = rt.redis.client
    total = 0
    for set_key in (open_holds_key, expiring_holds_key, settling_holds_key):
        for rid in await client.zrange(set_key(tenant, cid), 0, -1):
            total += int(await client.hget(hold_key(tenant, cid, rid), "amount") or 0)
    return total


async def reconnected(rt: Runtime) -> None:
    """The runtime's pooled Redis connections died with the server: the next command on
    each reconnects (the scripts do so through RedisStore's retries on their own)."""
    for _ in range(10):
        try:
            await rt.redis.client.ping()
            return
        except redis_errors.ConnectionError:
            continue


def wrap_run(rt: Runtime, before: Any) -> None:
    """Every script the runtime runs goes through ``before(name, keys, args)`` first (a
    fault point between two scripts; the scripts and the stores stay the real ones)."""
    original = rt.redis.run

    async def run(name: str, keys: Sequence[str], args: Sequence[Any], *, idempotent: bool) -> Any:
        await before(name, keys, args)
        return await original(name, keys, args, idempotent=idempotent)

    rt.redis.run = run  # type: ignore[method-assign]


# -- 1. a Redis restart in the middle of a stepwise scan: the ZSCAN cursor of one server ----
#       is continued on another, hseq is the same on both, and a partial sum is adopted


async def test_a_redis_restart_mid_scan_makes_a_forced_load_adopt_a_sum_missing_holds(
    stores: Stores, tenant: Tenant, tmp_path: Path
) -> None:
    """Schedule: a customer has 300 open holds (one hashtable-encoded ZSET; 8 holds per
    script). A forced load (SyncAll, a resync, a NOT_LOADED load of another replica) scans
    them; after 15 pages Redis restarts (kill -9, AOF ``appendfsync always``: NO write is
    lost, so Redis was exactly right before and after). The scan goes on with the cursor it
    had; the restarted server hashes the ZSET's members with a new random seed, so that
    cursor now means other buckets: some holds come twice (deduplicated), others never.
    Every page still answers the same hseq (nothing changed), the load finds hseq unchanged
    and adopts the partial sum.

    Breaks: *held = Σ holds* and *Redis is never ahead of the ledger*: `held` drops below
    what the holds reserve, so `available` is too large (new Checks and growing Deducts
    spend money that open streams still reserve) until a later resync reaches this
    customer (here: a Check for 50 000 grains is approved with 10 000 available, so the
    holds reserve 350 000 of a 310 000 balance). A restart that loses nothing made Redis
    wrong: before 439fcbe the load summed in one script and could not straddle a restart."""
    redis = devservers.RedisServer(tmp_path / "redis", appendfsync="always")
    redis.start()
    try:
        settings = stores.settings(redis_url=redis.url, redis_holds_per_script=8)
        rt = await Runtime.create(settings, background=False)
        try:
            async with asyncio.timeout(120):
                p = await customer(rt, tenant, 310_000)
                await open_holds(rt, p, 300)
                assert await redis_account(rt, tenant.name) == (310_000, 300_000)
                assert await sum_of_holds(rt, tenant.name) == 300_000
                pages = 0

                async def restart_at_page_15(name: str, *_: Any) -> None:
                    nonlocal pages
                    if name == SCRIPT_SCAN_HOLDS:
                        pages += 1
                        if pages == 15:
                            await asyncio.to_thread(redis.kill)
                            await asyncio.to_thread(redis.restart)

                wrap_run(rt, restart_at_page_15)
                await rt.ledger.reload_account(tenant.name, CUSTOMER, force=True)
                del rt.redis.run
                assert pages > 15  # the restart came in the middle of the scan
                assert await sum_of_holds(rt, tenant.name) == 300_000  # nothing was lost
                _, held = await redis_account(rt, tenant.name)
                # 10 000 grains are available; a Check for 50 000 must be refused.
                big = await rt.ledger.check(p, CheckCommand(CUSTOMER, "big", 50_000, 1.0, "cheap"))
                assert not big.approved, f"a 50 000 hold opened with 10 000 available (held {held})"
                assert held == 300_000, f"held {held} after the forced load, holds 300000"
        finally:
            await rt.stop()
    finally:
        redis.stop()


# -- 2. a forced load of a customer whose holds keep changing is one unbounded script -------


async def test_a_forced_load_of_a_busy_customer_never_sums_every_hold_in_one_script(
    runtime: Runtime, tenant: Tenant
) -> None:
    """Schedule: a customer with 300 open holds (8 holds per script: about 40 ZSCAN pages
    a scan) has traffic: one of its streams opens or settles a hold every 10 pages of a
    scan (with 8 per page: one change per 80 holds read; with 256 per page and 10,000
    holds, one change per ~2,500 holds read, i.e. per ~10 ms of scanning, is what a
    customer with thousands of concurrent streams does). SyncAll reloads it.

    Every one of the three scans sees hseq move and the load answers SCAN three times.
    Found on 439fcbe: the fourth load script then summed all holds inline, with 10,000
    holds the 63-87 ms script that stalls Redis for every tenant, for exactly the busy
    customers the bound was made for. Now the fourth keeps the existing account's `held`
    (changed atomically with the holds by every script), bounded like the others."""
    rt = runtime
    rt.scripts.holds_per_script = 8
    p = await customer(rt, tenant, 1_000_000)
    await open_holds(rt, p, 300)
    limits: list[int] = []
    pages = 0
    opened = 0

    async def traffic(name: str, _keys: Sequence[str], args: Sequence[Any]) -> None:
        nonlocal pages, opened
        if name == SCRIPT_LOAD_ACCOUNT:
            limits.append(int(args[7]))  # ARGV[8]: the most holds the script may sum
        if name == SCRIPT_SCAN_HOLDS:
            pages += 1
            if pages % 10 == 0:
                opened += 1
                await open_holds(rt, p, 1, prefix=f"busy{opened}-")

    wrap_run(rt, traffic)
    await rt.admin.sync_tenant(tenant.name)
    del rt.redis.run
    assert await redis_account(rt, tenant.name) == (1_000_000, (300 + opened) * 1_000)
    assert max(limits) <= rt.scripts.holds_per_script, (
        f"load_account ran with limits {limits}: one script summed all {300 + opened} holds"
    )


# -- 3. the reaper's script visits every settling hold of a customer ------------------------


async def hmget_calls(rt: Runtime) -> int:
    stats = await rt.redis.client.info("commandstats")
    return int(stats.get("cmdstat_hmget", {}).get("calls", 0))


async def test_the_reapers_script_visits_every_settling_hold_in_one_script(
    runtime: Runtime, tenant: Tenant
) -> None:
    """Schedule: a customer's 250 streams finish together (250 Finalizes, one process's
    admission bound; several replicas: several times that): each begin_settlement moved
    its hold to the settling set and its commit is under way. A reaper pass comes (limit
    8 here, 100 in production) within the 2 s grace period.

    expire_holds.lua fetches the whole settling set (ZRANGE 0 -1) and HMGETs each hold;
    none is past the grace, none counts towards ``limit``, so the loop never breaks: one
    script visits all 250 (with 256 settlements in flight per customer and replica, up to
    256 x replicas in production, against a bound of 256). docs/ARCHITECTURE.md: "No
    script's work grows with a customer's holds beyond a bound"."""
    rt = runtime
    rt.scripts.holds_per_script = 8
    p = await customer(rt, tenant, 1_000_000)
    await open_holds(rt, p, 250)
    for i in range(250):  # step 1 of each Finalize: reserve, move to settling
        begun = await rt.scripts.begin_settlement(
            tenant.name, CUSTOMER, f"r{i}", now_ms=now_ms(), token_nonce="",
            claim_nonce=f"claim{i}", total_cost_grains=500, prompt_tokens=0,
            completion_tokens=0, cached_prompt_tokens=0, prices=None, expire_batch=8,
            settle_deadline_ms=120_000,
        )  # fmt: skip
        assert begun.outcome == "SETTLE"
    before = await hmget_calls(rt)
    work = await rt.scripts.reaper_work(
        tenant.name, CUSTOMER, now_ms=now_ms(), limit=8, grace_ms=SETTLE_REPAIR_GRACE_MS
    )
    visited = await hmget_calls(rt) - before
    assert (work.expiring, work.settling) == ([], [])  # nothing for the reaper yet
    bound = max(8, rt.scripts.holds_per_script)
    assert visited <= bound, f"one {SCRIPT_EXPIRE_HOLDS} script read {visited} holds"


# -- 4. the resync after Redis lost writes reads its customer list through the read pool ----


async def test_analytics_on_the_read_pool_stop_the_resync_and_a_settled_hold_streams_again(
    stores: Stores, tenant: Tenant
) -> None:
    """Schedule: Check r (token T) -> Finalize r (300 grains, committed and released) ->
    Redis loses its last writes (r's keys and the account as before the Finalize: r's hold
    is open again, the balance is the old one) -> the watch (or start-up) resyncs, while
    every connection of the read pool is held by slow analytics of the same process
    (GetUsage, GetTopCustomers, tenant-wide VerifyIntegrity: BEAM_DATABASE_READ_POOL_MAX is
    4 by default). The settlement pool is idle. The resync's first query,
    ``all_customer_ids``, waits for a read connection, and after its wait the resync fails
    STORE_UNAVAILABLE (the watch tries again next interval, and waits behind analytics
    again); nothing is released. A Deduct on T streams on the settled hold.

    Breaks: *Redis is resynced after losing writes; holds the ledger has settled are
    released, never streamed again*, and *Redis is never ahead of the ledger* (its balance
    is the one before the settlement). e0f6177 isolated settlements from analytics but put
    this repair of money on the analytics side: it now competes for 4 connections (not
    the 20 it shared before) with the reads the pool exists to absorb, and gives up after
    10 s instead of queueing."""
    rt = await Runtime.create(
        stores.settings(database_pool_min=1, database_pool_max=4, database_read_pool_max=2),
        background=False,
    )
    try:
        p = await customer(rt, tenant, 10_000)
        check = await rt.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
        snapshot = RedisSnapshot(rt, tenant.name, "r")
        await snapshot.take()
        await settle(rt, p, "r", 300, check.request_token)
        await snapshot.restore()  # Redis lost the settlement's writes
        assert await redis_account(rt, tenant.name) == (10_000, 1_000)
        rt.postgres.read_wait_seconds = 1.0  # production: 10 s; the watch retries every 5 s
        analytics = [
            await rt.postgres.read_pool.acquire(timeout=30)
            for _ in range(rt.postgres.read_pool.get_max_size())
        ]
        try:
            try:
                await asyncio.wait_for(rt.admin.sync_tenant(None), 30)
                error = None
            except BeamError as refused:
                error = refused
        finally:
            for conn in analytics:
                await rt.postgres.read_pool.release(conn)
        assert error is None, f"the resync failed: {error}"
        assert not await streams(rt, p, check.request_token), "a settled hold streamed"
    finally:
        await rt.stop()


# -- 5. a Redis restart during the start-up resync is never resynced ------------------------


# A database of its own: a resync walks every customer of its database, and the session's
# shared one has thousands by now (two resyncs of it outlasted 300 s on a loaded CI machine).
async def test_a_redis_restart_during_the_startup_resync_is_never_resynced(
    stores: Stores, tmp_path: Path
) -> None:
    """Schedule: Check r (token T) -> Finalize r (300 grains) -> the service (every replica)
    starts and finds Redis is not the server last synced against (both came back from a
    node failure): the start-up resync runs over every customer -> after it synced this
    one, Redis restarts again and loses its last second of writes: the Finalize's release
    (r's hold open again, the balance before it) -> the resync goes on with the other
    customers and records the identity it read BEFORE it began -> the watch starts, knows
    no identity yet, and takes the restarted server's as the one it has seen.

    Nothing ever resyncs this customer (until the next process restart): a Deduct on T
    streams on a request the ledger has settled, and Redis's balance is the one before the
    settlement. Breaks *Redis is resynced after losing writes, even when every replica
    restarts with it; holds the ledger has settled are never streamed again*. (Not from
    439fcbe/e0f6177; a longer start-up resync, e.g. stepwise scans of many holds, widens
    the window.)"""
    redis = devservers.RedisServer(tmp_path / "redis", appendfsync="always")
    redis.start()
    try:
        dsn = await fresh_database(stores)
        rt = await Runtime.create(  # migrates the new database (migrate_on_start)
            stores.settings(redis_url=redis.url, database_url=dsn, reaper_interval_seconds=0.2),
            background=False,
        )
        tenant = await provision_tenant(dsn)
        watch: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(50):
                p = await customer(rt, tenant, 10_000)
                check = await rt.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
                snapshot = RedisSnapshot(rt, tenant.name, "r")
                await snapshot.take()
                await settle(rt, p, "r", 300, check.request_token)
                await rt.postgres.set_state("redis_identity", "a server before a node failure")
                account = customer_keys(tenant.name, CUSTOMER)[0]
                restarted = False

                async def restart_after_this_customer(
                    name: str, keys: Sequence[str], *_: Any
                ) -> None:
                    nonlocal restarted
                    if name == SCRIPT_AUDIT_ACCOUNT and not restarted and keys[0] == account:
                        restarted = True  # this customer is synced: its last script
                        await asyncio.to_thread(redis.kill)
                        await asyncio.to_thread(redis.restart)
                        await reconnected(rt)
                        await snapshot.restore()  # the last second of writes is lost

                wrap_run(rt, restart_after_this_customer)
                assert await rt.resync_if_redis_changed()  # the start-up resync
                del rt.redis.run
                assert restarted
                watch = asyncio.create_task(rt.watch_redis(0.2))
                # The watch's resync puts back the settled balance; until it has, wait.
                for _ in range(200):  # 40 s at most
                    if await redis_account(rt, tenant.name) == (9_700, 0):
                        break
                    await asyncio.sleep(0.2)
                assert not await streams(rt, p, check.request_token), "a settled hold streamed"
                assert await redis_account(rt, tenant.name) == (9_700, 0)
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            await rt.stop()
    finally:
        redis.stop()

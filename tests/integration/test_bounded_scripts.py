"""No customer's holds make a long Redis script (issue 18 item 5).

VerifyIntegrity, SyncAll and resyncs sum or list every hold of a customer. In one Lua
script that is one HGET per hold: 10,000 holds (10,000 one-grain Checks) made a 63-87 ms
script that stalled Redis for every tenant. Now a script visits at most
``holds_per_script`` holds: with more, ``scan_holds`` reads them in bounded steps, and the
holds counter (``hseq``, bumped by every script that adds, removes or moves a hold or
changes its amount) tells whether all the steps saw one state. These tests use a small
``holds_per_script`` so a few dozen holds take the stepwise path; bench/bounded_scripts.py
measures another customer's latency under the 10,000-hold load.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from beam.constants import SCRIPT_AUDIT_ACCOUNT, account_key, customer_keys, holds_seq_key
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand
from beam.core.runtime import Runtime
from tests.support.money import CUSTOMER, customer, redis_account, settle
from tests.support.stack import Stores, Tenant, provision_tenant

PER_SCRIPT = 8
HOLDS = 40  # five scripts' worth


@pytest.fixture
def small_steps(runtime: Runtime) -> Runtime:
    runtime.scripts.holds_per_script = PER_SCRIPT
    return runtime


async def open_holds(rt: Runtime, p: Principal, count: int, prefix: str = "r") -> list[str]:
    """``count`` open holds of 1,000 estimated grains each ("cheap": 1 grain per token)."""
    tokens = []
    for i in range(count):
        command = CheckCommand(CUSTOMER, f"{prefix}{i}", 1_000, 1.0, "cheap")
        check = await rt.ledger.check(p, command)
        assert check.approved
        tokens.append(check.request_token)
    return tokens


async def holds_seq(rt: Runtime, tenant: str) -> int:
    return int(await rt.redis.client.get(holds_seq_key(tenant, CUSTOMER)) or 0)


async def test_the_audit_script_does_not_sum_more_holds_than_its_limit(
    small_steps: Runtime, tenant: Tenant
) -> None:
    rt = small_steps
    p = await customer(rt, tenant, 1_000_000)
    await open_holds(rt, p, HOLDS)
    keys = customer_keys(tenant.name, CUSTOMER)
    over = await rt.redis.run(SCRIPT_AUDIT_ACCOUNT, keys, [PER_SCRIPT], idempotent=True)
    assert [int(v) for v in over[4:8]] == [-1, HOLDS, 0, 0]  # not summed: too many holds
    within = await rt.redis.run(SCRIPT_AUDIT_ACCOUNT, keys, [HOLDS], idempotent=True)
    assert int(within[4]) == HOLDS * 1_000


async def test_verify_integrity_sums_many_holds_in_steps_exactly(
    small_steps: Runtime, tenant: Tenant
) -> None:
    rt = small_steps
    p = await customer(rt, tenant, 1_000_000)
    tokens = await open_holds(rt, p, HOLDS)
    # Holds in all three sets: one expiring (retired by a settled id is not needed: a
    # deduct that grows a hold and a settlement in between change amounts and membership).
    await rt.ledger.deduct(p, DeductCommand(CUSTOMER, "r0", tokens[0], 500, "cheap", True, 1))
    await settle(rt, p, "r1", 300, tokens[1])
    (report,) = await rt.admin.verify_integrity(p, CUSTOMER)
    assert (report.problems, report.held_unverified) == ([], False)
    assert report.redis_held == report.open_holds_sum == (HOLDS - 1) * 1_000
    # A drift is still found through the steps.
    await rt.redis.client.hset(account_key(tenant.name, CUSTOMER), "held", 12_345)
    (report,) = await rt.admin.verify_integrity(p, CUSTOMER)
    assert report.problems == [f"redis held 12345 != sum of open holds {(HOLDS - 1) * 1_000}"]


async def test_every_change_of_a_hold_bumps_the_holds_counter_and_nothing_else_does(
    runtime: Runtime, tenant: Tenant
) -> None:
    rt = runtime
    p = await customer(rt, tenant, 1_000_000)
    seq = await holds_seq(rt, tenant.name)
    (token,) = await open_holds(rt, p, 1)  # a hold added
    assert await holds_seq(rt, tenant.name) == seq + 1
    await rt.ledger.deduct(p, DeductCommand(CUSTOMER, "r0", token, 10, "cheap", True, 1))
    assert await holds_seq(rt, tenant.name) == seq + 1  # consumed within it: no change
    await rt.ledger.balance(p, CUSTOMER)
    assert await holds_seq(rt, tenant.name) == seq + 1  # a read
    await rt.ledger.deduct(p, DeductCommand(CUSTOMER, "r0", token, 2_000, "cheap", True, 2))
    grown = await holds_seq(rt, tenant.name)
    assert grown == seq + 2  # the hold grew past its estimate: its amount changed
    await settle(rt, p, "r0", 2_010, token)
    assert await holds_seq(rt, tenant.name) > grown  # moved to settling, then released


async def test_a_scan_that_sees_the_holds_change_is_not_used(
    small_steps: Runtime, tenant: Tenant
) -> None:
    """A Check lands between every two steps of every scan: the audit never pairs `held`
    with a sum of another moment; after its attempts it says so instead of guessing."""
    rt = small_steps
    p = await customer(rt, tenant, 1_000_000)
    await open_holds(rt, p, HOLDS)
    scan = rt.scripts.scan_holds
    opened = 0

    async def busy_scan(tenant_id: str, customer_id: str) -> Any:
        nonlocal opened
        opened += 1
        await open_holds(rt, p, 1, prefix=f"busy{opened}-")
        return await scan(tenant_id, customer_id)

    rt.scripts.scan_holds = busy_scan  # type: ignore[method-assign]
    (report,) = await rt.admin.verify_integrity(p, CUSTOMER)
    assert (report.problems, report.held_unverified, report.open_holds_sum) == ([], True, 0)
    assert opened == 3  # HOLD_SCAN_ATTEMPTS
    del rt.scripts.scan_holds
    (report,) = await rt.admin.verify_integrity(p, CUSTOMER)
    assert (report.held_unverified, report.open_holds_sum) == (False, (HOLDS + 3) * 1_000)


async def test_a_forced_load_rederives_held_from_many_holds_in_steps(
    small_steps: Runtime, tenant: Tenant
) -> None:
    rt = small_steps
    p = await customer(rt, tenant, 1_000_000)
    await open_holds(rt, p, HOLDS)
    await rt.redis.client.hset(account_key(tenant.name, CUSTOMER), "held", 7)  # a lost write
    synced, kept = await rt.admin.sync_tenant(tenant.name)
    assert (synced, kept) == (1, HOLDS)
    assert await redis_account(rt, tenant.name) == (1_000_000, HOLDS * 1_000)


async def test_a_forced_load_whose_holds_change_under_it_scans_again(
    small_steps: Runtime, tenant: Tenant
) -> None:
    """The load script adopts a scanned sum only if no hold changed since the scan; else it
    answers SCAN and the sum is taken again (here: once)."""
    rt = small_steps
    p = await customer(rt, tenant, 1_000_000)
    await open_holds(rt, p, HOLDS)
    await rt.redis.client.hset(account_key(tenant.name, CUSTOMER), "held", 7)
    scan = rt.scripts.scan_holds
    scans = 0

    async def scan_then_check(tenant_id: str, customer_id: str) -> Any:
        nonlocal scans
        scans += 1
        result = await scan(tenant_id, customer_id)
        if scans == 1:  # a Check lands between the first scan and the load
            await rt.redis.client.hset(account_key(tenant.name, CUSTOMER), "held", HOLDS * 1_000)
            await open_holds(rt, p, 1, prefix="late")
            await rt.redis.client.hset(account_key(tenant.name, CUSTOMER), "held", 7)
        return result

    rt.scripts.scan_holds = scan_then_check  # type: ignore[method-assign]
    await rt.ledger.reload_account(tenant.name, CUSTOMER, force=True)
    assert scans == 2
    assert await redis_account(rt, tenant.name) == (1_000_000, (HOLDS + 1) * 1_000)


async def test_a_sync_lists_and_releases_settled_holds_among_many(
    small_steps: Runtime, tenant: Tenant
) -> None:
    """A Redis that lost its last writes brings a settled hold back: the sync finds it
    among more holds than one script lists, and releases it."""
    rt = small_steps
    p = await customer(rt, tenant, 1_000_000)
    tokens = await open_holds(rt, p, HOLDS)
    keys = customer_keys(tenant.name, CUSTOMER, "r5")
    saved = {key: await rt.redis.client.dump(key) for key in (keys[0], keys[1], keys[3])}
    await settle(rt, p, "r5", 400, tokens[5])
    for key, value in saved.items():  # the settlement's Redis writes are lost
        await rt.redis.client.restore(key, 0, value, replace=True)
    listed = await rt.scripts.list_holds(tenant.name, CUSTOMER)
    assert sorted(hold_id for hold_id, *_ in listed) == sorted(f"r{i}" for i in range(HOLDS))
    await rt.admin.sync_tenant(tenant.name)
    listed = await rt.scripts.list_holds(tenant.name, CUSTOMER)
    assert sorted(hold_id for hold_id, *_ in listed) == sorted(
        f"r{i}" for i in range(HOLDS) if i != 5
    )
    assert await redis_account(rt, tenant.name) == (1_000_000 - 400, (HOLDS - 1) * 1_000)


async def test_verify_integrity_runs_one_at_a_time_per_tenant(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Four callers of one tenant looping VerifyIntegrity queue behind each other in a
    process (any role may call it, and it reads every hold of the customers it checks);
    another tenant's is not held up by them."""
    rt = runtime
    assert stores.postgres is not None
    other = await provision_tenant(stores.postgres.dsn)
    p = await customer(rt, tenant, 1_000_000)
    q = await customer(rt, other, 1_000_000)
    running: Counter[str] = Counter()
    most = {tenant.name: 0, other.name: 0, "both": 0}
    audit = rt.scripts.audit_account

    async def slow_audit(tenant_id: str, customer_id: str) -> Any:
        running[tenant_id] += 1
        most[tenant_id] = max(most[tenant_id], running[tenant_id])
        most["both"] = max(most["both"], running.total())
        await asyncio.sleep(0.05)  # every other caller gets to start meanwhile
        try:
            return await audit(tenant_id, customer_id)
        finally:
            running[tenant_id] -= 1

    rt.scripts.audit_account = slow_audit  # type: ignore[method-assign]
    calls = [rt.admin.verify_integrity(p, CUSTOMER) for _ in range(4)]
    calls += [rt.admin.verify_integrity(q, CUSTOMER) for _ in range(2)]
    reports = await asyncio.gather(*calls)
    assert [report.ok for (report,) in reports] == [True] * 6
    assert most == {tenant.name: 1, other.name: 1, "both": 2}

"""Helpers of the money-path tests (tests/integration/test_money_safety.py and
test_audit_findings.py): one customer per test, the ledger's and Redis's view of it, and
faults injected through ``beam.core.faults`` (a cancelled caller, a simulated kill -9)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from beam.constants import SETTLE_REPAIR_GRACE_MS, account_key, customer_keys
from beam.core import faults
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, FinalizeCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from beam.records import Customer, Role
from tests.support.stack import Stores, Tenant

CUSTOMER = "cus"


async def customer(
    rt: Runtime, tenant: Tenant, balance: int, cid: str = CUSTOMER, **config: Any
) -> Principal:
    """A funded customer (``config``: Customer fields such as hold_ttl_seconds); returns an
    admin principal of the tenant."""
    p = Principal(tenant.name, Role.ADMIN, "test", frozenset())
    await rt.admin.create_customer(p, Customer(tenant.name, cid, cid), balance)
    if config:
        stored, _ = await rt.postgres.upsert_customer(Customer(tenant.name, cid, cid, **config))
        await rt.ledger.load_account(stored)
    return p


async def ledger_row(stores: Stores, tenant: str, cid: str = CUSTOMER) -> tuple[int, int, int, int]:
    """(balance, Σ entries, lifetime spent, overage) as PostgreSQL has them."""
    assert stores.postgres is not None
    conn = await asyncpg.connect(stores.postgres.dsn)
    try:
        row = await conn.fetchrow(
            """SELECT c.current_balance_grains AS balance, c.lifetime_spent_grains AS spent,
                      c.overage_grains AS overage,
                      (SELECT COALESCE(SUM(amount_grains), 0) FROM transactions t
                        WHERE t.tenant = c.tenant AND t.customer_id = c.customer_id) AS total
               FROM customers c WHERE tenant = $1 AND customer_id = $2""",
            tenant,
            cid,
        )
    finally:
        await conn.close()
    assert row is not None
    return row["balance"], row["total"], row["spent"], row["overage"]


async def redis_account(rt: Runtime, tenant: str, cid: str = CUSTOMER) -> tuple[int, int]:
    """(balance, held) as Redis has them."""
    balance, held = await rt.redis.client.hmget(account_key(tenant, cid), "balance", "held")
    return int(balance), int(held)


async def assert_consistent(rt: Runtime, p: Principal, cid: str = CUSTOMER) -> None:
    (report,) = await rt.admin.verify_integrity(p, cid)
    assert report.problems == []


async def settle(rt: Runtime, p: Principal, rid: str, cost: int, token: str = "") -> Any:
    return await rt.ledger.finalize(
        p, FinalizeCommand(CUSTOMER, rid, "COMPLETED_SUCCESS", total_actual_cost_grains=cost,
                           request_token=token)
    )  # fmt: skip


async def reap_after_grace(rt: Runtime) -> None:
    faults.advance(SETTLE_REPAIR_GRACE_MS + 1)
    await rt.reaper.run_once()


async def cancelled_at(point: str, call: Any) -> None:
    """Run ``call`` as the caller's task and cancel that task when the money path reaches
    ``point`` (a client deadline or disconnect): the call must answer CancelledError."""
    caller = asyncio.ensure_future(call)

    async def hook(name: str) -> None:
        if name == point:
            caller.cancel()
            await asyncio.sleep(0)

    faults.install(hook)
    try:
        with pytest.raises(asyncio.CancelledError):
            await caller
    finally:
        faults.install(None)


def crash_at(point: str) -> None:
    """The process "dies" at ``point``: nothing after it runs (faults.SimulatedCrash)."""

    async def hook(name: str) -> None:
        if name == point:
            raise faults.SimulatedCrash(point)

    faults.install(hook)


async def reap_after(rt: Runtime, milliseconds: int, passes: int = 2) -> None:
    """The injected clock moves on by ``milliseconds``, then ``passes`` reaper passes."""
    faults.advance(milliseconds)
    for _ in range(passes):
        await rt.reaper.run_once()


class Pause:
    """A fault hook that holds the first call reaching ``point`` (a paused process, a
    commit queued for a connection) until ``resume`` is set; ``reached`` says it got there."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.reached = asyncio.Event()
        self.resume = asyncio.Event()
        faults.install(self._hook)

    async def _hook(self, name: str) -> None:
        if name == self.point and not self.reached.is_set():
            self.reached.set()
            await self.resume.wait()


class RedisSnapshot:
    """The keys of one customer (account, hold sets, one hold, its done marker) as they are
    now; ``restore`` puts exactly that back, as a Redis that lost every later write."""

    def __init__(self, rt: Runtime, tenant: str, request_id: str, cid: str = CUSTOMER) -> None:
        self.rt = rt
        self.keys = customer_keys(tenant, cid, request_id)
        self.dumps: dict[str, bytes | None] = {}

    async def take(self) -> None:
        raw = self.rt.redis.client
        for key in self.keys:
            self.dumps[key] = await raw.execute_command("DUMP", key, NEVER_DECODE=True)

    async def restore(self) -> None:
        raw = self.rt.redis.client
        for key, dump in self.dumps.items():
            await raw.delete(key)
            if dump is not None:
                await raw.execute_command("RESTORE", key, 0, dump, "REPLACE")


async def check_while_ledger_unavailable(rt: Runtime, p: Principal, command: CheckCommand) -> Any:
    """A Check whose settled-id lookup cannot reach PostgreSQL (it proceeds from Redis)."""
    lookup = rt.postgres.settled_nonce

    async def unavailable(*_args: Any) -> Any:
        raise BeamError(Reason.STORE_UNAVAILABLE, "postgresql unavailable: injected")

    rt.postgres.settled_nonce = unavailable  # type: ignore[method-assign]
    try:
        return await rt.ledger.check(p, command)
    finally:
        rt.postgres.settled_nonce = lookup  # type: ignore[method-assign]

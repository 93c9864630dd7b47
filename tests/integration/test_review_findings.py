"""Adversarial review of the money paths (HEAD after 448ee9b): each test is a schedule that
breaks a money invariant (docs/ARCHITECTURE.md, "Invariants") against the real stores.
Each is marked ``xfail(strict=True)`` until the defect it names is fixed.

Faults are injected as tests/integration/test_audit_findings.py does: a failing store call,
a simulated kill -9 at a ``beam.core.faults`` point, a paused task, the injected clock, or
Redis losing its last writes (one customer's keys put back as they were a moment earlier).
Prices: "cheap" costs 1 grain per input token and 2 per output token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from beam.constants import customer_keys, done_key
from beam.core import faults
from beam.core.commands import CheckCommand, DeductCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from tests.support.money import (
    CUSTOMER,
    crash_at,
    customer,
    ledger_row,
    redis_account,
    settle,
)
from tests.support.stack import Stores, Tenant


@pytest.fixture(autouse=True)
def _no_faults() -> Iterator[None]:
    faults.reset()
    yield
    faults.reset()


async def reap_after(rt: Runtime, milliseconds: int, passes: int = 2) -> None:
    faults.advance(milliseconds)
    for _ in range(passes):
        await rt.reaper.run_once()


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


async def check_while_ledger_unavailable(rt: Runtime, p: Any, command: CheckCommand) -> Any:
    """A Check whose settled-id lookup cannot reach PostgreSQL (it proceeds from Redis)."""
    lookup = rt.postgres.settled_nonce

    async def unavailable(*_args: Any) -> Any:
        raise BeamError(Reason.STORE_UNAVAILABLE, "postgresql unavailable: injected")

    rt.postgres.settled_nonce = unavailable  # type: ignore[method-assign]
    try:
        return await rt.ledger.check(p, command)
    finally:
        rt.postgres.settled_nonce = lookup  # type: ignore[method-assign]


# -- 1. a second hold under a settled id, resurrected by lost Redis writes ------------------


@pytest.mark.xfail(
    strict=True,
    reason="finding: resync never releases a resurrected second hold (orphan-charged); "
    "it streams again for free",
)
async def test_a_resurrected_second_hold_under_a_settled_id_streams_for_free(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: Check r (token T1) -> Finalize r with T1, charged 700 -> 24 h later r's
    done marker expires -> Check r while PostgreSQL cannot answer the settled-id lookup
    (hold H2, token T2, 1 000 held) -> Deduct 100 output tokens on T2 (200 consumed) ->
    [Redis state saved] -> Finalize r with T2, 200 reported: H2 is charged on its own
    (entry ``settlement:cus:r#<H2>``, -200), answer REQUEST_ID_CONFLICT, H2 released ->
    Redis restarts and loses those last writes (H2 is open again) -> the replica resyncs
    (``Admin.sync_tenant``, what ``watch_redis`` does) -> the app streams on T2: Deduct 1 000
    more output tokens (2 000 grains) -> H2 expires, reaper.

    Breaks: *a settled request id never buys new tokens* / *holds the ledger has settled
    are released, never streamed again*. ``Admin._release_settled_holds`` only releases a
    hold whose nonce is the one in the ``requests`` row; H2 was settled by its orphan entry,
    which resync does not look for. H2 stays open, the Deduct answers success (2 000 grains
    of tokens delivered), and its expiry is a replay of the orphan entry: nothing more is
    charged. Expected: the Deduct refused (or the 2 000 grains charged): ledger balance
    97 100; actual: Deduct success, ledger balance 99 100 after the reaper."""
    p = await customer(runtime, tenant, 100_000)
    command = CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap")
    first = await runtime.ledger.check(p, command)
    await settle(runtime, p, "r", 700, first.request_token)
    await runtime.redis.client.delete(done_key(tenant.name, CUSTOMER, "r"))
    again = await check_while_ledger_unavailable(runtime, p, command)
    assert again.approved
    deduct = await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", again.request_token, 100, "cheap", True, 1)
    )
    assert (deduct.success, deduct.consumed_grains) == (True, 200)
    snapshot = RedisSnapshot(runtime, tenant.name, "r")
    await snapshot.take()
    with pytest.raises(BeamError) as conflict:
        await settle(runtime, p, "r", 200, again.request_token)
    assert conflict.value.reason is Reason.REQUEST_ID_CONFLICT
    assert (await ledger_row(stores, tenant.name))[0] == 99_100
    await snapshot.restore()  # the last writes are lost
    await runtime.admin.sync_tenant(tenant.name)
    try:
        more = await runtime.ledger.deduct(
            p, DeductCommand(CUSTOMER, "r", again.request_token, 1_000, "cheap", True, 2)
        )
        bought = more.success
    except BeamError:
        bought = False
    await reap_after(runtime, 16 * 60_000)
    balance = (await ledger_row(stores, tenant.name))[0]
    assert not bought or balance == 97_100, (
        f"the resurrected second hold bought 2 000 grains of tokens; ledger balance {balance}"
    )

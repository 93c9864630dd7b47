"""Adversarial audit of the money paths: each test is a schedule that breaks a money
invariant (docs/ARCHITECTURE.md, "Invariants") against the real stores, and fails until
the defect it names is fixed.

Faults are injected the way tests/integration/test_money_safety.py does: cancellation or a
simulated kill -9 at a ``beam.core.faults`` point, a failing store call, or Redis losing
its last writes (the keys of one customer put back as they were a moment earlier, which
is what a restart from an AOF fsynced once a second, or a failover to a lagging replica,
does). Prices: "cheap" costs 1 grain per input token and 2 per output token.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from beam.constants import done_key
from beam.core import faults
from beam.core.commands import CheckCommand, DeductCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from tests.support.money import (
    CUSTOMER,
    RedisSnapshot,
    cancelled_at,
    crash_at,
    customer,
    ledger_row,
    reap_after,
    redis_account,
    settle,
)
from tests.support.stack import Stores, Tenant

# -- 1. a replayed Check voids the live hold it replays ------------------------------------


async def test_a_cancelled_check_retry_voids_the_streaming_hold_and_its_tokens_go_free(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: Check r (approved, token T) -> Deduct 400 output tokens (800 grains
    consumed, acknowledged) -> the app retries the same Check (a lost reply, a proxy retry),
    and that retry is cancelled at ``check.opened`` (client deadline) -> the stream ends,
    nobody finalizes, the hold expires and the reaper runs.

    Breaks: *no acknowledged money lost* / *a request never gets tokens for free*. The
    replayed Check's clean-up (``Ledger._refuse_settled_id``, ``except BaseException``)
    voids the hold by its nonce, but a replay's nonce is the ORIGINAL hold's: the hold that
    T streams on is dropped with its 800 consumed grains, which are never charged."""
    p = await customer(runtime, tenant, 10_000)
    command = CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap")
    check = await runtime.ledger.check(p, command)
    deduct = await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", check.request_token, 400, "cheap", True, 1)
    )
    assert (deduct.success, deduct.consumed_grains) == (True, 800)
    await cancelled_at(faults.CHECK_OPENED, runtime.ledger.check(p, command))
    await reap_after(runtime, 16 * 60_000)
    assert await ledger_row(stores, tenant.name) == (9_200, 9_200, 800, 0)


async def test_a_check_retry_after_a_ledger_outage_voids_the_second_hold_uncharged(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: Check r -> Finalize r (700) -> 24 h later the done marker expires -> Check
    r again while PostgreSQL cannot answer the settled-id lookup (the Check proceeds from
    Redis: hold H2, token T2) -> Deduct 400 output tokens on T2 (800 consumed) -> PostgreSQL
    is back and the app retries that Check (same parameters) -> the hold expires, reaper.

    Breaks: *a settled request id never buys new tokens* (ARCHITECTURE: "whatever its new
    hold consumes is charged on its own when it settles"). The retry replays H2, the lookup
    now finds the id settled by another nonce, and ``_refuse_settled_id`` voids H2 with its
    800 consumed grains: they are never charged."""
    p = await customer(runtime, tenant, 100_000)
    command = CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap")
    first = await runtime.ledger.check(p, command)
    await settle(runtime, p, "r", 700, first.request_token)
    await runtime.redis.client.delete(done_key(tenant.name, CUSTOMER, "r"))

    lookup = runtime.postgres.settled_nonce

    async def unavailable(*_args: Any) -> Any:
        raise BeamError(Reason.STORE_UNAVAILABLE, "postgresql unavailable: injected")

    runtime.postgres.settled_nonce = unavailable  # type: ignore[method-assign]
    try:
        again = await runtime.ledger.check(p, command)
    finally:
        runtime.postgres.settled_nonce = lookup  # type: ignore[method-assign]
    assert again.approved
    deduct = await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", again.request_token, 400, "cheap", True, 1)
    )
    assert (deduct.success, deduct.consumed_grains) == (True, 800)
    with pytest.raises(BeamError) as conflict:
        await runtime.ledger.check(p, command)
    assert conflict.value.reason is Reason.REQUEST_ID_CONFLICT
    await reap_after(runtime, 16 * 60_000)
    # 700 for the first hold and 800 for what the second one delivered.
    assert await ledger_row(stores, tenant.name) == (98_500, 98_500, 1_500, 0)


async def test_a_cancelled_check_voids_the_hold_a_concurrent_duplicate_check_handed_out(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule (two replicas, or a client that sends its Check twice): Check A opens hold
    H for r and waits at ``check.opened`` for the settled-id lookup -> the duplicate Check
    B (same parameters) replays H, its lookup answers, and it returns H's token -> the app
    streams on it: Deduct 400 output tokens (800 consumed) -> A's caller gives up (deadline):
    A is cancelled -> nobody finalizes; H expires, reaper.

    Breaks: *no acknowledged money lost*. A's clean-up voids H because A opened it, though
    B already handed H's token out; the 800 grains H consumed are never charged (so a fix
    cannot just skip the void for replayed Checks: the first Check's void is as wrong once
    any replay has answered)."""
    p = await customer(runtime, tenant, 10_000)
    command = CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap")
    a_waiting, a_resume = asyncio.Event(), asyncio.Event()
    calls = 0

    async def hook(name: str) -> None:
        nonlocal calls
        if name == faults.CHECK_OPENED:
            calls += 1
            if calls == 1:
                a_waiting.set()
                await a_resume.wait()

    faults.install(hook)
    a = asyncio.ensure_future(runtime.ledger.check(p, command))
    await a_waiting.wait()
    b = await runtime.ledger.check(p, command)
    assert (b.approved, b.replayed) == (True, True)
    deduct = await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", b.request_token, 400, "cheap", True, 1)
    )
    assert (deduct.success, deduct.consumed_grains) == (True, 800)
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    faults.install(None)
    await reap_after(runtime, 16 * 60_000)
    assert await ledger_row(stores, tenant.name) == (9_200, 9_200, 800, 0)


# -- 2. Redis losing its last writes resurrects a settled hold -----------------------------


async def test_a_settled_hold_resurrected_by_lost_redis_writes_buys_free_tokens(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: Check r -> Deduct 100 output tokens -> Finalize r (charged 700,
    acknowledged) -> Redis restarts and loses the last second of writes (begin_settlement
    and settle_hold of that Finalize) -> the replica sees the restart and resyncs every
    account from the ledger (``Admin.sync_tenant``) -> the app keeps streaming on r's token:
    Deduct 1 000 more output tokens -> the hold expires, reaper.

    Breaks: *a settled request id never settles again and never buys new tokens*. The
    resync adopts the ledger's balance but keeps every hold Redis has, including one whose
    settlement (same nonce) is in the ledger; the hold is open again, Deduct charges 2 000
    grains to it and answers success, and the expiry is a replay of the settlement: those
    tokens are never charged."""
    p = await customer(runtime, tenant, 100_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", check.request_token, 100, "cheap", True, 1)
    )
    snapshot = RedisSnapshot(runtime, tenant.name, "r")
    await snapshot.take()
    final = await settle(runtime, p, "r", 700, check.request_token)
    assert (final.charged_grains, final.final_balance) == (700, 99_300)
    await snapshot.restore()  # the last writes are lost
    await runtime.admin.sync_tenant(tenant.name)  # what watch_redis does after a restart
    try:
        more = await runtime.ledger.deduct(
            p, DeductCommand(CUSTOMER, "r", check.request_token, 1_000, "cheap", True, 2)
        )
        bought = more.success
    except BeamError:
        bought = False
    assert not bought, "a settled request bought 1 000 more tokens"


# -- 3. a kill -9 after a second hold's own charge committed -------------------------------


async def test_killed_finalize_of_a_second_hold_leaves_redis_above_the_ledger(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: Check r -> Finalize r (700) -> the done marker expires -> Check r while the
    settled-id lookup is unavailable (hold H2) -> Finalize r with H2's token, charged 3 000
    (no Deducts: consumed 0), and the process is killed at ``finalize.committed`` (the
    orphan entry ``settlement:cus:r#<H2>`` of -3 000 is committed) -> the reaper runs after
    H2's deadline, twice.

    Breaks: *Redis is never ahead of the ledger* / *Redis balance = PostgreSQL's*
    (verify_integrity). ``Ledger._committed`` only recognises the request row's nonce, so
    the reaper abandons H2 (shrinking it to its 0 consumed) instead of completing it from
    the committed orphan entry; the expiry of 0 grains writes no entry and adopts nothing.
    Redis keeps the balance before the 3 000 charge for good: 3 000 grains spendable twice."""
    p = await customer(runtime, tenant, 100_000)
    command = CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap")
    first = await runtime.ledger.check(p, command)
    await settle(runtime, p, "r", 700, first.request_token)
    await runtime.redis.client.delete(done_key(tenant.name, CUSTOMER, "r"))
    lookup = runtime.postgres.settled_nonce

    async def unavailable(*_args: Any) -> Any:
        raise BeamError(Reason.STORE_UNAVAILABLE, "postgresql unavailable: injected")

    runtime.postgres.settled_nonce = unavailable  # type: ignore[method-assign]
    try:
        again = await runtime.ledger.check(p, command)
    finally:
        runtime.postgres.settled_nonce = lookup  # type: ignore[method-assign]
    crash_at(faults.FINALIZE_COMMITTED)
    with pytest.raises(faults.SimulatedCrash):
        await settle(runtime, p, "r", 3_000, again.request_token)
    faults.install(None)
    assert (await ledger_row(stores, tenant.name))[0] == 96_300  # the orphan committed
    await reap_after(runtime, 16 * 60_000, passes=3)
    ledger_balance = (await ledger_row(stores, tenant.name))[0]
    redis_balance, held = await redis_account(runtime, tenant.name)
    assert redis_balance - held <= ledger_balance, (
        f"redis available {redis_balance - held} > ledger balance {ledger_balance}"
    )


# -- 4. a Finalize cancelled after its reservation, before its commit ----------------------


async def test_a_finalize_cancelled_after_begin_settlement_loses_the_reported_charge(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: Check r (1 000) -> Finalize r reporting 3 000 grains; the caller's deadline
    fires at ``finalize.begun`` (the hold is already settling and grown to 3 000) -> the app
    does not retry (ARCHITECTURE, failure modes: "a call cancelled ... a settlement already
    started runs to the end; recovery: none needed") -> the hold's deadline passes, reaper.

    Breaks: *every settlement in PostgreSQL exactly once* / *no money lost*: only the
    commit and release run in ``Ledger.finish``; the await between ``begin_settlement`` and
    it is unshielded, so the started settlement is dropped, abandoned at its deadline and
    charged only what the stream consumed (0) instead of the 3 000 reported."""
    p = await customer(runtime, tenant, 10_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    await cancelled_at(faults.FINALIZE_BEGUN, settle(runtime, p, "r", 3_000, check.request_token))
    await runtime.ledger.drain(5)
    await reap_after(runtime, 16 * 60_000, passes=3)
    assert await ledger_row(stores, tenant.name) == (7_000, 7_000, 3_000, 0)


# -- 5. group commit: an item submitted as the last flusher exits is never sent ------------


async def test_a_settlement_submitted_while_the_last_flusher_exits_is_never_committed() -> None:
    """Schedule (the settlement Batcher of PostgresStore, max_in_flight 1, i.e. a pool of
    at most 7 connections): batch 1 is in flight; the reaper (or any task) becomes ready in
    the same loop iteration as batch 1's flusher; the flusher settles batch 1, finds nothing
    pending and returns; before its done-callback removes it from ``_flushers`` the reaper
    submits its expiry -> ``submit`` sees max_in_flight flushers and starts none.

    Breaks: *every acknowledged settlement in PostgreSQL* / liveness of the reaper: the item
    sits in ``_pending`` with no flusher until some later submit happens (on an idle replica:
    never); its caller (shielded) waits forever, and a reaper pass that submitted it never
    ends, so no tenant's holds are reaped by that replica."""
    from beam.adapters.batching import Batcher

    gate = asyncio.Event()
    sent: list[list[str]] = []

    async def run_batch(items: Any) -> list[str]:
        sent.append(list(items))
        await gate.wait()  # the PostgreSQL round trip of batch 1
        return [f"ok:{i}" for i in items]

    batcher: Batcher[str, str] = Batcher(run_batch, max_items=64, max_in_flight=1)
    first = asyncio.ensure_future(batcher.submit("batch-1"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the flusher is now waiting for batch 1's round trip

    async def reaper() -> str:
        await gate.wait()  # ready in the same iteration as the flusher
        return await batcher.submit("expiry")

    second = asyncio.ensure_future(reaper())
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.wait_for(first, 1) == "ok:batch-1"
    try:
        result = await asyncio.wait_for(second, 2)
    except TimeoutError:
        result = "never sent"
    assert result == "ok:expiry", f"{result}; batches sent: {sent}"

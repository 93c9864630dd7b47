"""Adversarial review of the changes of 2c809f7..79e0746 (issue 23: refused credit/debit
retries adopt what their id committed; a Finalize through a claim with a token charges a
second hold on its own; issue 16: shortening Checks, reserve-ahead Deducts): each test is a
schedule that breaks a money invariant (docs/ARCHITECTURE.md, "Invariants") against the
real stores. Both are fixed: a claim remembers the token it settles for (begin_settlement.lua); only
that token takes it over (another Finalize is told to retry: STORE_UNAVAILABLE), and the
reaper looks for that token's own entry before releasing it (Ledger.complete_settling).
Fixtures and style as tests/integration/test_review_findings_2.py.
Prices: "cheap" costs 1 grain per input token and 2 per output token.
"""

from __future__ import annotations

import asyncio

import pytest

from beam.constants import SETTLE_REPAIR_GRACE_MS
from beam.core import faults
from beam.core.commands import CheckCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from tests.support.money import (
    CUSTOMER,
    RedisSnapshot,
    customer,
    ledger_row,
    redis_account,
    settle,
)
from tests.support.stack import Stores, Tenant


async def test_another_replicas_reaper_releases_a_token_claim_before_its_commit(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: hold A of r (token TA) is lost by Redis (older snapshot); r is checked
    again (hold B, TB) and settled by TB's Finalize (300). A Finalize with TA reporting
    1 000 on replica 1: begin_settlement creates a claim reserving 1 000 (new today: the
    token names another hold than the done marker's) and the commit waits (a pool
    connection, a paused process) past the 2 s repair grace -> the reaper of replica 2
    (settling_here is per process) reads the ledger: r has a settlement (B's) and the hold
    is a claim, so ``_committed`` says "completed" and the claim is released (held 1 000 ->
    0) -> replica 1's commit lands: ``settlement:cus:r#<A>`` charges 1 000 (charge_other_hold
    is on for a claim with a token since 0f535a1) -> replica 1 dies before its Redis half.

    Breaks: *Redis is never ahead of the ledger*: the ledger has 8 700, Redis offers 9 700
    with nothing held, and no settling hold is left for any reaper to repair it from.
    Expected: a claim whose token names another hold than the settlement's counts as
    committed only once its own second-hold entry exists (the reaper needs the token's
    nonce: keep it in the claim's hash and look for settlement:<c>:<r>#<token nonce>)."""
    p = await customer(runtime, tenant, 10_000)
    snapshot = RedisSnapshot(runtime, tenant.name, "r")
    await snapshot.take()
    first = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
    await snapshot.restore()  # hold A is gone
    second = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
    await settle(runtime, p, "r", 300, second.request_token)
    assert await redis_account(runtime, tenant.name) == (9_700, 0)

    replica = await Runtime.create(stores.settings(), background=False)
    try:
        paused, resume = asyncio.Event(), asyncio.Event()

        async def hook(name: str) -> None:
            if name == faults.FINALIZE_BEGUN:
                paused.set()
                await resume.wait()
            elif name == faults.FINALIZE_COMMITTED:
                raise faults.SimulatedCrash(name)

        faults.install(hook)
        finalize = asyncio.ensure_future(settle(replica, p, "r", 1_000, first.request_token))
        await paused.wait()
        assert await redis_account(runtime, tenant.name) == (9_700, 1_000)  # the claim
        faults.advance(SETTLE_REPAIR_GRACE_MS + 1)
        await runtime.reaper.run_once()  # another replica's reaper
        held_while_committing = (await redis_account(runtime, tenant.name))[1]
        resume.set()
        with pytest.raises(faults.SimulatedCrash):
            await finalize  # committed, "died" before its Redis half
        faults.install(None)
    finally:
        await replica.stop()
    faults.advance(SETTLE_REPAIR_GRACE_MS + 1)
    for _ in range(3):
        await runtime.reaper.run_once()
    ledger_balance = (await ledger_row(stores, tenant.name))[0]
    assert ledger_balance == 8_700  # 300 for B, 1 000 for A on its own
    balance, held = await redis_account(runtime, tenant.name)
    assert balance - held <= ledger_balance, "Redis offers the 1 000 grains the ledger spent"
    assert held_while_committing == 1_000, "the claim was released before its commit"


async def test_a_tokenless_finalize_releases_a_token_claims_reservation_before_its_commit(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: hold A of r (token TA) is lost by Redis; r is checked again (hold B) and
    settled by TB's Finalize (300). Finalize F1 with TA reporting 1 000 creates a claim
    (attempt 1, 1 000 held) and waits before its commit -> a Finalize F2 of r *without* a
    token (a retry of B's, or any tokenless caller) finds a hold under r (the claim), so the
    done marker is not consulted: it takes the claim over (attempt 2), commits (r is settled
    by B: OTHER_HOLD, and a tokenless claim charges nothing) and releases the claim with
    attempt 2 (held 1 000 -> 0), answering B's settlement -> F1 commits
    ``settlement:cus:r#<A>`` (1 000, its own entry, new since 0f535a1) and dies before its
    Redis half; settle_hold's max_attempt only protects a newer attempt from an older one.

    Breaks: *Redis is never ahead of the ledger*: ledger 8 700, Redis 9 700 with nothing
    held and nothing left settling. Expected: F1's charge stays reserved until it commits
    or is fenced (e.g. a tokenless Finalize answers from the done marker / ledger instead of
    taking over a claim that carries a token, or the claim records its token nonce and a
    takeover keeps reserving until that second-hold entry is in the ledger)."""
    p = await customer(runtime, tenant, 10_000)
    snapshot = RedisSnapshot(runtime, tenant.name, "r")
    await snapshot.take()
    first = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
    await snapshot.restore()  # hold A is gone
    second = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
    await settle(runtime, p, "r", 300, second.request_token)
    assert await redis_account(runtime, tenant.name) == (9_700, 0)

    paused, resume = asyncio.Event(), asyncio.Event()
    begun = 0

    async def hook(name: str) -> None:
        nonlocal begun
        if name == faults.FINALIZE_BEGUN:
            begun += 1
            if begun == 1:
                paused.set()
                await resume.wait()
        elif name == faults.FINALIZE_COMMITTED and resume.is_set():
            raise faults.SimulatedCrash(name)

    faults.install(hook)
    f1 = asyncio.ensure_future(settle(runtime, p, "r", 1_000, first.request_token))
    await paused.wait()
    assert await redis_account(runtime, tenant.name) == (9_700, 1_000)  # F1's claim
    with pytest.raises(BeamError) as busy:  # no token: it may not take F1's claim over
        await settle(runtime, p, "r", 300)
    assert busy.value.reason is Reason.STORE_UNAVAILABLE  # retryable
    held_while_f1_commits = (await redis_account(runtime, tenant.name))[1]
    resume.set()
    with pytest.raises(faults.SimulatedCrash):
        await f1  # committed A's 1 000 on its own, "died" before its Redis half
    faults.install(None)
    faults.advance(SETTLE_REPAIR_GRACE_MS + 1)
    for _ in range(3):
        await runtime.reaper.run_once()
    ledger_balance = (await ledger_row(stores, tenant.name))[0]
    assert ledger_balance == 8_700
    balance, held = await redis_account(runtime, tenant.name)
    assert balance - held <= ledger_balance, "Redis offers the 1 000 grains the ledger spent"
    assert held_while_f1_commits == 1_000, "F2 released F1's reservation before F1 committed"
    assert await redis_account(runtime, tenant.name) == (8_700, 0)
    f2 = await settle(runtime, p, "r", 300)  # F2's retry, once F1's claim is done
    assert (f2.charged_grains, f2.replayed) == (300, True)

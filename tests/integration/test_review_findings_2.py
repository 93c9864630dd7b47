"""Adversarial review (HEAD c7c9f49) of the settle fences, the per-customer admission bound
and the late-finalize paths: each test is a schedule that breaks a money invariant
(docs/ARCHITECTURE.md, "Invariants") against the real stores; fixed: a settlement attempt
releases a hold only if no newer attempt has taken it over (settle_hold's max_attempt).
Fixtures and style as tests/integration/test_review_findings.py.
Prices: "cheap" costs 1 grain per input token and 2 per output token.
"""

from __future__ import annotations

import asyncio

import pytest

from beam.core import faults
from beam.core.commands import CheckCommand
from beam.core.runtime import Runtime
from tests.support.money import CUSTOMER, customer, ledger_row, redis_account, settle
from tests.support.stack import Stores, Tenant


async def test_a_fenced_attempt_releases_the_newer_attempts_reservation(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: Check r (1 000 held, token T) -> Finalize F1 with T reporting nothing
    (cost 0) begins (attempt 1) and pauses before its commit -> past the deadline the
    reaper fences attempt 1 and abandons the hold (expiring, 0 consumed) -> next pass
    records the expiry (charged 0, hold_nonce = the hold's nonce) and pauses before its
    release -> Finalize F2 with T reporting 600 takes the expiring hold over (attempt 2,
    600 held) and pauses before its commit -> the reaper's release skips the hold (no longer
    expiring: correct) -> F1 resumes: ``beam_settle_one`` finds attempt 1 fenced but lets it
    through because a ``requests`` row with its hold nonce exists (the expiry), answers the
    expired settlement, ``Ledger._adjust_expired`` sees delta 0 and calls ``release`` with
    the hold's nonce: settle_hold.lua checks only the nonce, not the attempt, and drops the
    hold F2 is settling (held 600 -> 0) -> F2 commits its adjustment (-600) and its process
    dies before the Redis half -> reaper passes: the hold is gone, nothing adopts.

    Breaks: *Redis never offers money the ledger spent*: ledger 9 400, Redis 10 000 with
    nothing held. Expected: F1 leaves the newer attempt's hold alone (release keyed by
    attempt, or the fence bypass not reaching ``_adjust_expired``'s release)."""
    p = await customer(runtime, tenant, 10_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    f1_paused, f1_resume = asyncio.Event(), asyncio.Event()
    f2_paused, f2_resume = asyncio.Event(), asyncio.Event()
    reaper_paused, reaper_resume = asyncio.Event(), asyncio.Event()
    begun = 0
    pause_reaper = False
    crash_f2 = False

    async def hook(name: str) -> None:
        nonlocal begun
        if name == faults.FINALIZE_BEGUN:
            begun += 1
            if begun == 1:
                f1_paused.set()
                await f1_resume.wait()
            elif begun == 2:
                f2_paused.set()
                await f2_resume.wait()
        elif name == faults.REAPER_COMMITTED and pause_reaper:
            reaper_paused.set()
            await reaper_resume.wait()
        elif name == faults.ADJUST_COMMITTED and crash_f2:
            raise faults.SimulatedCrash(name)

    faults.install(hook)
    f1 = asyncio.ensure_future(settle(runtime, p, "r", 0, check.request_token))
    await f1_paused.wait()
    assert await redis_account(runtime, tenant.name) == (10_000, 1_000)
    faults.advance(16 * 60_000)
    await runtime.reaper.run_once()  # fences attempt 1, abandons the hold
    assert await redis_account(runtime, tenant.name) == (10_000, 0)
    pause_reaper = True
    reaper = asyncio.ensure_future(runtime.reaper.run_once())  # records the expiry
    await reaper_paused.wait()
    f2 = asyncio.ensure_future(settle(runtime, p, "r", 600, check.request_token))
    await f2_paused.wait()
    assert await redis_account(runtime, tenant.name) == (10_000, 600)  # attempt 2 reserves
    reaper_resume.set()
    await reaper
    assert await redis_account(runtime, tenant.name) == (10_000, 600)  # left to F2
    f1_resume.set()
    await f1  # the stale attempt answers (replayed expiry, delta 0)
    held_after_f1 = (await redis_account(runtime, tenant.name))[1]
    crash_f2 = True
    f2_resume.set()
    with pytest.raises(faults.SimulatedCrash):
        await f2  # committed the adjustment, "died" before the Redis half
    crash_f2 = False
    faults.advance(5_000)
    for _ in range(3):
        await runtime.reaper.run_once()
    ledger_balance = (await ledger_row(stores, tenant.name))[0]
    assert ledger_balance == 9_400
    balance, held = await redis_account(runtime, tenant.name)
    assert balance - held <= ledger_balance, "Redis offers the 600 grains the ledger spent"
    assert held_after_f1 == 600, "F1 dropped the hold attempt 2 was settling"

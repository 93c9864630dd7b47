"""Adversarial review of the money paths (HEAD after 448ee9b): each test is a schedule that
breaks a money invariant (docs/ARCHITECTURE.md, "Invariants") against the real stores.
Each was a strict xfail until the defect it names was fixed; the docstrings describe the
defect as found, the assertions what must hold now.

Faults are injected as tests/integration/test_audit_findings.py does: a failing store call,
a simulated kill -9 at a ``beam.core.faults`` point, a paused task, the injected clock, or
Redis losing its last writes (one customer's keys put back as they were a moment earlier).
Prices: "cheap" costs 1 grain per input token and 2 per output token.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from beam.constants import (
    MAX_GRAINS,
    MAX_SETTLEMENTS_IN_FLIGHT_PER_CUSTOMER,
    done_key,
)
from beam.core import faults
from beam.core.commands import CheckCommand, DeductCommand, LedgerCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from beam.records import Customer
from tests.support.money import (
    CUSTOMER,
    Pause,
    RedisSnapshot,
    check_while_ledger_unavailable,
    customer,
    ledger_row,
    reap_after,
    redis_account,
    settle,
)
from tests.support.stack import Stores, Tenant

# -- 1. a second hold under a settled id, resurrected by lost Redis writes ------------------


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


# -- 2. a commit that lands after the reaper abandoned its hold ----------------------------


async def test_a_commit_landing_after_its_hold_was_abandoned_leaves_redis_above_the_ledger(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: Finalize r with no hold (never checked, or its hold lost), 3 000 reported:
    ``begin_settlement`` makes a claim reserving 3 000 -> the commit is delayed past the
    claim's deadline (2 min: the process paused, or the settlement queued behind a slow
    pool; neither ``Batcher`` nor ``pool.acquire`` bounds that wait) -> the reaper (any
    replica) finds nothing in the ledger and abandons the claim: released, ``available``
    back to 10 000 -> the delayed commit lands (``settlement:cus:r``, -3 000) and the
    process is killed at ``finalize.committed`` -> the reaper runs three more passes.

    Breaks: *Redis is never ahead of the ledger*. Nothing reserves the committed charge any
    more (its claim was abandoned) and nothing is left settling for the reaper to complete,
    so Redis keeps balance 10 000 / held 0 while the ledger says 7 000: 3 000 grains are
    offered twice until some later movement of this customer happens to adopt a newer
    version. Expected: Redis available <= 7 000; actual: 10 000.
    (A single kill -9 is enough once the commit outlives the deadline: the deadline is
    a guess about commit latency, not a fence.)"""
    # Fixed (migrations/0006_settle_fences.sql): the reaper fences the claim in PostgreSQL,
    # under the customer row lock, before abandoning it; the delayed commit is refused.
    p = await customer(runtime, tenant, 10_000)
    pause = Pause(faults.FINALIZE_BEGUN)
    finalize = asyncio.ensure_future(settle(runtime, p, "r", 3_000))
    await pause.reached.wait()
    assert await redis_account(runtime, tenant.name) == (10_000, 3_000)
    await reap_after(runtime, 120_000 + 1, passes=1)  # abandons the claim
    assert await redis_account(runtime, tenant.name) == (10_000, 0)
    pause.resume.set()
    with pytest.raises(BeamError) as fenced:
        await finalize
    assert fenced.value.reason is Reason.STORE_UNAVAILABLE  # retryable: nothing was written
    faults.install(None)
    assert (await ledger_row(stores, tenant.name))[0] == 10_000
    await reap_after(runtime, 5_000, passes=3)
    assert await redis_account(runtime, tenant.name) == (10_000, 0)
    retry = await settle(runtime, p, "r", 3_000)  # the caller's retry: a new claim
    assert (retry.charged_grains, retry.final_balance, retry.replayed) == (3_000, 7_000, False)
    assert await redis_account(runtime, tenant.name) == (7_000, 0)
    assert (await ledger_row(stores, tenant.name))[:2] == (7_000, 7_000)


async def test_an_abandoned_hold_refuses_its_old_attempt_and_settles_a_new_one(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """A request hold (not a claim) keeps its nonce when abandoned (its token stays
    valid), so the fence counts attempts: Check r (1 000 held, token T) -> Finalize r with T
    and 600 pauses before its commit (attempt 1) -> the hold's deadline passes (its TTL,
    15 min) and the reaper fences attempt 1 and abandons the hold (back to expiring, 0
    consumed) -> the paused commit is refused -> the caller's retry with T takes the hold
    over (attempt 2), commits and settles: charged 600, balance 9 400, Redis equal."""
    p = await customer(runtime, tenant, 10_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    pause = Pause(faults.FINALIZE_BEGUN)
    first = asyncio.ensure_future(settle(runtime, p, "r", 600, check.request_token))
    await pause.reached.wait()
    assert await redis_account(runtime, tenant.name) == (10_000, 1_000)
    await reap_after(runtime, 16 * 60_000, passes=1)  # fences attempt 1, abandons the hold
    assert await redis_account(runtime, tenant.name) == (10_000, 0)  # expiring, 0 consumed
    pause.resume.set()
    with pytest.raises(BeamError) as fenced:
        await first
    assert fenced.value.reason is Reason.STORE_UNAVAILABLE
    assert (await ledger_row(stores, tenant.name))[0] == 10_000
    retry = await settle(runtime, p, "r", 600, check.request_token)
    assert (retry.charged_grains, retry.final_balance, retry.replayed) == (600, 9_400, False)
    assert await redis_account(runtime, tenant.name) == (9_400, 0)
    await reap_after(runtime, 5_000, passes=2)  # nothing left to expire or complete
    assert await redis_account(runtime, tenant.name) == (9_400, 0)
    assert (await ledger_row(stores, tenant.name))[:2] == (9_400, 9_400)


async def test_a_debit_committing_after_its_hold_was_abandoned_is_refused(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """The same fence for a debit: DebitBalance 4 000 opens its hold and pauses before the
    commit -> past the hold's deadline (2 min) the reaper fences and releases it -> the
    commit is refused (nothing debited, Redis and the ledger at 10 000) -> the retry
    debits once: 6 000 in both."""
    p = await customer(runtime, tenant, 10_000)
    pause = Pause(faults.DEBIT_OPENED)
    command = LedgerCommand(CUSTOMER, 4_000, "fee", "fee-1")
    first = asyncio.ensure_future(runtime.admin.debit(p, command))
    await pause.reached.wait()
    assert await redis_account(runtime, tenant.name) == (10_000, 4_000)
    await reap_after(runtime, 120_000 + 1, passes=1)
    assert await redis_account(runtime, tenant.name) == (10_000, 0)
    pause.resume.set()
    with pytest.raises(BeamError) as fenced:
        await first
    assert fenced.value.reason is Reason.STORE_UNAVAILABLE
    assert (await ledger_row(stores, tenant.name))[0] == 10_000
    retry = await runtime.admin.debit(p, command)
    assert (retry.balance, retry.replayed) == (6_000, False)
    assert await redis_account(runtime, tenant.name) == (6_000, 0)
    assert (await ledger_row(stores, tenant.name))[:2] == (6_000, 6_000)


# -- 3. held past 2^53 in begin_settlement: Lua doubles round it -------------------------


async def test_a_maximal_charge_makes_held_inexact_and_wedges_another_hold(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: customer with 100 000 -> Check r2, estimate 50 002 at multiplier 1.0 (hold
    50 002) -> Finalize x with no hold and ``total_actual_cost_grains`` = 2^53-1 (in range:
    validate_finalize allows up to MAX_GRAINS) -> Finalize r2 with its token, nothing used.

    Breaks: *derivable balances* (``held`` = sum of holds) and *bad input never causes a
    500*. ``begin_settlement.lua`` writes ``held + reserve - amount`` = 50 002 + 2^53-1 =
    2^53 + 50 001, which a Lua double cannot hold: it rounds to 2^53 + 50 000, and the
    release of x leaves held 50 001 while the only hold is 50 002 (Redis offers one grain
    the holds do not allow). Releasing r2 then computes held -1 and trips
    ``BEAM_INVARIANT held < 0 after release``: the Finalize of r2, already committed in
    PostgreSQL, answers a raw redis ResponseError (INTERNAL), every retry and every reaper
    pass fails the same way, and r2 stays settling for good. Expected: integrity clean and
    r2 settled; actual: 'redis held 50001 != sum of open holds 50002', ResponseError.
    (No bound keeps held + reserve <= 2^53-1: open_hold and deduct assert held <= balance,
    begin_settlement asserts nothing.)"""
    p = await customer(runtime, tenant, 100_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r2", 50_002, 1.0, "cheap"))
    assert check.reserved_grains == 50_002
    # Fixed: a charge that would take `held` past 2^53-1 is refused before anything is
    # reserved or written (OUT_OF_RANGE), never rounded.
    with pytest.raises(BeamError) as refused:
        await settle(runtime, p, "x", MAX_GRAINS)
    assert refused.value.reason is Reason.OUT_OF_RANGE
    assert await redis_account(runtime, tenant.name) == (100_000, 50_002)
    (report,) = await runtime.admin.verify_integrity(p, CUSTOMER)
    assert list(report.problems) == []
    # The largest charge that keeps `held` exact is still taken (no hold: a claim).
    final = await settle(runtime, p, "x", MAX_GRAINS - 50_002)
    assert final.charged_grains == MAX_GRAINS - 50_002
    r2 = await settle(runtime, p, "r2", 0, check.request_token)
    assert (r2.charged_grains, r2.refunded_grains) == (0, 50_002)
    (report,) = await runtime.admin.verify_integrity(p, CUSTOMER)
    assert list(report.problems) == []
    assert (await ledger_row(stores, tenant.name))[0] == 100_000 - (MAX_GRAINS - 50_002)


# -- 4. SyncAll releases the hold a late Finalize is still reserving -----------------------


async def test_sync_releases_the_reservation_of_a_late_finalize_in_flight(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: Check r (1 000) -> Deduct 100 output tokens (200 consumed) -> the hold
    expires -> a reaper pass commits r's expiry (200) and, before it releases the hold, a
    late Finalize r with T and 3 000 reported takes the hold over (``begin_settlement``:
    settling, 3 000 reserved; the reaper's release is then skipped, ``only_status``) ->
    while that Finalize waits for PostgreSQL, an admin calls SyncAll (or a replica resyncs
    after a Redis restart) -> the Finalize commits its adjustment (-2 800) and the process
    is killed at ``adjust.committed`` -> the reaper runs three more passes.

    Breaks: *Redis is never ahead of the ledger*. ``Admin._release_settled_holds`` releases
    every request hold whose nonce is the settled one, whatever its status: here a hold in
    ``settling`` that is reserving the adjustment being committed. After the kill nothing is
    settling, so the reaper has nothing to complete: Redis keeps balance 9 800 / held 0
    while the ledger says 7 000. Expected: Redis available <= 7 000; actual 9 800. (Without
    the kill, the 2 800 are offered between SyncAll and the commit: a Check approved then
    overspends into overage.)"""
    p = await customer(runtime, tenant, 10_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", check.request_token, 100, "cheap", True, 1)
    )
    faults.advance(16 * 60_000)
    finalize: asyncio.Future[Any] | None = None
    begun, resume = asyncio.Event(), asyncio.Event()

    async def hook(name: str) -> None:
        nonlocal finalize
        if name == faults.REAPER_COMMITTED and finalize is None:
            finalize = asyncio.ensure_future(settle(runtime, p, "r", 3_000, check.request_token))
            await begun.wait()  # the Finalize took the hold over
        elif name == faults.FINALIZE_BEGUN:
            begun.set()
            await resume.wait()
        elif name == faults.ADJUST_COMMITTED:
            raise faults.SimulatedCrash(name)

    faults.install(hook)
    await runtime.reaper.run_once()
    assert finalize is not None
    assert (await ledger_row(stores, tenant.name))[0] == 9_800  # the expiry committed
    await runtime.admin.sync(p)  # SyncAll
    resume.set()
    with pytest.raises(faults.SimulatedCrash):
        await finalize
    faults.install(None)
    assert (await ledger_row(stores, tenant.name))[0] == 7_000  # the adjustment committed
    await reap_after(runtime, 5_000, passes=3)
    balance, held = await redis_account(runtime, tenant.name)
    assert balance - held <= 7_000, f"redis available {balance - held} > ledger balance 7 000"


# -- 5. CreateCustomer: a retry with another opening balance moves money -------------------


async def test_create_customer_retry_with_another_opening_balance_is_a_conflict(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: CreateCustomer c2 (initial_balance_grains 0) -> the same call retried (a
    lost reply, a replayed request) with initial_balance_grains 1 000.

    Breaks: *retries are idempotent* as docs/API.md ("Idempotency rules") states them:
    CreateCustomer with different parameters answers TRANSACTION_ID_CONFLICT (opening
    balance). ``Admin.create_customer`` credits ``open:<customer>`` only when the amount is
    non-zero, so a first call with 0 records no opening entry and the "retry" credits
    1 000 grains (a second, different opening balance is accepted; the reverse order, 1 000
    then 0, is silently answered as the existing customer). Expected: TRANSACTION_ID_CONFLICT
    and balance 0; actual: balance 1 000."""
    p = await customer(runtime, tenant, 0, cid="c2")
    try:
        view = await runtime.admin.create_customer(p, Customer(tenant.name, "c2", "c2"), 1_000)
        answer = f"balance {view.customer.balance_grains}"
    except BeamError as error:
        answer = error.reason.name
    assert answer == "TRANSACTION_ID_CONFLICT"
    assert (await ledger_row(stores, tenant.name, "c2"))[0] == 0


# -- 6. a Finalize retry is refused while a second hold holds the id ----------------------


async def test_a_finalize_retry_is_refused_while_a_second_hold_holds_the_id(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Schedule: Check r (T1) -> Finalize r with T1, 700 (acknowledged, but the reply is
    lost) -> r's done marker expires -> Check r while the settled-id lookup is unavailable
    (hold H2) -> the app retries the first Finalize: r, T1, 700.

    Breaks: *retries are idempotent* (docs/API.md: a Finalize retry answers the first
    settlement, ``replayed: true``). ``begin_settlement.lua`` finds H2 under the id and
    compares T1's nonce with H2's before it looks at the ledger: the retry is refused with
    INVALID_REQUEST_TOKEN for as long as H2 lives (up to its TTL), though the ledger has
    exactly that settlement. Expected: replayed, charged 700, balance 9 300; actual:
    INVALID_REQUEST_TOKEN."""
    p = await customer(runtime, tenant, 10_000)
    command = CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap")
    first = await runtime.ledger.check(p, command)
    await settle(runtime, p, "r", 700, first.request_token)
    await runtime.redis.client.delete(done_key(tenant.name, CUSTOMER, "r"))
    assert (await check_while_ledger_unavailable(runtime, p, command)).approved
    try:
        retry = await settle(runtime, p, "r", 700, first.request_token)
        answer = (retry.replayed, retry.charged_grains, retry.final_balance)
    except BeamError as error:
        answer = (error.reason.name,)
    assert answer == (True, 700, 9_300)


# -- a hot customer's backlog stays bounded (bench: finalize_hot after an overload) -------


async def test_finalizes_beyond_the_per_customer_bound_are_refused_before_reserving(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Callers that time out leave their settlements running; without a bound a hot
    customer's queue only grew. With the bound at 3: three Finalizes paused before their
    commit, the fourth is refused at once (STORE_UNAVAILABLE) and reserves nothing (its hold
    stays open at its size); once the three finish, the fourth's retry settles."""
    runtime.ledger.max_settlements_per_customer = 3
    p = await customer(runtime, tenant, 10_000)
    checks = [
        await runtime.ledger.check(p, CheckCommand(CUSTOMER, f"r{i}", 100, 1.0, "cheap"))
        for i in range(4)
    ]
    paused, resume = asyncio.Event(), asyncio.Event()
    begun = 0

    async def hook(name: str) -> None:
        nonlocal begun
        if name == faults.FINALIZE_BEGUN:
            begun += 1
            if begun == 3:
                paused.set()
            await resume.wait()

    faults.install(hook)
    try:
        first = [
            asyncio.ensure_future(settle(runtime, p, f"r{i}", 50, checks[i].request_token))
            for i in range(3)
        ]
        await paused.wait()
        with pytest.raises(BeamError) as refused:
            await settle(runtime, p, "r3", 50, checks[3].request_token)
        assert refused.value.reason is Reason.STORE_UNAVAILABLE
        assert await redis_account(runtime, tenant.name) == (10_000, 400)  # r3 untouched
        resume.set()
        assert [(await f).charged_grains for f in first] == [50, 50, 50]
    finally:
        faults.install(None)
        runtime.ledger.max_settlements_per_customer = MAX_SETTLEMENTS_IN_FLIGHT_PER_CUSTOMER
    retry = await settle(runtime, p, "r3", 50, checks[3].request_token)
    assert (retry.charged_grains, retry.final_balance) == (50, 9_800)
    assert await redis_account(runtime, tenant.name) == (9_800, 0)


async def test_the_reaper_leaves_a_finalize_in_flight_here_to_its_process_until_its_deadline(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """A Finalize of this process waits for its commit for longer than the repair grace
    (2 s): the reaper does not read the ledger for it (that would only queue on the
    customer's row lock behind it). Past the hold's deadline it fences and abandons it as
    for any other process (test_an_abandoned_hold_refuses_its_old_attempt_...)."""
    p = await customer(runtime, tenant, 10_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    reads = 0
    committed_after_lock = runtime.postgres.committed_after_lock

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await committed_after_lock(*args, **kwargs)

    runtime.postgres.committed_after_lock = counting  # type: ignore[method-assign]
    pause = Pause(faults.FINALIZE_BEGUN)
    try:
        final = asyncio.ensure_future(settle(runtime, p, "r", 600, check.request_token))
        await pause.reached.wait()
        await reap_after(runtime, 5_000, passes=2)  # past the grace, before the deadline
        assert reads == 0
        pause.resume.set()
        assert (await final).charged_grains == 600
    finally:
        faults.install(None)
        runtime.postgres.committed_after_lock = committed_after_lock  # type: ignore[method-assign]
    assert await redis_account(runtime, tenant.name) == (9_400, 0)

"""Regression tests for the schedules an adversarial audit found leaking money.

Each test names the defect it pins (issue "Money safety", defects 1-9) and fails on the
code before the fix (80e3f59). Real Redis and PostgreSQL; faults are injected through
``beam.core.faults`` (cancellation, a simulated kill -9) or by failing one store call.
Prices (tests/support/stack.py): "cheap" costs 1 grain per input and 2 per output token.
"""

from __future__ import annotations

from typing import Any

import pytest

from beam.constants import account_key, done_key, hold_key
from beam.core import faults
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand, LedgerCommand
from beam.core.reaper import Reaper
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from beam.records import Role
from tests.support.money import (
    CUSTOMER,
    assert_consistent,
    cancelled_at,
    crash_at,
    customer,
    ledger_row,
    reap_after_grace,
    redis_account,
    settle,
)
from tests.support.stack import Stores, Tenant, fresh_database, provision_tenant

# -- defect 1: a settled request id never buys new tokens ----------------------------------


async def test_settled_id_is_refused_after_its_done_marker_expired(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 100_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    await settle(runtime, p, "r", 700, check.request_token)
    # While the marker lives, the same Check is a conflict, not a replayed approval.
    with pytest.raises(BeamError) as live:
        await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    assert live.value.reason is Reason.REQUEST_ID_CONFLICT
    # 24 h later Redis has forgotten; the ledger has not.
    await runtime.redis.client.delete(done_key(tenant.name, CUSTOMER, "r"))
    with pytest.raises(BeamError) as later:
        await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    assert (later.value.reason, later.value.field) == (Reason.REQUEST_ID_CONFLICT, "request_id")
    assert (await runtime.ledger.balance(p, CUSTOMER)).reserved == 0
    assert not await runtime.redis.client.exists(hold_key(tenant.name, CUSTOMER, "r"))
    assert await ledger_row(stores, tenant.name) == (99_300, 99_300, 700, 0)


async def test_a_second_hold_under_a_settled_id_is_charged_on_its_own(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """If a second hold ever opens under a settled id (the ledger was unreachable during
    the Check), what it streams is charged, and it never settles the request again."""
    p = await customer(runtime, tenant, 100_000)
    first = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    await settle(runtime, p, "r", 700, first.request_token)
    await runtime.redis.client.delete(done_key(tenant.name, CUSTOMER, "r"))
    faults.set_bugs({faults.BUG_FREE_REUSE})  # the Check cannot ask the ledger
    again = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    faults.set_bugs(set())
    deduct = await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", again.request_token, 400, "cheap", True, 1)
    )
    assert (deduct.success, deduct.consumed_grains) == (True, 800)
    with pytest.raises(BeamError) as conflict:
        await runtime.ledger.finalize(
            p, FinalizeCommand(CUSTOMER, "r", "COMPLETED_SUCCESS", actual_completion_tokens=400,
                               request_token=again.request_token)
        )  # fmt: skip
    assert conflict.value.reason is Reason.REQUEST_ID_CONFLICT
    # 700 for the first hold, 800 for the second; the request row is the first settlement.
    assert await ledger_row(stores, tenant.name) == (98_500, 98_500, 1_500, 0)
    assert (await runtime.admin.get_request(p, "r", CUSTOMER)).charged_grains == 700
    await assert_consistent(runtime, p)


async def test_replayed_finalize_releases_only_the_hold_it_settled(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 100_000)
    first = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    await settle(runtime, p, "r", 700, first.request_token)
    await runtime.redis.client.delete(done_key(tenant.name, CUSTOMER, "r"))
    faults.set_bugs({faults.BUG_FREE_REUSE})
    again = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 2_000, 1.0, "cheap"))
    faults.set_bugs(set())
    # A retry of the first Finalize (its token) replays the first settlement from the
    # ledger (test_review_findings, finding 6) and must not release the second hold.
    retry = await settle(runtime, p, "r", 700, first.request_token)
    assert (retry.replayed, retry.charged_grains, retry.final_balance) == (True, 700, 99_300)
    assert (await runtime.ledger.balance(p, CUSTOMER)).reserved == 2_000
    await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", again.request_token, 10, "cheap", True, 1)
    )
    faults.advance(16 * 60_000)  # the second hold expires; the reaper charges what it used
    await runtime.reaper.run_once()
    assert await ledger_row(stores, tenant.name) == (99_280, 99_280, 720, 0)
    assert (await runtime.ledger.balance(p, CUSTOMER)).reserved == 0


# -- defect 2: a debit never skips its guard -----------------------------------------------


async def test_debit_retry_after_a_failed_attempt_keeps_its_reservation(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 1_000)
    append = runtime.postgres.append_entry
    calls = 0

    async def fail_once(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise BeamError(Reason.STORE_UNAVAILABLE, "postgresql unavailable: injected")
        return await append(**kwargs)

    runtime.postgres.append_entry = fail_once  # type: ignore[method-assign]
    try:
        with pytest.raises(BeamError) as failed:
            await runtime.admin.debit(p, LedgerCommand(CUSTOMER, 900, "fee", "fee-1"))
        assert failed.value.reason is Reason.STORE_UNAVAILABLE
        # The failed debit still reserves its 900: the customer cannot spend them meanwhile.
        spend = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
        assert (spend.approved, spend.rejection_reason) == (False, "INSUFFICIENT_BALANCE")
        retried = await runtime.admin.debit(p, LedgerCommand(CUSTOMER, 900, "fee", "fee-1"))
    finally:
        runtime.postgres.append_entry = append  # type: ignore[method-assign]
    assert (retried.balance, retried.available, retried.replayed) == (100, 100, False)
    assert await ledger_row(stores, tenant.name) == (100, 100, 0, 0)
    await assert_consistent(runtime, p)


async def test_a_client_cannot_finalize_a_debit_hold(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 1_000)
    enforcer = Principal(tenant.name, Role.ENFORCER, "e", frozenset())
    # "debit:tx-1" is just a request id to a client; it names no debit hold.
    final = await runtime.ledger.finalize(
        enforcer, FinalizeCommand(CUSTOMER, "debit:tx-1", "COMPLETED_SUCCESS")
    )
    assert (final.charged_grains, final.final_balance) == (0, 1_000)
    with pytest.raises(BeamError) as refused:
        await runtime.admin.debit(p, LedgerCommand(CUSTOMER, 5_000, "fee", "tx-1"))
    assert refused.value.reason is Reason.INSUFFICIENT_BALANCE
    assert (await ledger_row(stores, tenant.name))[0] == 1_000
    await assert_consistent(runtime, p)


# -- defect 3: cancellation and kill -9 between the commit and Redis -------------------------


async def test_cancelled_finalize_still_updates_redis(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 10_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    await cancelled_at(
        faults.FINALIZE_COMMITTED, settle(runtime, p, "r", 3_000, check.request_token)
    )
    await runtime.ledger.drain(5)
    assert await redis_account(runtime, tenant.name) == (7_000, 0)
    assert await ledger_row(stores, tenant.name) == (7_000, 7_000, 3_000, 0)
    await assert_consistent(runtime, p)


async def test_cancelled_debit_and_adjustment_still_update_redis(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 10_000, hold_ttl_seconds=1)
    await cancelled_at(
        faults.DEBIT_COMMITTED,
        runtime.admin.debit(p, LedgerCommand(CUSTOMER, 2_000, "fee", "fee-1")),
    )
    await runtime.ledger.drain(5)
    assert await redis_account(runtime, tenant.name) == (8_000, 0)
    # A hold expires at what it consumed (0), then a late Finalize reports 1 500.
    await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
    faults.advance(2_000)
    await runtime.reaper.run_once()
    await cancelled_at(faults.ADJUST_COMMITTED, settle(runtime, p, "r", 1_500))
    await runtime.ledger.drain(5)
    assert await redis_account(runtime, tenant.name) == (6_500, 0)
    assert await ledger_row(stores, tenant.name) == (6_500, 6_500, 1_500, 0)
    await assert_consistent(runtime, p)


@pytest.mark.parametrize("point", [faults.FINALIZE_COMMITTED, faults.FINALIZE_BEGUN])
async def test_killed_finalize_keeps_the_charge_reserved_until_the_reaper_repairs(
    runtime: Runtime, tenant: Tenant, stores: Stores, point: str
) -> None:
    p = await customer(runtime, tenant, 10_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    crash_at(point)
    with pytest.raises(faults.SimulatedCrash):
        await settle(runtime, p, "r", 3_000, check.request_token)
    faults.install(None)
    # Nothing updated Redis, but the hold grew to the 3 000 charge: available is 7 000, the
    # ledger's (or less), never the 9 000 a stale balance minus the old hold would give.
    balance = await runtime.ledger.balance(p, CUSTOMER)
    assert (balance.balance, balance.reserved) == (10_000, 3_000)
    committed = point == faults.FINALIZE_COMMITTED
    assert (await ledger_row(stores, tenant.name))[0] == (7_000 if committed else 10_000)
    await reap_after_grace(runtime)
    if committed:
        assert await redis_account(runtime, tenant.name) == (7_000, 0)
        await assert_consistent(runtime, p)
    else:
        # Never committed: the app's retry settles it, once.
        final = await settle(runtime, p, "r", 3_000, check.request_token)
        assert (final.final_balance, final.replayed) == (7_000, False)
        assert await redis_account(runtime, tenant.name) == (7_000, 0)


async def test_killed_settlement_never_committed_is_abandoned_at_its_deadline(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 10_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", check.request_token, 100, "cheap", True, 1)
    )
    crash_at(faults.FINALIZE_BEGUN)
    with pytest.raises(faults.SimulatedCrash):
        await settle(runtime, p, "r", 3_000, check.request_token)
    faults.install(None)
    faults.advance(16 * 60_000)  # nobody retried: past the hold's deadline
    await runtime.reaper.run_once()  # abandoned: back to an expired hold (consumed 200)
    await runtime.reaper.run_once()  # recorded as an expiry
    assert await ledger_row(stores, tenant.name) == (9_800, 9_800, 200, 0)
    assert await redis_account(runtime, tenant.name) == (9_800, 0)
    await assert_consistent(runtime, p)


async def test_killed_debit_is_repaired_from_the_ledger(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 10_000)
    crash_at(faults.DEBIT_COMMITTED)
    with pytest.raises(faults.SimulatedCrash):
        await runtime.admin.debit(p, LedgerCommand(CUSTOMER, 2_500, "fee", "fee-1"))
    faults.install(None)
    assert await redis_account(runtime, tenant.name) == (10_000, 2_500)
    await reap_after_grace(runtime)
    assert await redis_account(runtime, tenant.name) == (7_500, 0)
    await assert_consistent(runtime, p)


# -- defect 4: one tenant cannot stall the reaper, nor pre-empt system entries --------------


@pytest.mark.parametrize(
    "transaction_id",
    ["expiry:cus:r", "settlement:cus:r", "adjustment:cus:r", "crd:cus:x", "open:cus",
     "credit:1", "debit:1"],
)  # fmt: skip
async def test_client_transaction_ids_cannot_use_system_prefixes(
    runtime: Runtime, tenant: Tenant, stores: Stores, transaction_id: str
) -> None:
    p = await customer(runtime, tenant, 1_000)
    for call in (runtime.admin.credit, runtime.admin.debit):
        with pytest.raises(BeamError) as refused:
            await call(p, LedgerCommand(CUSTOMER, 10, "x", transaction_id))
        assert (refused.value.reason, refused.value.field) == (
            Reason.INVALID_FIELD, "transaction_id",
        )  # fmt: skip
    assert await ledger_row(stores, tenant.name) == (1_000, 1_000, 0, 0)


async def test_a_failing_hold_does_not_stop_the_reaper_for_others(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 10_000, "bad", hold_ttl_seconds=1)
    await customer(runtime, tenant, 10_000, "good", hold_ttl_seconds=1)
    for cid in ("bad", "good"):
        await runtime.ledger.check(p, CheckCommand(cid, "r", 100, 1.0, "cheap"))
    # Corrupt one hold so settling it raises something other than a BeamError.
    await runtime.redis.client.hset(hold_key(tenant.name, "bad", "r"), "consumed", "x")
    faults.advance(2_000)
    stats = await Reaper(
        runtime.redis, runtime.scripts, runtime.postgres, runtime.ledger
    ).run_once()
    assert stats.failures >= 1
    good = await runtime.admin.list_requests(p, "good", 10)
    assert [(r.request_id, r.status.value) for r in good] == [("r", "expired")]


# -- defect 5: the reaper reaches every customer -------------------------------------------


async def test_reaper_carries_its_scan_cursor_across_passes(stores: Stores, tenant: Tenant) -> None:
    """A pass stops after batch_size x 20 customers; the next one must go on from there,
    not rescan the same first customers (whose holds are open, nothing to settle)."""
    assert stores.redis is not None
    # A Redis database of its own, so the scan sees only these customers.
    url = stores.redis.url.rsplit("/", 1)[0] + "/7"
    rt = await Runtime.create(stores.settings(redis_url=url), background=False)
    try:
        await rt.redis.client.flushdb()
        p = await customer(rt, tenant, 1_000, "busy00")
        for i in range(60):  # open holds that expire in 15 minutes
            if i:
                await customer(rt, tenant, 1_000, f"busy{i:02}")
            await rt.ledger.check(p, CheckCommand(f"busy{i:02}", "r", 10, 1.0, "cheap"))
        for i in range(5):  # holds that expire in a second
            await customer(rt, tenant, 1_000, f"idle{i}", hold_ttl_seconds=1)
            await rt.ledger.check(p, CheckCommand(f"idle{i}", "r", 10, 1.0, "cheap"))
        faults.advance(2_000)
        reaper = Reaper(rt.redis, rt.scripts, rt.postgres, rt.ledger, batch_size=1)
        for _ in range(10):  # 20 customers per pass at batch size 1; 65 customers
            await reaper.run_once()
        assert reaper.settled_total == 5
    finally:
        await rt.redis.client.flushdb()
        await rt.stop()


# -- defect 6: Redis and every replica restarted together ----------------------------------


async def test_start_up_resyncs_when_redis_is_not_the_server_last_synced(
    stores: Stores,
) -> None:
    # A database of its own: the start-up resync walks every customer of its database.
    dsn = await fresh_database(stores)
    settings = stores.settings(database_url=dsn)
    runtime = await Runtime.create(settings, background=False)  # migrates it
    try:
        tenant = await provision_tenant(dsn)
        p = await customer(runtime, tenant, 10_000)
        await settle(runtime, p, "r", 4_000)
        # Redis lost its last writes: the balance before the settlement is back.
        await runtime.redis.client.hset(
            account_key(tenant.name, CUSTOMER), mapping={"balance": 10_000, "version": 1}
        )
        await runtime.postgres.set_state("redis_identity", "run_id=the-server-before")
    finally:
        await runtime.stop()
    restarted = await Runtime.create(settings, background=False)
    try:
        assert await redis_account(restarted, tenant.name) == (6_000, 0)
        assert await restarted.resync_if_redis_changed() is False  # recorded now
    finally:
        await restarted.stop()


# -- defect 7: max_request_grains bounds a hold's growth too --------------------------------


async def test_deduct_cannot_grow_a_hold_past_max_request_grains(
    runtime: Runtime, tenant: Tenant
) -> None:
    p = await customer(runtime, tenant, 100_000, max_request_grains=1_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
    deduct = await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", check.request_token, 1_000, "cheap", True, 1)
    )
    assert (deduct.success, deduct.error_code, deduct.reserved_grains, deduct.consumed_grains) == (
        False, "MAX_REQUEST_GRAINS_EXCEEDED", 1_000, 1_000,
    )  # fmt: skip


# -- defect 9: the smaller ones -------------------------------------------------------------


async def test_overage_is_the_ledger_deficit(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 1_000)
    a = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "a", 500, 1.0, "cheap"))
    b = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "b", 500, 1.0, "cheap"))
    first = await settle(runtime, p, "a", 900, a.request_token)
    assert (first.final_balance, first.overage_grains) == (100, 0)
    second = await settle(runtime, p, "b", 500, b.request_token)
    assert (second.final_balance, second.overage_grains) == (-400, 400)
    assert await ledger_row(stores, tenant.name) == (-400, -400, 1_400, 400)


async def test_adjustments_count_towards_spend_and_overage(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 1_000, hold_ttl_seconds=1)
    await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
    faults.advance(2_000)
    await runtime.reaper.run_once()  # expired at 0 consumed
    late = await settle(runtime, p, "r", 1_300)
    assert (late.charged_grains, late.final_balance, late.overage_grains) == (1_300, -300, 300)
    assert await ledger_row(stores, tenant.name) == (-300, -300, 1_300, 300)


async def test_a_hold_keeps_a_bounded_number_of_sequence_results(
    runtime: Runtime, tenant: Tenant
) -> None:
    p = await customer(runtime, tenant, 10_000_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    for sequence in range(1, 301):
        await runtime.ledger.deduct(
            p, DeductCommand(CUSTOMER, "r", check.request_token, 1, "cheap", True, sequence)
        )
    fields = await runtime.redis.client.hkeys(hold_key(tenant.name, CUSTOMER, "r"))
    assert sorted(int(f[2:]) for f in fields if f.startswith("s:")) == list(range(173, 301))
    # A retry inside the window answers its stored result; an older one charges nothing.
    for sequence in (300, 5):
        again = await runtime.ledger.deduct(
            p, DeductCommand(CUSTOMER, "r", check.request_token, 1, "cheap", True, sequence)
        )
        assert (again.success, again.consumed_grains) == (True, 600)


async def test_a_dropped_postgresql_connection_is_store_unavailable(stores: Stores) -> None:
    rt = await Runtime.create(stores.settings(), background=False)
    rt.postgres.pool.terminate()  # every connection dropped under the service
    rt.postgres.read_pool.terminate()  # (get_customer reads on the read pool)
    try:
        with pytest.raises(BeamError) as unavailable:
            await rt.postgres.get_customer("t", "c")
        assert unavailable.value.reason is Reason.STORE_UNAVAILABLE
    finally:
        await rt.stop()


async def test_killed_credit_is_repaired_from_the_ledger(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 10_000)
    crash_at(faults.CREDIT_COMMITTED)
    with pytest.raises(faults.SimulatedCrash):
        await runtime.admin.credit(p, LedgerCommand(CUSTOMER, 2_500, "top-up", "top-1"))
    faults.install(None)
    # Redis is below the ledger (never above) until the reaper finishes the credit.
    assert await redis_account(runtime, tenant.name) == (10_000, 0)
    await reap_after_grace(runtime)
    assert await redis_account(runtime, tenant.name) == (12_500, 0)
    await assert_consistent(runtime, p)


async def test_reaper_never_releases_a_hold_a_late_finalize_took_over(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """The reaper reads an expired hold, a Finalize takes the hold over (reserving its
    charge), then the reaper commits the expiry: the hold must stay reserved until the
    Finalize's adjustment commits, or a crash there would leave Redis above the ledger."""
    p = await customer(runtime, tenant, 10_000, hold_ttl_seconds=1)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    await runtime.ledger.deduct(
        p, DeductCommand(CUSTOMER, "r", check.request_token, 100, "cheap", True, 1)
    )
    faults.advance(2_000)
    work = await runtime.scripts.reaper_work(
        tenant.name, CUSTOMER, now_ms=faults.now_ms(), limit=10, grace_ms=0
    )
    (expired,) = work.expiring  # shrunk to what it consumed: 200
    reserved_during: list[int] = []

    async def reaper_commits_meanwhile(name: str) -> None:
        if name == faults.FINALIZE_BEGUN:
            faults.install(None)
            await runtime.reaper._expire(tenant.name, CUSTOMER, expired)
            reserved_during.append((await runtime.ledger.balance(p, CUSTOMER)).reserved)

    faults.install(reaper_commits_meanwhile)
    final = await settle(runtime, p, "r", 3_000, check.request_token)
    assert reserved_during == [3_000]  # the expiry committed; the charge stays reserved
    assert (final.charged_grains, final.final_balance) == (3_000, 7_000)
    assert await redis_account(runtime, tenant.name) == (7_000, 0)
    assert await ledger_row(stores, tenant.name) == (7_000, 7_000, 3_000, 0)
    await assert_consistent(runtime, p)


async def test_a_finalize_completed_by_the_reaper_replays_its_own_balance(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """The reaper completes a killed Finalize after the balance moved on; a retry of that
    Finalize must answer the balance its settlement left, not the customer's current one."""
    p = await customer(runtime, tenant, 10_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 1_000, 1.0, "cheap"))
    crash_at(faults.FINALIZE_COMMITTED)
    with pytest.raises(faults.SimulatedCrash):
        await settle(runtime, p, "r", 3_000, check.request_token)
    faults.install(None)
    await settle(runtime, p, "other", 500)  # the balance moves on: 6 500
    await reap_after_grace(runtime)
    again = await settle(runtime, p, "r", 3_000, check.request_token)
    assert (again.final_balance, again.charged_grains, again.replayed) == (7_000, 3_000, True)
    assert await redis_account(runtime, tenant.name) == (6_500, 0)


async def test_spend_by_model_counts_each_new_charge_once(runtime: Runtime, tenant: Tenant) -> None:
    from beam.observability import SPENT

    def spent() -> float:
        return SPENT.labels("cheap")._value.get()  # type: ignore[attr-defined]

    p = await customer(runtime, tenant, 100_000, hold_ttl_seconds=1)
    before = spent()
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "a", 1_000, 1.0, "cheap"))
    for _ in range(2):  # the retry is a replay: counted once
        await runtime.ledger.finalize(
            p, FinalizeCommand(CUSTOMER, "a", "COMPLETED_SUCCESS", 0, 300, 0, 0, "cheap",
                               check.request_token)
        )  # fmt: skip
    assert spent() - before == 600
    await runtime.ledger.check(p, CheckCommand(CUSTOMER, "b", 1_000, 1.0, "cheap"))
    faults.advance(2_000)
    await runtime.reaper.run_once()  # expired at 0 consumed
    await runtime.ledger.finalize(
        p, FinalizeCommand(CUSTOMER, "b", "COMPLETED_SUCCESS", 0, 100, 0, 0, "cheap")
    )  # a late Finalize: +200 through an adjustment
    assert spent() - before == 800

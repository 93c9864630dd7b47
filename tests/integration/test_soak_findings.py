"""Defects two fresh simulator seeds found on 2c809f7 (issue 23), against the real stores.
Fixtures and style as tests/integration/test_review_findings.py.
Prices: "cheap" costs 1 grain per input token and 2 per output token.
"""

from __future__ import annotations

import asyncpg
import pytest

from beam.constants import done_key
from beam.core import faults
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand, LedgerCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from tests.support.money import (
    CUSTOMER,
    RedisSnapshot,
    assert_consistent,
    check_while_ledger_unavailable,
    customer,
    ledger_row,
    redis_account,
    settle,
)
from tests.support.stack import Stores, Tenant


async def test_a_refused_credit_retry_keeps_the_repair_of_the_committed_credit(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Seed 108572, shrunk: credit tx2 of 6 486 commits and its Redis half fails (its
    0-grain pending hold is what lets the reaper repair Redis); a retry of tx2 with another
    amount is handed that pending hold, is refused TRANSACTION_ID_CONFLICT and released the
    hold adopting nothing: Redis stayed at 0 while the ledger had 6 486 (Check refused a
    customer who could pay) until an unrelated resync. Now the refusal adopts the credit."""
    p = await customer(runtime, tenant, 0)

    async def fail_after_commit(name: str) -> None:
        if name == faults.CREDIT_COMMITTED:
            raise BeamError(Reason.STORE_UNAVAILABLE, "redis unavailable: injected")

    faults.install(fail_after_commit)
    with pytest.raises(BeamError):
        await runtime.admin.credit(p, LedgerCommand(CUSTOMER, 6_486, "top-up", "tx2"))
    faults.install(None)
    assert await redis_account(runtime, tenant.name) == (0, 0)  # the Redis half never ran
    with pytest.raises(BeamError) as refused:
        await runtime.admin.credit(p, LedgerCommand(CUSTOMER, 100, "top-up", "tx2"))
    assert refused.value.reason is Reason.TRANSACTION_ID_CONFLICT
    assert await redis_account(runtime, tenant.name) == (6_486, 0)
    assert (await ledger_row(stores, tenant.name))[:2] == (6_486, 6_486)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
    assert (check.approved, check.remaining_balance) == (True, 5_986)
    await settle(runtime, p, "r", 500, check.request_token)
    await assert_consistent(runtime, p)


async def test_a_refused_credit_of_another_customers_id_voids_only_its_own_hold(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """The other shape of the refusal: the id was committed for another customer of the
    tenant. Nothing committed for this one: its pending hold is voided, its balance kept."""
    p = await customer(runtime, tenant, 1_000)
    await customer(runtime, tenant, 0, cid="other")
    await runtime.admin.credit(p, LedgerCommand("other", 300, "top-up", "tx9"))
    with pytest.raises(BeamError) as refused:
        await runtime.admin.credit(p, LedgerCommand(CUSTOMER, 300, "top-up", "tx9"))
    assert refused.value.reason is Reason.TRANSACTION_ID_CONFLICT
    assert await redis_account(runtime, tenant.name) == (1_000, 0)
    assert await redis_account(runtime, tenant.name, "other") == (300, 0)
    await assert_consistent(runtime, p)


async def _lost_second_hold(runtime: Runtime, tenant: Tenant) -> tuple[Principal, str, str]:
    """Seed 103576, shrunk: r0 is settled (50, by its hold's Finalize); a Check for r0
    whose settled-id lookup cannot reach the ledger (its done marker has expired) opens a
    second hold (token T2); a Deduct brings it to 200; Redis restarts from a snapshot taken
    before that Check: the hold is gone."""
    p = await customer(runtime, tenant, 1_000)
    first = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r0", 100, 1.0, "cheap"))
    await settle(runtime, p, "r0", 50, first.request_token)  # r0 settled at 50
    await runtime.redis.client.delete(done_key(tenant.name, CUSTOMER, "r0"))  # 24 h later
    snapshot = RedisSnapshot(runtime, tenant.name, "r0")
    await snapshot.take()
    second = await check_while_ledger_unavailable(
        runtime, p, CheckCommand(CUSTOMER, "r0", 100, 1.0, "cheap")
    )
    assert second.approved
    deduct = await runtime.ledger.deduct(
        p,
        DeductCommand(CUSTOMER, "r0", second.request_token, 100, "cheap", True, 1),
    )
    assert deduct.consumed_grains == 200
    await snapshot.restore()  # Redis lost every write since the snapshot
    assert await redis_account(runtime, tenant.name) == (950, 0)
    return p, first.request_token, second.request_token


async def test_a_finalize_naming_a_lost_second_hold_charges_its_usage(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """The Finalize carries the lost hold's own token and reports 300 completion tokens
    (600 grains). On 2c809f7 it was answered REQUEST_ID_CONFLICT and charged 0 (the claim
    turned the second-hold charge off), while the same Finalize without a token was charged
    600: sending the token made the usage free. Now: 600, once, as the second hold's own
    entry (settlement:<c>:<r>#<nonce>), and a retry charges nothing more."""
    p, first_token, token = await _lost_second_hold(runtime, tenant)
    finalize = FinalizeCommand(
        CUSTOMER, "r0", "COMPLETED_SUCCESS", actual_completion_tokens=300, model="cheap",
        request_token=token,
    )  # fmt: skip
    for _ in range(2):  # the retry is charged nothing more
        with pytest.raises(BeamError) as refused:
            await runtime.ledger.finalize(p, finalize)
        assert refused.value.reason is Reason.REQUEST_ID_CONFLICT
        assert await redis_account(runtime, tenant.name) == (350, 0)
        assert (await ledger_row(stores, tenant.name))[:3] == (350, 350, 650)
    nonce = runtime.ledger.tokens.verify(token, tenant.name, CUSTOMER, "r0")
    assert stores.postgres is not None
    conn = await asyncpg.connect(stores.postgres.dsn)
    try:
        rows = await conn.fetch(
            """SELECT transaction_id, transaction_type, amount_grains FROM transactions
               WHERE tenant = $1 AND reference_id = 'r0' ORDER BY balance_version""",
            tenant.name,
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [
        (f"settlement:{CUSTOMER}:r0", "settlement", -50),
        (f"settlement:{CUSTOMER}:r0#{nonce}", "settlement", -600),
    ]
    # The settled request itself is unchanged: r0 answers its first settlement.
    replay = await settle(runtime, p, "r0", 50, first_token)
    assert (replay.charged_grains, replay.replayed) == (50, True)
    await assert_consistent(runtime, p)


async def test_an_old_token_with_a_newer_holds_usage_replays_its_own_settlement(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """A Finalize is about the hold its token names. The first hold's token with the lost
    second hold's usage is a retry of the first settlement: it replays it and charges
    nothing (docs/API.md, "Idempotency")."""
    p = await customer(runtime, tenant, 1_000)
    first = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r0", 100, 1.0, "cheap"))
    await settle(runtime, p, "r0", 50, first.request_token)
    replay = await runtime.ledger.finalize(
        p,
        FinalizeCommand(
            CUSTOMER, "r0", "COMPLETED_SUCCESS", actual_completion_tokens=300, model="cheap",
            request_token=first.request_token,
        ),
    )  # fmt: skip
    assert (replay.charged_grains, replay.final_balance, replay.replayed) == (50, 950, True)
    assert (await ledger_row(stores, tenant.name))[:2] == (950, 950)
    await assert_consistent(runtime, p)


async def test_a_token_never_charges_again_what_a_tokenless_settlement_settled(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Redis lost hold A (token TA); a Finalize without a token settled r0 through a claim
    (its settlement names no hold); then a Finalize with TA arrives (the same usage, sent
    again with the token). Nothing says TA's hold is another one: it is not charged again
    (migrations/0007_claim_second_hold.sql)."""
    p = await customer(runtime, tenant, 1_000)
    snapshot = RedisSnapshot(runtime, tenant.name, "r0")
    await snapshot.take()
    first = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r0", 100, 1.0, "cheap"))
    await snapshot.restore()  # hold A is gone
    await settle(runtime, p, "r0", 300)  # no token: a claim, settles r0 at 300
    with pytest.raises(BeamError) as refused:
        await settle(runtime, p, "r0", 300, first.request_token)
    assert refused.value.reason is Reason.REQUEST_ID_CONFLICT
    assert (await ledger_row(stores, tenant.name))[:2] == (700, 700)
    assert await redis_account(runtime, tenant.name) == (700, 0)
    await assert_consistent(runtime, p)


async def test_a_lost_first_hold_is_charged_while_the_done_marker_lives_too(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Seed 302226, shrunk: hold A of r (token TA) consumed 100, then Redis lost it; r was
    checked again (hold B, token TB) and settled by TB's Finalize (300). A Finalize with TA
    reporting 1 000 is about hold A: charged on its own, the same whether the done marker
    of B's settlement still lives (today) or not (tomorrow): before, the marker answered
    REQUEST_ID_CONFLICT and charged nothing, the ledger charged it a day later."""
    p = await customer(runtime, tenant, 10_000)
    snapshot = RedisSnapshot(runtime, tenant.name, "r")
    await snapshot.take()
    first = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
    await snapshot.restore()  # hold A is gone
    second = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 500, 1.0, "cheap"))
    await settle(runtime, p, "r", 300, second.request_token)
    for _ in range(2):  # the retry charges nothing more
        with pytest.raises(BeamError) as refused:
            await settle(runtime, p, "r", 1_000, first.request_token)
        assert refused.value.reason is Reason.REQUEST_ID_CONFLICT
        assert await redis_account(runtime, tenant.name) == (8_700, 0)
    await runtime.redis.client.delete(done_key(tenant.name, CUSTOMER, "r"))  # a day later
    with pytest.raises(BeamError):
        await settle(runtime, p, "r", 1_000, first.request_token)
    assert (await ledger_row(stores, tenant.name))[:2] == (8_700, 8_700)
    replay = await settle(runtime, p, "r", 300, second.request_token)
    assert (replay.charged_grains, replay.replayed) == (300, True)
    await assert_consistent(runtime, p)

"""A Finalize that arrives after its hold expired: the provider's usage wins, once."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from beam.records import Customer, Role
from tests.support.stack import Stores, Tenant


async def _expired_request(runtime: Runtime, tenant: Tenant) -> Principal:
    p = Principal(tenant.name, Role.ADMIN, "t", frozenset())
    await runtime.admin.create_customer(p, Customer(tenant.name, "c"), 100_000)
    stored, _ = await runtime.postgres.upsert_customer(
        Customer(tenant.name, "c", hold_ttl_seconds=1)
    )
    await runtime.ledger.load_account(stored)
    check = await runtime.ledger.check(p, CheckCommand("c", "r", 10_000, 1.0, "cheap"))
    # 1000 completion tokens of "cheap" (2 grains each) were streamed, then the app vanished.
    await runtime.ledger.deduct(p, DeductCommand("c", "r", check.request_token, 1_000, "", True, 1))
    await asyncio.sleep(1.2)
    # This reaper, or the one of a `beam serve` sharing the stores, settles the expiry.
    await runtime.reaper.run_once()
    for _ in range(50):  # bounded: 5 s
        settled = await runtime.postgres.find_settlement(tenant.name, "c", "r")
        if settled is not None:
            break
        await asyncio.sleep(0.1)
    assert settled is not None
    assert (settled.status.value, settled.charged_grains) == ("expired", 2_000)
    assert (await runtime.ledger.balance(p, "c")).balance == 98_000
    return p


async def test_late_finalize_charges_the_difference_once(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await _expired_request(runtime, tenant)
    late = FinalizeCommand("c", "r", "COMPLETED_SUCCESS", 0, 0, 0, 2_700, "cheap")
    first = await runtime.ledger.finalize(p, late)
    assert (first.charged_grains, first.final_balance, first.replayed) == (2_700, 97_300, False)
    for _ in range(5):
        again = await runtime.ledger.finalize(p, late)
        assert (again.charged_grains, again.final_balance, again.replayed) == (2_700, 97_300, True)
    balance = await runtime.ledger.balance(p, "c")
    assert (balance.balance, balance.reserved) == (97_300, 0)
    assert stores.postgres is not None
    conn = await asyncpg.connect(stores.postgres.dsn)
    try:
        rows = await conn.fetch(
            """SELECT transaction_type, amount_grains FROM transactions
               WHERE tenant = $1 ORDER BY id""",
            tenant.name,
        )
    finally:
        await conn.close()
    assert [(r["transaction_type"], r["amount_grains"]) for r in rows] == [
        ("credit", 100_000), ("expiry", -2_000), ("adjustment", -700),
    ]  # fmt: skip
    report = await runtime.admin.verify_integrity(p, "c")
    assert [r.problems for r in report] == [[]]


async def test_late_finalize_with_lower_usage_refunds(runtime: Runtime, tenant: Tenant) -> None:
    p = await _expired_request(runtime, tenant)
    # 600 completion tokens at the model's price: 1200 grains, 800 less than was charged.
    late = FinalizeCommand("c", "r", "COMPLETED_SUCCESS", 0, 600, 0, 0, "")
    result = await runtime.ledger.finalize(p, late)
    assert (result.charged_grains, result.refunded_grains, result.final_balance) == (
        1_200, 800, 98_800,
    )  # fmt: skip
    # Another late finalize with other usage is a conflict, not a second adjustment.
    for other in (FinalizeCommand("c", "r", "FAILED_ERROR"), FinalizeCommand(
            "c", "r", "COMPLETED_SUCCESS", 0, 0, 0, 5_000)):  # fmt: skip
        with pytest.raises(BeamError) as conflict:
            await runtime.ledger.finalize(p, other)
        assert conflict.value.reason in (Reason.REQUEST_ID_CONFLICT, Reason.TRANSACTION_ID_CONFLICT)
    assert (await runtime.ledger.balance(p, "c")).balance == 98_800


async def test_late_finalize_without_usage_keeps_the_expiry(
    runtime: Runtime, tenant: Tenant
) -> None:
    p = await _expired_request(runtime, tenant)
    none = await runtime.ledger.finalize(p, FinalizeCommand("c", "r", "FAILED_ERROR"))
    assert (none.charged_grains, none.final_balance, none.replayed) == (2_000, 98_000, True)

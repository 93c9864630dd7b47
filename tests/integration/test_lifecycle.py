"""The four-call lifecycle against real Redis and PostgreSQL, with exact numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand, LedgerCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from beam.records import Customer, Role
from tests.support.stack import Tenant


async def new_customer(rt: Runtime, tenant: Tenant, balance: int, cid: str = "cus_1") -> Principal:
    admin = Principal(tenant.name, Role.ADMIN, "test", frozenset())
    await rt.admin.create_customer(admin, Customer(tenant.name, cid, "Customer"), balance)
    return admin


async def test_seed_walkthrough_numbers(runtime: Runtime, tenant: Tenant) -> None:
    p = await new_customer(runtime, tenant, 100_000_000)
    check = await runtime.ledger.check(p, CheckCommand("cus_1", "req_1", 50_000, 1.2, "gpt-4"))
    assert (check.approved, check.reserved_grains, check.remaining_balance) == (
        True, 60_000, 99_940_000,
    )  # fmt: skip
    # 60000 held + 99940000 available at 60 grains per output token.
    assert check.max_affordable_completion_tokens == 1_666_666
    deduct = await runtime.ledger.deduct(
        p, DeductCommand("cus_1", "req_1", check.request_token, 50, "gpt-4", True)
    )
    assert (deduct.success, deduct.consumed_grains, deduct.remaining_balance) == (
        True, 3_000, 99_940_000,
    )  # fmt: skip
    final = await runtime.ledger.finalize(
        p, FinalizeCommand("cus_1", "req_1", "COMPLETED_SUCCESS", 234, 487, 0, 48_700, "gpt-4")
    )
    assert (final.refunded_grains, final.final_balance, final.charged_grains) == (
        11_300, 99_951_300, 48_700,
    )  # fmt: skip
    balance = await runtime.ledger.balance(p, "cus_1")
    assert (balance.balance, balance.reserved, balance.available) == (99_951_300, 0, 99_951_300)


async def test_deduct_grows_hold_then_kills_the_stream(runtime: Runtime, tenant: Tenant) -> None:
    p = await new_customer(runtime, tenant, 10_000)
    check = await runtime.ledger.check(p, CheckCommand("cus_1", "r", 1_000, 1.0, "cheap"))
    # cheap: 2 grains per output token. 4000 tokens = 8000 grains: grows the hold to 8000.
    grow = await runtime.ledger.deduct(
        p, DeductCommand("cus_1", "r", check.request_token, 4_000, "cheap", True, 1)
    )
    assert (grow.success, grow.reserved_grains, grow.consumed_grains, grow.remaining_balance) == (
        True, 8_000, 8_000, 2_000,
    )  # fmt: skip
    # 2000 more tokens = 4000 grains; only 2000 available: the hold takes them and the stream dies.
    kill = await runtime.ledger.deduct(
        p, DeductCommand("cus_1", "r", check.request_token, 2_000, "cheap", True, 2)
    )
    assert (kill.success, kill.error_code, kill.reserved_grains, kill.remaining_balance) == (
        False, "INSUFFICIENT_BALANCE", 10_000, 0,
    )  # fmt: skip
    # The same sequence number answers the same, and charges nothing more.
    again = await runtime.ledger.deduct(
        p, DeductCommand("cus_1", "r", check.request_token, 2_000, "cheap", True, 2)
    )
    assert again == kill
    # The provider reports 6000 completion tokens = 12000 grains: 2000 is recorded overage.
    final = await runtime.ledger.finalize(
        p, FinalizeCommand("cus_1", "r", "KILLED_INSUFFICIENT_BALANCE", 0, 6_000, 0, 0, "cheap")
    )
    assert (final.charged_grains, final.overage_grains, final.final_balance) == (
        12_000, 2_000, -2_000,
    )  # fmt: skip
    rejected = await runtime.ledger.check(p, CheckCommand("cus_1", "r2", 1, 1.0, "cheap"))
    assert (rejected.approved, rejected.rejection_reason, rejected.remaining_balance) == (
        False, "INSUFFICIENT_BALANCE", -2_000,
    )  # fmt: skip


async def test_check_is_idempotent_and_detects_conflicts(runtime: Runtime, tenant: Tenant) -> None:
    p = await new_customer(runtime, tenant, 1_000_000)
    first = await runtime.ledger.check(p, CheckCommand("cus_1", "r", 1_000, 1.5, "gpt-4"))
    assert first.replayed is False
    for _ in range(5):
        again = await runtime.ledger.check(p, CheckCommand("cus_1", "r", 1_000, 1.5, "gpt-4"))
        assert again == replace(first, replayed=True)
    assert (await runtime.ledger.balance(p, "cus_1")).reserved == 1_500
    with pytest.raises(BeamError) as conflict:
        await runtime.ledger.check(p, CheckCommand("cus_1", "r", 2_000, 1.5, "gpt-4"))
    assert conflict.value.reason is Reason.REQUEST_ID_CONFLICT


async def test_credits_and_debits_apply_once(runtime: Runtime, tenant: Tenant) -> None:
    p = await new_customer(runtime, tenant, 0)
    for _ in range(5):
        credit = await runtime.admin.credit(p, LedgerCommand("cus_1", 700, "top-up", "tx-1"))
    assert (credit.balance, credit.replayed) == (700, True)
    for _ in range(5):
        debit = await runtime.admin.debit(p, LedgerCommand("cus_1", 200, "fee", "tx-2"))
    assert (debit.balance, debit.available) == (500, 500)
    with pytest.raises(BeamError) as conflict:
        await runtime.admin.credit(p, LedgerCommand("cus_1", 701, "top-up", "tx-1"))
    assert conflict.value.reason is Reason.TRANSACTION_ID_CONFLICT
    with pytest.raises(BeamError) as short:
        await runtime.admin.debit(p, LedgerCommand("cus_1", 501, "too much", "tx-3"))
    assert short.value.reason is Reason.INSUFFICIENT_BALANCE
    report = await runtime.admin.verify_integrity(p, "cus_1")
    assert [(r.ledger_sum_grains, r.redis_balance, r.ok) for r in report] == [(500, 500, True)]

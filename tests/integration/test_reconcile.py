"""The operator's reconcile functions without a cluster: credits once, one owner per customer."""

from __future__ import annotations

import pytest

from beam.core.auth import Principal
from beam.core.commands import CheckCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from beam.records import Role
from tests.support.stack import Tenant

SPEC = {
    "customerId": "cus_1",
    "credits": [
        {"id": "welcome", "amountGrains": 1_000},
        {"id": "promo:2026", "amountGrains": 500},
    ],
}


async def test_credits_apply_once_across_repeated_reconciles(
    runtime: Runtime, tenant: Tenant
) -> None:
    for _ in range(3):
        status = await runtime.reconciler.reconcile_customer(tenant.name, SPEC, "BeamCustomer/a")
    assert (status.balance, status.available, status.applied_credits) == (
        1_500, 1_500, ["welcome", "promo:2026"],
    )  # fmt: skip
    changed = {**SPEC, "credits": [{"id": "welcome", "amountGrains": 9_999}]}
    status = await runtime.reconciler.reconcile_customer(tenant.name, changed, "BeamCustomer/a")
    assert (status.balance, status.conditions[0].reason) == (1_500, "CreditConflict")


async def test_one_resource_owns_a_customer_id(runtime: Runtime, tenant: Tenant) -> None:
    p = Principal(tenant.name, Role.ADMIN, "t", frozenset())
    await runtime.reconciler.reconcile_customer(tenant.name, SPEC, "BeamCustomer/a")
    with pytest.raises(BeamError) as taken:
        await runtime.reconciler.reconcile_customer(tenant.name, SPEC, "BeamCustomer/b")
    assert (taken.value.reason, taken.value.field) == (Reason.CUSTOMER_EXISTS, "spec.customerId")
    # Deleting the refused resource closes nothing.
    await runtime.reconciler.close_customer(tenant.name, "cus_1", "BeamCustomer/b")
    check = await runtime.ledger.check(p, CheckCommand("cus_1", "r1", 10, 1.0))
    assert check.approved
    # Deleting the owner closes it; then another resource may adopt (and reopen) it.
    await runtime.reconciler.close_customer(tenant.name, "cus_1", "BeamCustomer/a")
    closed = await runtime.ledger.check(p, CheckCommand("cus_1", "r2", 10, 1.0))
    assert (closed.approved, closed.rejection_reason) == (False, "CUSTOMER_CLOSED")
    status = await runtime.reconciler.reconcile_customer(tenant.name, SPEC, "BeamCustomer/b")
    assert status.balance == 1_500
    reopened = await runtime.ledger.check(p, CheckCommand("cus_1", "r3", 10, 1.0))
    assert reopened.approved

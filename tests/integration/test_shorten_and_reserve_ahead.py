"""Issue 16, the server's half: a Check that shortens rather than refuses
(``min_completion_tokens``), and Deducts that reserve ahead of the stream
(``reserve_ahead_tokens``) with the prompt on board, answering how many completion tokens
the hold covers. Real Redis and PostgreSQL. Prices: "cheap" costs 1 grain per input token
and 2 per output token.
"""

from __future__ import annotations

import pytest

from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from tests.support.money import CUSTOMER, assert_consistent, customer, ledger_row, redis_account
from tests.support.stack import Stores, Tenant


def _check(request_id: str, max_tokens: int, min_tokens: int, **extra: object) -> CheckCommand:
    return CheckCommand(
        CUSTOMER, request_id, 0, 1.5, "cheap", max_tokens=max_tokens, prompt_tokens=100,
        min_completion_tokens=min_tokens, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_a_check_shortens_to_what_the_customer_can_afford(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """1 000 grains; prompt 100, max_tokens 1 000 at x1.5: the full hold (3 150) is not
    affordable. With min 50 the hold is sized for the most completion tokens it can pay:
    ceil((100 + 2t) x 1.5) <= 1 000 gives t = 283 (999 grains; 284 would need 1 002)."""
    p = await customer(runtime, tenant, 1_000)
    refused = await runtime.ledger.check(p, _check("r0", 1_000, 0))
    assert (refused.approved, refused.rejection_reason) == (False, "INSUFFICIENT_BALANCE")
    shortened = await runtime.ledger.check(p, _check("r1", 1_000, 50))
    assert (shortened.approved, shortened.granted_completion_tokens) == (True, 283)
    assert (shortened.reserved_grains, shortened.remaining_balance) == (999, 1)
    replay = await runtime.ledger.check(p, _check("r1", 1_000, 50))
    assert (replay.replayed, replay.granted_completion_tokens, replay.reserved_grains) == (
        True,
        283,
        999,
    )
    assert await redis_account(runtime, tenant.name) == (1_000, 999)
    await assert_consistent(runtime, p)


async def test_a_check_that_cannot_afford_its_minimum_is_refused(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 1_000)
    refused = await runtime.ledger.check(p, _check("r0", 1_000, 300))  # 300 needs 1 050
    assert (refused.approved, refused.rejection_reason, refused.remaining_balance) == (
        False,
        "INSUFFICIENT_BALANCE",
        1_000,
    )
    assert await redis_account(runtime, tenant.name) == (1_000, 0)


async def test_an_affordable_check_is_granted_its_max_tokens(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 10_000)
    full = await runtime.ledger.check(p, _check("r0", 1_000, 50))
    assert (full.granted_completion_tokens, full.reserved_grains) == (1_000, 3_150)
    plain = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r1", 500, 1.0, "cheap"))
    assert plain.granted_completion_tokens == 0  # sized from estimated_grains


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"min_completion_tokens": 1_001}, "metadata.min_completion_tokens", "OUT_OF_RANGE"),
        ({"min_completion_tokens": -1}, "metadata.min_completion_tokens", "OUT_OF_RANGE"),
    ],
)
async def test_a_bad_minimum_names_its_field(
    runtime: Runtime,
    tenant: Tenant,
    stores: Stores,
    fields: dict[str, int],
    field: str,
    reason: str,
) -> None:
    p = await customer(runtime, tenant, 1_000)
    with pytest.raises(BeamError) as error:
        await runtime.ledger.check(p, _check("r0", 1_000, fields["min_completion_tokens"]))
    assert (error.value.field, error.value.reason.name) == (field, reason)


async def test_a_minimum_with_an_explicit_estimate_is_refused(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 1_000)
    with pytest.raises(BeamError) as error:
        await runtime.ledger.check(
            p, CheckCommand(CUSTOMER, "r0", 500, 1.0, "cheap", 100, min_completion_tokens=10)
        )
    assert (error.value.field, error.value.reason) == (
        "metadata.min_completion_tokens",
        Reason.INVALID_FIELD,
    )


def _deduct(token: str, tokens: int, seq: int, **extra: int) -> DeductCommand:
    return DeductCommand(
        CUSTOMER,
        "r",
        token,
        tokens,
        "cheap",
        True,
        seq,
        **extra,  # type: ignore[arg-type]
    )


async def test_deducts_reserve_ahead_and_stop_before_the_money_is_gone(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Hold 100. Deduct 1: 10 completion tokens + the 30-token prompt, 50 ahead: charged
    30 + 20 = 50, the hold grows to pay for 60 completion tokens (30 + 120 = 150). A
    sibling takes 800: 50 left. Deduct 2: 50 more tokens (60 in all, cost 150 = the hold)
    with 50 ahead needs 250: the hold grows by the 50 available to 200 and the answer is
    stop now; it covers (200 - 30) / 2 = 85 completion tokens, so the tokens in flight
    until the stop lands are paid for. The settlement of those 85 leaves the balance at 0."""
    p = await customer(runtime, tenant, 1_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 100, 1.0, "cheap"))
    first = await runtime.ledger.deduct(
        p, _deduct(check.request_token, 10, 1, prompt_tokens=30, reserve_ahead_tokens=50)
    )
    assert (first.success, first.consumed_grains, first.reserved_grains) == (True, 50, 150)
    assert (first.covered_completion_tokens, first.remaining_balance) == (60, 850)
    sibling = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r2", 800, 1.0, "cheap"))
    assert sibling.remaining_balance == 50
    second = await runtime.ledger.deduct(
        p, _deduct(check.request_token, 50, 2, reserve_ahead_tokens=50)
    )
    assert (second.success, second.error_code) == (False, "INSUFFICIENT_BALANCE")
    assert (second.consumed_grains, second.reserved_grains) == (150, 200)
    assert (second.covered_completion_tokens, second.remaining_balance) == (85, 0)
    retry = await runtime.ledger.deduct(
        p, _deduct(check.request_token, 50, 2, reserve_ahead_tokens=50)
    )
    assert (retry.success, retry.reserved_grains, retry.covered_completion_tokens) == (
        False,
        200,
        85,
    )
    settled = await runtime.ledger.finalize(
        p,
        FinalizeCommand(
            CUSTOMER, "r", "KILLED_INSUFFICIENT_BALANCE", actual_prompt_tokens=30,
            actual_completion_tokens=85, request_token=check.request_token,
        ),
    )  # fmt: skip
    assert (settled.charged_grains, settled.overage_grains) == (200, 0)
    await runtime.ledger.finalize(p, FinalizeCommand(CUSTOMER, "r2", "COMPLETED_SUCCESS", 0, 0))
    assert (await ledger_row(stores, tenant.name))[:4] == (800, 800, 200, 0)
    await assert_consistent(runtime, p)


async def test_a_deduct_without_reserve_ahead_keeps_todays_semantics(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Raw callers: the hold grows for delivered tokens only; covered is still answered."""
    p = await customer(runtime, tenant, 1_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 100, 1.0, "cheap"))
    answer = await runtime.ledger.deduct(p, _deduct(check.request_token, 60, 1))
    assert (answer.success, answer.consumed_grains, answer.reserved_grains) == (True, 120, 120)
    assert answer.covered_completion_tokens == 60


async def test_a_deduct_must_charge_some_token(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    p = await customer(runtime, tenant, 1_000)
    check = await runtime.ledger.check(p, CheckCommand(CUSTOMER, "r", 100, 1.0, "cheap"))
    with pytest.raises(BeamError) as error:
        await runtime.ledger.deduct(p, _deduct(check.request_token, 0, 1))
    assert (error.value.field, error.value.reason) == ("tokens_consumed", Reason.OUT_OF_RANGE)
    prompt_only = await runtime.ledger.deduct(
        p, _deduct(check.request_token, 0, 1, prompt_tokens=7)
    )
    assert (prompt_only.consumed_grains, prompt_only.covered_completion_tokens) == (7, 46)

"""The Lua scripts compute holds and token costs exactly like Python's integers.

Redis runs Lua 5.1 (doubles). These tests drive the real scripts at the bounds
(ADR 0002) and compare with beam.core.money's exact integer arithmetic.
"""

from __future__ import annotations

import random

from beam.constants import MAX_GRAINS, MAX_PRICE_GRAINS_PER_MILLION, MAX_TOKENS_PER_REQUEST
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand
from beam.core.money import Prices, apply_multiplier, multiplier_ppm, token_cost
from beam.core.pricing import parse_price_entries
from beam.core.runtime import Runtime
from beam.records import Customer, Role
from tests.support.stack import Tenant


async def _customer(rt: Runtime, tenant: Tenant, balance: int, cid: str = "c") -> Principal:
    p = Principal(tenant.name, Role.ADMIN, "t", frozenset())
    await rt.admin.create_customer(p, Customer(tenant.name, cid), balance)
    return p


async def test_hold_amount_matches_python_at_the_bounds(runtime: Runtime, tenant: Tenant) -> None:
    rng = random.Random(7)
    cases = [(MAX_GRAINS // 100, 100.0), (123_456_789_123, 1.2345678), (1, 1.0000001)]
    cases += [(rng.randint(1, 10**12), rng.choice([1.05, 1.2, 1.5, 2.675, 7.3])) for _ in range(20)]
    for index, (estimated, multiplier) in enumerate(cases):
        p = await _customer(runtime, tenant, MAX_GRAINS, f"c{index}")
        check = await runtime.ledger.check(
            p, CheckCommand(f"c{index}", f"r{index}", estimated, multiplier)
        )
        assert check.reserved_grains == apply_multiplier(estimated, multiplier_ppm(multiplier))
        assert check.approved


async def test_token_cost_matches_python_at_the_bounds(runtime: Runtime, tenant: Tenant) -> None:
    rng = random.Random(11)
    price_sets = [
        (MAX_PRICE_GRAINS_PER_MILLION, MAX_PRICE_GRAINS_PER_MILLION - 1, 999_999),
        (150_000, 600_000, 75_000),
        *[tuple(rng.randint(0, MAX_PRICE_GRAINS_PER_MILLION) for _ in range(3)) for _ in range(5)],
    ]
    p = await _customer(runtime, tenant, MAX_GRAINS)
    for index, (p_in, p_out, p_cached) in enumerate(price_sets):
        model = f"m{index}"
        await runtime.postgres.save_prices(
            tenant.name,
            parse_price_entries(
                tenant.name,
                [{"model": model, "inputGrainsPerMillion": p_in, "outputGrainsPerMillion": p_out,
                  "cachedInputGrainsPerMillion": p_cached}],
            ),
            "test",
        )  # fmt: skip
        await runtime.prices.reload()
        prices = Prices(model, p_in, p_out, p_cached)
        check = await runtime.ledger.check(p, CheckCommand("c", f"t{index}", 1, 1.0, model))
        counts = {"in": 0, "out": 0, "cached": 0}
        limit = MAX_TOKENS_PER_REQUEST // 3
        for step in range(1, 7):
            kind = ("in", "out", "cached")[step % 3]
            tokens = rng.randint(1, min(2**31 - 1, limit - counts[kind]))
            counts[kind] += tokens
            result = await runtime.ledger.deduct(
                p,
                DeductCommand("c", f"t{index}", check.request_token, tokens, model,
                              kind == "out", step, kind == "cached"),
            )  # fmt: skip
            expected = token_cost(
                prices, input_tokens=counts["in"], output_tokens=counts["out"],
                cached_input_tokens=counts["cached"],
            )  # fmt: skip
            if expected > MAX_GRAINS:
                break
            assert result.consumed_grains == expected, (prices, counts)

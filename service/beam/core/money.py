"""Integer money arithmetic: the only place amounts are computed in Python.

Grains are integers end to end. The buffer multiplier arrives as a double; it is turned
into exact parts-per-million once (from its shortest decimal representation, rounding up)
and applied with integer arithmetic, rounding the hold up (customer-protecting). Token
costs sum the exact products of tokens and per-million prices and round up once, so a
request's cost never depends on how its tokens were split across deducts. The Lua scripts
(``lua/_common.lua``: ``token_cost``) implement the same formula; a test checks both agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

from beam.constants import MULTIPLIER_SCALE, TOKENS_PER_MILLION


@dataclass(frozen=True, slots=True)
class Prices:
    """Grains per million tokens, locked into a hold when it opens."""

    model: str
    input_grains_per_million: int
    output_grains_per_million: int
    cached_input_grains_per_million: int


def multiplier_ppm(multiplier: float) -> int:
    """Exact parts-per-million of a multiplier, rounded up: 1.2 -> 1_200_000."""
    if not math.isfinite(multiplier):
        raise ValueError("multiplier must be finite")
    scaled = Decimal(repr(multiplier)) * MULTIPLIER_SCALE
    return int(scaled.to_integral_value(rounding=ROUND_CEILING))


def ceil_div(numerator: int, denominator: int) -> int:
    assert denominator > 0
    return -((-numerator) // denominator)


def apply_multiplier(amount_grains: int, ppm: int) -> int:
    """ceil(amount x multiplier), in integers."""
    return ceil_div(amount_grains * ppm, MULTIPLIER_SCALE)


def token_cost(
    prices: Prices, *, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
) -> int:
    """Cost of a token mix at per-million prices, rounded up once."""
    exact = (
        input_tokens * prices.input_grains_per_million
        + output_tokens * prices.output_grains_per_million
        + cached_input_tokens * prices.cached_input_grains_per_million
    )
    return ceil_div(exact, TOKENS_PER_MILLION)


def affordable_output_tokens(budget_grains: int, prices: Prices, cap: int) -> int:
    """How many completion tokens ``budget_grains`` pays for (never more than ``cap``)."""
    if budget_grains <= 0:
        return 0
    if prices.output_grains_per_million == 0:
        return cap
    return min(cap, budget_grains * TOKENS_PER_MILLION // prices.output_grains_per_million)


# -- settlement arithmetic (pure; the SQL in migrations/0004 computes the same) ---------------


def refunded(reserved_grains: int, charged_grains: int) -> int:
    """What a settlement gives back of its hold: the hold pays first, never below 0."""
    return max(0, reserved_grains - charged_grains)


def new_deficit(before_grains: int, after_grains: int) -> int:
    """The overage an entry causes: how far it pushed the balance below zero that it was not
    already below (0 for an entry that leaves the balance at or above 0, or raises it)."""
    return max(0, max(0, -after_grains) - max(0, -before_grains))


def check_settlement(
    *,
    reserved_grains: int,
    charged_grains: int,
    refunded_grains: int,
    overage_grains: int,
    balance_before_grains: int | None = None,
    balance_after_grains: int | None = None,
    version_before: int | None = None,
    version_after: int | None = None,
) -> None:
    """The paired assertions of one settlement, checked where it is built (before the
    ledger write) and where it is read back. A violation is a programmer error: it raises
    AssertionError loudly rather than moving money wrongly."""
    assert charged_grains >= 0, f"charged {charged_grains} < 0"
    assert reserved_grains >= 0, f"reserved {reserved_grains} < 0"
    assert refunded_grains == refunded(reserved_grains, charged_grains), (
        f"refunded {refunded_grains} != max(0, {reserved_grains} - {charged_grains})"
    )
    assert 0 <= refunded_grains <= reserved_grains, "refunded outside [0, reserved]"
    assert 0 <= overage_grains <= charged_grains, f"overage {overage_grains} > charged"
    if balance_before_grains is not None and balance_after_grains is not None:
        assert balance_after_grains == balance_before_grains - charged_grains, "balance moved wrong"
        assert overage_grains == new_deficit(balance_before_grains, balance_after_grains), (
            "overage is not the new deficit"
        )
    if version_before is not None and version_after is not None:
        assert version_after == version_before + 1, "a ledger entry moves the version by one"

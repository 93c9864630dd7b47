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

"""Integer money arithmetic (beam.core.money) with exact expected values."""

from __future__ import annotations

import math

import pytest

from beam.core.money import (
    Prices,
    affordable_output_tokens,
    apply_multiplier,
    ceil_div,
    multiplier_ppm,
    token_cost,
)

GPT4 = Prices("gpt-4", 30_000_000, 60_000_000, 15_000_000)
MINI = Prices("gpt-4o-mini", 150_000, 600_000, 75_000)


@pytest.mark.parametrize(
    ("multiplier", "ppm"),
    [(1.0, 1_000_000), (1.2, 1_200_000), (1.5, 1_500_000), (1.0000001, 1_000_001),
     (1.1234567, 1_123_457), (100.0, 100_000_000), (2.675, 2_675_000)],
)  # fmt: skip
def test_multiplier_is_exact_parts_per_million_rounded_up(multiplier: float, ppm: int) -> None:
    assert multiplier_ppm(multiplier) == ppm


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_multiplier_refuses_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        multiplier_ppm(bad)


def test_hold_rounds_up_once() -> None:
    assert apply_multiplier(50_000, multiplier_ppm(1.2)) == 60_000
    assert apply_multiplier(1, multiplier_ppm(1.2)) == 2  # 1.2 -> 2, never 1
    assert apply_multiplier(3, multiplier_ppm(1.1)) == 4  # 3.3 -> 4
    assert apply_multiplier(10, 1_000_000) == 10


def test_ceil_div() -> None:
    assert [ceil_div(n, 3) for n in (0, 1, 2, 3, 4, -1, -3, -4)] == [0, 1, 1, 1, 2, 0, -1, -1]


def test_token_cost_rounds_up_once_over_the_whole_mix() -> None:
    # 234 prompt + 487 completion tokens of gpt-4: 7020 + 29220 = 36240 grains exactly.
    assert token_cost(GPT4, input_tokens=234, output_tokens=487) == 36_240
    # gpt-4o-mini: 1 token = 0.15 grains -> 1; 10 tokens = 1.5 -> 2; splitting does not add.
    assert token_cost(MINI, input_tokens=1, output_tokens=0) == 1
    assert token_cost(MINI, input_tokens=10, output_tokens=0) == 2
    assert token_cost(MINI, input_tokens=1000, output_tokens=1000, cached_input_tokens=1000) == 825


def test_affordable_output_tokens() -> None:
    assert affordable_output_tokens(60_000, GPT4, 10**9) == 1_000
    assert affordable_output_tokens(59, GPT4, 10**9) == 0
    assert affordable_output_tokens(0, GPT4, 10**9) == 0
    assert affordable_output_tokens(-5, GPT4, 10**9) == 0
    assert affordable_output_tokens(10**12, MINI, 2**31 - 1) == 2**31 - 1
    free = Prices("free", 0, 0, 0)
    assert affordable_output_tokens(1, free, 777) == 777

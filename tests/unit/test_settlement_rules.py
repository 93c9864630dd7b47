"""Settlement arithmetic, table-driven, no store (beam.core.money)."""

from __future__ import annotations

import pytest

from beam.core.money import check_settlement, new_deficit, refunded


@pytest.mark.parametrize(
    ("reserved", "charged", "expected"),
    [(1_000, 700, 300), (1_000, 1_000, 0), (1_000, 1_500, 0), (0, 500, 0), (0, 0, 0)],
)
def test_refunded_is_what_the_hold_did_not_pay(reserved: int, charged: int, expected: int) -> None:
    assert refunded(reserved, charged) == expected


@pytest.mark.parametrize(
    ("before", "after", "overage"),
    [
        (1_000, 100, 0),  # stays positive
        (1_000, 0, 0),  # exactly spent
        (100, -400, 400),  # crosses zero: the part below zero
        (-400, -900, 500),  # already negative: only the new deficit
        (-400, -100, 0),  # a credit towards zero causes none
        (-400, 600, 0),  # back above zero
        (0, -1, 1),
    ],
)
def test_new_deficit_counts_only_the_new_part_below_zero(
    before: int, after: int, overage: int
) -> None:
    assert new_deficit(before, after) == overage


def test_a_consistent_settlement_passes_every_paired_assertion() -> None:
    check_settlement(
        reserved_grains=500, charged_grains=900, refunded_grains=0, overage_grains=400,
        balance_before_grains=500, balance_after_grains=-400, version_before=3, version_after=4,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"charged_grains": -1, "refunded_grains": 1001}, "charged -1 < 0"),
        ({"refunded_grains": 10}, "refunded 10 != max(0, 1000 - 700)"),
        ({"overage_grains": 800}, "overage 800 > charged"),
        ({"balance_after_grains": 400}, "balance moved wrong"),
        ({"balance_after_grains": 300, "overage_grains": 5}, "overage is not the new deficit"),
        ({"version_after": 9}, "a ledger entry moves the version by one"),
    ],
)
def test_each_broken_settlement_is_refused(fields: dict[str, int], message: str) -> None:
    values = {
        "reserved_grains": 1_000, "charged_grains": 700, "refunded_grains": 300,
        "overage_grains": 0, "balance_before_grains": 1_000, "balance_after_grains": 300,
        "version_before": 1, "version_after": 2,
    }  # fmt: skip
    values.update(fields)
    with pytest.raises(AssertionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_settlement(**values)

"""Validation of commands: the field named, the reason, the bound (no servers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from beam.constants import MAX_GRAINS
from beam.core.commands import (
    CheckCommand,
    DeductCommand,
    FinalizeCommand,
    LedgerCommand,
    validate_check,
    validate_deduct,
    validate_finalize,
    validate_ledger_command,
)
from beam.errors import BeamError, Reason

OK_CHECK = {"customer_id": "cus_1", "request_id": "req_1", "estimated_grains": 100}


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"customer_id": ""}, "customer_id", Reason.MISSING_FIELD),
        ({"customer_id": "x" * 129}, "customer_id", Reason.OUT_OF_RANGE),
        ({"customer_id": "bad id"}, "customer_id", Reason.INVALID_FIELD),
        ({"customer_id": "{tag}"}, "customer_id", Reason.INVALID_FIELD),
        ({"request_id": ""}, "request_id", Reason.MISSING_FIELD),
        ({"estimated_grains": -1}, "estimated_grains", Reason.OUT_OF_RANGE),
        ({"estimated_grains": MAX_GRAINS + 1}, "estimated_grains", Reason.OUT_OF_RANGE),
        ({"buffer_multiplier": 0.99}, "buffer_multiplier", Reason.OUT_OF_RANGE),
        ({"buffer_multiplier": 100.5}, "buffer_multiplier", Reason.OUT_OF_RANGE),
        ({"buffer_multiplier": math.nan}, "buffer_multiplier", Reason.OUT_OF_RANGE),
        ({"buffer_multiplier": math.inf}, "buffer_multiplier", Reason.OUT_OF_RANGE),
        ({"buffer_multiplier": -1.0}, "buffer_multiplier", Reason.OUT_OF_RANGE),
        ({"model": "bad model!"}, "metadata.model", Reason.INVALID_FIELD),
        ({"max_tokens": -1}, "metadata.max_tokens", Reason.OUT_OF_RANGE),
        ({"prompt_tokens": 10, "cached_prompt_tokens": 11}, "metadata.cached_prompt_tokens",
         Reason.OUT_OF_RANGE),
        ({"estimated_grains": 0}, "estimated_grains", Reason.MISSING_FIELD),
        ({"estimated_grains": 0, "model": "gpt-4"}, "metadata.max_tokens", Reason.MISSING_FIELD),
        ({"custom_properties": {str(i): "v" for i in range(17)}}, "metadata.custom_properties",
         Reason.OUT_OF_RANGE),
        ({"custom_properties": {"k": "v" * 257}}, "metadata.custom_properties[k]",
         Reason.OUT_OF_RANGE),
    ],
)  # fmt: skip
def test_check_validation(change: dict[str, object], field: str, reason: Reason) -> None:
    with pytest.raises(BeamError) as error:
        validate_check(CheckCommand(**{**OK_CHECK, **change}))  # type: ignore[arg-type]
    assert (error.value.field, error.value.reason) == (field, reason)
    assert error.value.message.startswith(f"{field}: ")


def test_valid_commands_pass() -> None:
    validate_check(CheckCommand(**OK_CHECK))  # type: ignore[arg-type]
    validate_check(CheckCommand("c", "r", 0, 1.0, "gpt-4", max_tokens=100))
    validate_deduct(DeductCommand("c", "r", "v1.a.b", 50, "gpt-4", True, 3))
    validate_finalize(FinalizeCommand("c", "r", "COMPLETED_SUCCESS", 10, 20, 5, 0))
    validate_ledger_command(LedgerCommand("c", 1, "d", "tx-1"))


@pytest.mark.parametrize(
    ("command", "field", "reason"),
    [
        (DeductCommand("c", "r", "", 1), "request_token", Reason.MISSING_FIELD),
        (DeductCommand("c", "r", "t", 0), "tokens_consumed", Reason.OUT_OF_RANGE),
        (DeductCommand("c", "r", "t", -5), "tokens_consumed", Reason.OUT_OF_RANGE),
        (DeductCommand("c", "r", "t", 1, sequence_number=-1), "sequence_number",
         Reason.OUT_OF_RANGE),
        (DeductCommand("c", "r", "t", 1, is_completion=True, is_cached_prompt=True),
         "is_cached_prompt", Reason.INVALID_FIELD),
        (DeductCommand("c", "r", "t" * 257, 1), "request_token", Reason.OUT_OF_RANGE),
    ],
)  # fmt: skip
def test_deduct_validation(command: DeductCommand, field: str, reason: Reason) -> None:
    with pytest.raises(BeamError) as error:
        validate_deduct(command)
    assert (error.value.field, error.value.reason) == (field, reason)


@pytest.mark.parametrize(
    ("command", "field", "reason"),
    [
        (FinalizeCommand("c", "r", "REQUEST_STATUS_UNSPECIFIED"), "status", Reason.MISSING_FIELD),
        (FinalizeCommand("c", "r", "7"), "status", Reason.INVALID_FIELD),
        (FinalizeCommand("c", "r", "COMPLETED_SUCCESS", -1), "actual_prompt_tokens",
         Reason.OUT_OF_RANGE),
        (FinalizeCommand("c", "r", "COMPLETED_SUCCESS", 1, 0, 2), "actual_cached_prompt_tokens",
         Reason.OUT_OF_RANGE),
        (FinalizeCommand("c", "r", "COMPLETED_SUCCESS", total_actual_cost_grains=-1),
         "total_actual_cost_grains", Reason.OUT_OF_RANGE),
    ],
)  # fmt: skip
def test_finalize_validation(command: FinalizeCommand, field: str, reason: Reason) -> None:
    with pytest.raises(BeamError) as error:
        validate_finalize(command)
    assert (error.value.field, error.value.reason) == (field, reason)


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (LedgerCommand("c", 0), "amount_grains"),
        (LedgerCommand("c", MAX_GRAINS + 1), "amount_grains"),
        (LedgerCommand("c", 1, "d" * 513), "description"),
        (LedgerCommand("c", 1, "", "bad id!"), "transaction_id"),
        (LedgerCommand("", 1), "customer_id"),
    ],
)
def test_ledger_command_validation(command: LedgerCommand, field: str) -> None:
    with pytest.raises(BeamError) as error:
        validate_ledger_command(command)
    assert error.value.field == field


def test_credit_ids_follow_the_crd_pattern() -> None:
    import yaml

    from beam.core.commands import CREDIT_ID_PATTERN
    from beam.core.reconcile import parse_customer_spec

    crd = yaml.safe_load(Path("crds/beam.dev_beamcustomers.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    credit = schema["properties"]["spec"]["properties"]["credits"]["items"]["properties"]["id"]
    assert credit["pattern"] == CREDIT_ID_PATTERN.pattern
    customer, credits = parse_customer_spec(
        "t", {"customerId": "cus_1", "credits": [{"id": "promo:2026", "amountGrains": 5}]}
    )
    assert (customer.customer_id, credits[0]["id"]) == ("cus_1", "promo:2026")

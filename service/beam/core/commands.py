"""The calls Beam accepts, as plain values, and their validation.

Both transports (gRPC and REST) turn their messages into these commands and the core
validates them here, once, so a bad field gets the same reason code and message on both.
Every message names the field; nothing is written before validation passes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from beam.constants import (
    MAX_BUFFER_MULTIPLIER,
    MAX_CUSTOM_PROPERTIES,
    MAX_CUSTOM_PROPERTY_BYTES,
    MAX_DESCRIPTION_LENGTH,
    MAX_GRAINS,
    MAX_ID_LENGTH,
    MAX_LIST_LIMIT,
    MAX_SEQUENCE_NUMBER,
    MAX_TOKENS_PER_CALL,
    MIN_BUFFER_MULTIPLIER,
    SYSTEM_TRANSACTION_PREFIXES,
)
from beam.errors import Reason, invalid

CUSTOMER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# The BeamCustomer CRD's credit id pattern (crds/beam.dev_beamcustomers.yaml).
CREDIT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}$")
MODEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,127}$")
BUFFER_STRATEGIES = ("conservative", "balanced", "aggressive")
FINAL_STATUSES = (
    "COMPLETED_SUCCESS",
    "KILLED_INSUFFICIENT_BALANCE",
    "FAILED_ERROR",
    "FAILED_TIMEOUT",
)


@dataclass(frozen=True, slots=True)
class CheckCommand:
    customer_id: str
    request_id: str
    estimated_grains: int = 0
    buffer_multiplier: float = 0.0
    model: str = ""
    max_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    custom_properties: dict[str, str] = field(default_factory=dict)
    min_completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class DeductCommand:
    customer_id: str
    request_id: str
    request_token: str
    tokens_consumed: int
    model: str = ""
    is_completion: bool = False
    sequence_number: int = 0
    is_cached_prompt: bool = False
    reserve_ahead_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class FinalizeCommand:
    customer_id: str
    request_id: str
    status: str
    actual_prompt_tokens: int = 0
    actual_completion_tokens: int = 0
    actual_cached_prompt_tokens: int = 0
    total_actual_cost_grains: int = 0
    model: str = ""
    request_token: str = ""
    # Let through while Beam was unreachable: a label recorded with the settlement; the
    # charge is the same.
    let_through: bool = False


@dataclass(frozen=True, slots=True)
class LedgerCommand:
    """A credit or a debit."""

    customer_id: str
    amount_grains: int
    description: str = ""
    transaction_id: str = ""


def require_id(value: str, name: str, pattern: re.Pattern[str] = CUSTOMER_ID_PATTERN) -> None:
    if not value:
        raise invalid(name, "required", Reason.MISSING_FIELD)
    if len(value) > MAX_ID_LENGTH:
        raise invalid(name, f"at most {MAX_ID_LENGTH} characters", Reason.OUT_OF_RANGE)
    if not pattern.fullmatch(value):  # match() with "$" would accept a trailing newline
        raise invalid(name, f"must match {pattern.pattern}")


def require_range(value: int, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, "must be an integer")
    if not low <= value <= high:
        raise invalid(name, f"must be between {low} and {high}", Reason.OUT_OF_RANGE)


def require_text(value: str, name: str, limit: int) -> None:
    """Free text (names, descriptions): bounded, and no NUL (PostgreSQL text cannot hold it)."""
    if len(value) > limit:
        raise invalid(name, f"at most {limit} characters", Reason.OUT_OF_RANGE)
    if "\x00" in value:
        raise invalid(name, "must not contain NUL characters")


def require_model(value: str, name: str) -> None:
    if value:
        require_id(value, name, MODEL_PATTERN)


def validate_check(command: CheckCommand) -> None:
    require_id(command.customer_id, "customer_id")
    require_id(command.request_id, "request_id", REQUEST_ID_PATTERN)
    require_range(command.estimated_grains, "estimated_grains", 0, MAX_GRAINS)
    multiplier = command.buffer_multiplier
    if not math.isfinite(multiplier):
        raise invalid("buffer_multiplier", "must be a finite number", Reason.OUT_OF_RANGE)
    if multiplier != 0 and not MIN_BUFFER_MULTIPLIER <= multiplier <= MAX_BUFFER_MULTIPLIER:
        raise invalid(
            "buffer_multiplier",
            f"must be 0 (the customer's strategy) or between {MIN_BUFFER_MULTIPLIER} "
            f"and {MAX_BUFFER_MULTIPLIER}",
            Reason.OUT_OF_RANGE,
        )
    require_model(command.model, "metadata.model")
    require_range(command.max_tokens, "metadata.max_tokens", 0, MAX_TOKENS_PER_CALL)
    require_range(command.prompt_tokens, "metadata.prompt_tokens", 0, MAX_TOKENS_PER_CALL)
    require_range(
        command.cached_prompt_tokens, "metadata.cached_prompt_tokens", 0, command.prompt_tokens
    )
    _validate_properties(command.custom_properties)
    require_range(
        command.min_completion_tokens, "metadata.min_completion_tokens", 0, command.max_tokens
    )
    if command.min_completion_tokens and command.estimated_grains:
        raise invalid(
            "metadata.min_completion_tokens",
            "shortening needs Beam's own estimate: set estimated_grains to 0",
        )
    if command.estimated_grains == 0:
        if not command.model:
            raise invalid(
                "estimated_grains",
                "required unless metadata.model and metadata.max_tokens let Beam estimate",
                Reason.MISSING_FIELD,
            )
        if command.max_tokens == 0:
            raise invalid(
                "metadata.max_tokens",
                "required when estimated_grains is 0 (Beam estimates from it)",
                Reason.MISSING_FIELD,
            )


def _validate_properties(properties: dict[str, str]) -> None:
    name = "metadata.custom_properties"
    if len(properties) > MAX_CUSTOM_PROPERTIES:
        raise invalid(name, f"at most {MAX_CUSTOM_PROPERTIES} entries", Reason.OUT_OF_RANGE)
    for key, value in properties.items():
        if not key or len(key.encode()) > MAX_CUSTOM_PROPERTY_BYTES:
            raise invalid(
                name, f"keys are 1..{MAX_CUSTOM_PROPERTY_BYTES} bytes", Reason.OUT_OF_RANGE
            )
        if len(value.encode()) > MAX_CUSTOM_PROPERTY_BYTES:
            raise invalid(
                f"{name}[{key}]",
                f"values are at most {MAX_CUSTOM_PROPERTY_BYTES} bytes",
                Reason.OUT_OF_RANGE,
            )


def validate_deduct(command: DeductCommand) -> None:
    require_id(command.customer_id, "customer_id")
    require_id(command.request_id, "request_id", REQUEST_ID_PATTERN)
    if not command.request_token:
        raise invalid("request_token", "required", Reason.MISSING_FIELD)
    if len(command.request_token) > 256:
        raise invalid("request_token", "at most 256 characters", Reason.OUT_OF_RANGE)
    require_range(command.tokens_consumed, "tokens_consumed", 0, MAX_TOKENS_PER_CALL)
    require_range(command.prompt_tokens, "prompt_tokens", 0, MAX_TOKENS_PER_CALL)
    require_range(command.cached_prompt_tokens, "cached_prompt_tokens", 0, MAX_TOKENS_PER_CALL)
    if command.tokens_consumed + command.prompt_tokens + command.cached_prompt_tokens == 0:
        raise invalid(
            "tokens_consumed",
            "at least one token in tokens_consumed, prompt_tokens or cached_prompt_tokens",
            Reason.OUT_OF_RANGE,
        )
    require_range(command.reserve_ahead_tokens, "reserve_ahead_tokens", 0, MAX_TOKENS_PER_CALL)
    require_model(command.model, "model")
    require_range(command.sequence_number, "sequence_number", 0, MAX_SEQUENCE_NUMBER)
    if command.is_completion and command.is_cached_prompt:
        raise invalid("is_cached_prompt", "cannot be true together with is_completion")


def validate_finalize(command: FinalizeCommand) -> None:
    require_id(command.customer_id, "customer_id")
    require_id(command.request_id, "request_id", REQUEST_ID_PATTERN)
    if command.status == "REQUEST_STATUS_UNSPECIFIED":
        raise invalid(
            "status", f"required, one of {', '.join(FINAL_STATUSES)}", Reason.MISSING_FIELD
        )
    if command.status not in FINAL_STATUSES:
        raise invalid("status", f"must be one of {', '.join(FINAL_STATUSES)}")
    require_range(command.actual_prompt_tokens, "actual_prompt_tokens", 0, MAX_TOKENS_PER_CALL)
    require_range(
        command.actual_completion_tokens, "actual_completion_tokens", 0, MAX_TOKENS_PER_CALL
    )
    require_range(
        command.actual_cached_prompt_tokens,
        "actual_cached_prompt_tokens",
        0,
        command.actual_prompt_tokens,
    )
    require_range(command.total_actual_cost_grains, "total_actual_cost_grains", 0, MAX_GRAINS)
    require_model(command.model, "model")
    if len(command.request_token) > 256:
        raise invalid("request_token", "at most 256 characters", Reason.OUT_OF_RANGE)


def validate_ledger_command(command: LedgerCommand) -> None:
    require_id(command.customer_id, "customer_id")
    require_range(command.amount_grains, "amount_grains", 1, MAX_GRAINS)
    require_text(command.description, "description", MAX_DESCRIPTION_LENGTH)
    if command.transaction_id:
        require_id(command.transaction_id, "transaction_id", REQUEST_ID_PATTERN)


def validate_client_transaction_id(transaction_id: str) -> None:
    """A client's transaction id may not start with a prefix Beam writes itself: it could
    pre-empt a settlement, an expiry, an adjustment or an operator credit."""
    for prefix in SYSTEM_TRANSACTION_PREFIXES:
        if transaction_id.startswith(prefix):
            raise invalid(
                "transaction_id",
                f"must not start with {prefix!r} (reserved for Beam's own entries)",
                Reason.INVALID_FIELD,
            )


def validate_limit(value: int, name: str = "limit") -> None:
    require_range(value, name, 0, MAX_LIST_LIMIT)


def validate_strategy(value: str, name: str = "buffer_strategy") -> None:
    if value and value not in BUFFER_STRATEGIES:
        raise invalid(name, f"must be one of {', '.join(BUFFER_STRATEGIES)}")

"""Typed results of the four BalanceService calls (all amounts in integer grains)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RequestStatus(enum.IntEnum):
    """How a request ended (``beam.balance.v1.RequestStatus``)."""

    COMPLETED_SUCCESS = 1
    KILLED_INSUFFICIENT_BALANCE = 2
    FAILED_ERROR = 3
    FAILED_TIMEOUT = 4


@dataclass(frozen=True, slots=True)
class CheckResult:
    """CheckBalance's answer. ``approved=False`` is an answer, not an error."""

    approved: bool
    request_token: str
    rejection_reason: str
    remaining_balance: int
    reserved_grains: int
    max_affordable_completion_tokens: int
    hold_expires_at_unix_ms: int
    replayed: bool
    #: Completion tokens the hold was sized for: ``max_tokens``, or fewer when
    #: ``min_completion_tokens`` let Beam shorten the request (0: unknown, e.g. a hold from
    #: ``estimated_grains``). Ask the provider for at most this many.
    granted_completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class DeductResult:
    """DeductTokens' answer. ``success=False``: stop the stream (``error_code`` says why)."""

    success: bool
    error_code: str
    remaining_balance: int
    consumed_grains: int
    reserved_grains: int
    #: Completion tokens the hold pays for in all at its locked prices, given the prompt
    #: charged so far (0: unknown). A guard never lets its stream go past it.
    covered_completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class FinalizeResult:
    """FinalizeRequest's answer: the settlement (``replayed`` when an earlier call made it)."""

    success: bool
    charged_grains: int
    refunded_grains: int
    overage_grains: int
    final_balance: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class Balance:
    """GetBalance's answer: ``available = balance - reserved`` (negative after an overage)."""

    balance: int
    reserved: int
    available: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What a request used, as the provider reports it (``None``: not reported)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    total_cost_grains: int | None = None

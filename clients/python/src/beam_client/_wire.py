"""Protobuf messages in and out: building requests, reading answers and failures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from beam_client._generated import balance_pb2 as pb
from beam_client.errors import BeamError
from beam_client.types import Balance, CheckResult, DeductResult, FinalizeResult, RequestStatus

SERVICE = "/beam.balance.v1.BalanceService/"
INT32_MAX = 2**31 - 1

# method name -> (request type, response type)
METHODS: dict[str, tuple[Any, Any]] = {
    "CheckBalance": (pb.CheckBalanceRequest, pb.CheckBalanceResponse),
    "DeductTokens": (pb.DeductTokensRequest, pb.DeductTokensResponse),
    "FinalizeRequest": (pb.FinalizeRequestRequest, pb.FinalizeRequestResponse),
    "GetBalance": (pb.GetBalanceRequest, pb.GetBalanceResponse),
}


def check_request(
    customer_id: str,
    request_id: str,
    *,
    model: str,
    prompt_tokens: int,
    cached_prompt_tokens: int,
    max_tokens: int,
    estimated_grains: int,
    buffer_multiplier: float,
    custom_properties: Mapping[str, str] | None,
    min_completion_tokens: int = 0,
) -> pb.CheckBalanceRequest:
    return pb.CheckBalanceRequest(
        customer_id=customer_id,
        request_id=request_id,
        estimated_grains=estimated_grains,
        buffer_multiplier=buffer_multiplier,
        metadata=pb.RequestMetadata(
            model=model,
            max_tokens=max_tokens,
            prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
            custom_properties=dict(custom_properties or {}),
            min_completion_tokens=min_completion_tokens,
        ),
    )


def deduct_request(
    customer_id: str,
    request_id: str,
    request_token: str,
    *,
    tokens: int,
    sequence_number: int,
    model: str = "",
    is_completion: bool = True,
    is_cached_prompt: bool = False,
    reserve_ahead_tokens: int = 0,
    prompt_tokens: int = 0,
    cached_prompt_tokens: int = 0,
) -> pb.DeductTokensRequest:
    if sequence_number < 1:
        raise ValueError("sequence_number must be >= 1 (it makes a retried Deduct safe)")
    return pb.DeductTokensRequest(
        customer_id=customer_id,
        request_id=request_id,
        request_token=request_token,
        tokens_consumed=tokens,
        model=model,
        is_completion=is_completion,
        is_cached_prompt=is_cached_prompt,
        sequence_number=sequence_number,
        reserve_ahead_tokens=reserve_ahead_tokens,
        prompt_tokens=prompt_tokens,
        cached_prompt_tokens=cached_prompt_tokens,
    )


def finalize_request(
    customer_id: str,
    request_id: str,
    *,
    status: RequestStatus,
    request_token: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_prompt_tokens: int,
    total_cost_grains: int,
    let_through: bool = False,
) -> pb.FinalizeRequestRequest:
    """``let_through``: the request went ahead while Beam was unreachable (fail-open); Beam
    records it on the request and in usage analytics, and charges it like any other."""
    return pb.FinalizeRequestRequest(
        customer_id=customer_id,
        request_id=request_id,
        status=int(status),  # type: ignore[arg-type]
        actual_prompt_tokens=prompt_tokens,
        actual_completion_tokens=completion_tokens,
        actual_cached_prompt_tokens=cached_prompt_tokens,
        total_actual_cost_grains=total_cost_grains,
        model=model,
        request_token=request_token,
        let_through=let_through,
    )


def queued_finalize(payload: bytes, let_through: bool) -> pb.FinalizeRequestRequest:
    """A FinalizeRequest from the outbox, to replay. ``let_through``: the entry was queued
    as a let-through settlement; it is labelled so even if the client that queued it
    predates the label."""
    request = pb.FinalizeRequestRequest.FromString(payload)
    if let_through:
        request.let_through = True
    return request


def check_result(m: pb.CheckBalanceResponse) -> CheckResult:
    return CheckResult(
        approved=m.approved,
        request_token=m.request_token,
        rejection_reason=m.rejection_reason,
        remaining_balance=m.remaining_balance,
        reserved_grains=m.reserved_grains,
        max_affordable_completion_tokens=m.max_affordable_completion_tokens,
        hold_expires_at_unix_ms=m.hold_expires_at_unix_ms,
        replayed=m.replayed,
        granted_completion_tokens=m.granted_completion_tokens,
    )


def deduct_result(m: pb.DeductTokensResponse) -> DeductResult:
    return DeductResult(
        success=m.success,
        error_code=m.error_code,
        remaining_balance=m.remaining_balance,
        consumed_grains=m.consumed_grains,
        reserved_grains=m.reserved_grains,
        covered_completion_tokens=m.covered_completion_tokens,
    )


def finalize_result(m: pb.FinalizeRequestResponse) -> FinalizeResult:
    return FinalizeResult(
        success=m.success,
        charged_grains=m.charged_grains,
        refunded_grains=m.refunded_grains,
        overage_grains=m.overage_grains,
        final_balance=m.final_balance,
        replayed=m.replayed,
    )


def balance_result(m: pb.GetBalanceResponse) -> Balance:
    return Balance(balance=m.balance, reserved=m.reserved, available=m.available)


def error_from_call(call: Any) -> BeamError:
    """A ``grpc.RpcError`` / ``grpc.aio.AioRpcError`` as a :class:`BeamError`."""
    code = call.code()
    trailers = {str(k): v for k, v in (call.trailing_metadata() or ())}
    field = trailers.get("beam-field")
    return BeamError(
        getattr(code, "name", str(code)),
        _text(trailers.get("beam-reason", "")),
        call.details() or "",
        _text(field) if field else None,
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

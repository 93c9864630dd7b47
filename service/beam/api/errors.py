"""The one place Beam errors become transport errors (gRPC status, HTTP JSON).

gRPC: the canonical status code, the message, and trailing metadata ``beam-reason`` (the
stable reason code) and ``beam-field`` (the field at fault, when there is one).
REST: the mapped HTTP status and ``{"error": {"code", "reason", "field", "message"}}``.
Unexpected exceptions are logged with their traceback and answered INTERNAL without
details: a caller never sees a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from beam.errors import BeamError, Code, Reason

log = logging.getLogger(__name__)

_GRPC_CODES = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}


def as_beam_error(error: BaseException, call: str) -> BeamError:
    if isinstance(error, BeamError):
        return error
    log.error("unexpected error in %s", call, exc_info=error)
    return BeamError(Reason.INTERNAL, "internal error")


def grpc_status(error: BeamError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    metadata: list[tuple[str, str]] = [("beam-reason", error.reason.value)]
    if error.field:
        metadata.append(("beam-field", error.field))
    return _GRPC_CODES[error.reason.code], error.message, tuple(metadata)


def http_body(error: BeamError) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {
        "code": error.reason.code.value,
        "reason": error.reason.value,
        "message": error.message,
    }
    if error.field:
        body["field"] = error.field
    return error.reason.code.http_status, {"error": body}

"""The one exception root of Beam and its stable reason codes.

Every expected failure is a ``BeamError`` carrying a ``Reason``: an UPPER_SNAKE code that
never changes meaning, the canonical gRPC status it maps to, and (for bad input) the
field at fault. The gRPC and REST layers translate these in exactly one place each
(``beam.api.errors``), so the two transports cannot disagree. Anything that is not a
``BeamError`` is a programmer error and surfaces as INTERNAL, logged loudly.
"""

from __future__ import annotations

from enum import Enum


class Code(Enum):
    """Canonical gRPC status codes (by name) with their HTTP equivalents."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.FAILED_PRECONDITION: 412,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 503,
    Code.INTERNAL: 500,
}


class Reason(Enum):
    """Stable reason codes; ``code`` is the canonical status each travels with."""

    # Bad input
    MISSING_FIELD = "MISSING_FIELD"
    INVALID_FIELD = "INVALID_FIELD"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNKNOWN_FIELD = "UNKNOWN_FIELD"
    MALFORMED_BODY = "MALFORMED_BODY"
    BODY_TOO_LARGE = "BODY_TOO_LARGE"
    MODEL_MISMATCH = "MODEL_MISMATCH"
    ROUTE_NOT_FOUND = "ROUTE_NOT_FOUND"  # REST: no such path
    # Auth
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INVALID_REQUEST_TOKEN = "INVALID_REQUEST_TOKEN"
    # Lookups
    CUSTOMER_NOT_FOUND = "CUSTOMER_NOT_FOUND"
    REQUEST_NOT_FOUND = "REQUEST_NOT_FOUND"
    HOLD_NOT_FOUND = "HOLD_NOT_FOUND"
    # State
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    CUSTOMER_SUSPENDED = "CUSTOMER_SUSPENDED"
    CUSTOMER_CLOSED = "CUSTOMER_CLOSED"
    REQUEST_ALREADY_SETTLED = "REQUEST_ALREADY_SETTLED"
    HOLD_EXPIRED = "HOLD_EXPIRED"
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    BALANCE_LIMIT_EXCEEDED = "BALANCE_LIMIT_EXCEEDED"
    MAX_REQUEST_GRAINS_EXCEEDED = "MAX_REQUEST_GRAINS_EXCEEDED"
    # Idempotency
    REQUEST_ID_CONFLICT = "REQUEST_ID_CONFLICT"
    TRANSACTION_ID_CONFLICT = "TRANSACTION_ID_CONFLICT"
    SEQUENCE_CONFLICT = "SEQUENCE_CONFLICT"
    CUSTOMER_EXISTS = "CUSTOMER_EXISTS"
    # Limits and faults
    TOO_MANY_OPEN_HOLDS = "TOO_MANY_OPEN_HOLDS"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    INTERNAL = "INTERNAL"

    @property
    def code(self) -> Code:
        return _REASON_CODE.get(self, Code.FAILED_PRECONDITION)


_REASON_CODE = {
    Reason.MISSING_FIELD: Code.INVALID_ARGUMENT,
    Reason.INVALID_FIELD: Code.INVALID_ARGUMENT,
    Reason.OUT_OF_RANGE: Code.INVALID_ARGUMENT,
    Reason.UNKNOWN_FIELD: Code.INVALID_ARGUMENT,
    Reason.MALFORMED_BODY: Code.INVALID_ARGUMENT,
    Reason.BODY_TOO_LARGE: Code.INVALID_ARGUMENT,
    Reason.MODEL_MISMATCH: Code.INVALID_ARGUMENT,
    Reason.UNAUTHENTICATED: Code.UNAUTHENTICATED,
    Reason.PERMISSION_DENIED: Code.PERMISSION_DENIED,
    Reason.INVALID_REQUEST_TOKEN: Code.PERMISSION_DENIED,
    Reason.CUSTOMER_NOT_FOUND: Code.NOT_FOUND,
    Reason.REQUEST_NOT_FOUND: Code.NOT_FOUND,
    Reason.ROUTE_NOT_FOUND: Code.NOT_FOUND,
    Reason.HOLD_NOT_FOUND: Code.NOT_FOUND,
    Reason.REQUEST_ID_CONFLICT: Code.ALREADY_EXISTS,
    Reason.TRANSACTION_ID_CONFLICT: Code.ALREADY_EXISTS,
    Reason.SEQUENCE_CONFLICT: Code.ALREADY_EXISTS,
    Reason.CUSTOMER_EXISTS: Code.ALREADY_EXISTS,
    Reason.TOO_MANY_OPEN_HOLDS: Code.RESOURCE_EXHAUSTED,
    Reason.STORE_UNAVAILABLE: Code.UNAVAILABLE,
    Reason.INTERNAL: Code.INTERNAL,
}


class BeamError(Exception):
    """An expected failure with a stable reason; safe to show to the caller."""

    def __init__(self, reason: Reason, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field

    def __repr__(self) -> str:
        return f"BeamError({self.reason.name}, {self.message!r}, field={self.field!r})"


def invalid(field: str, message: str, reason: Reason = Reason.INVALID_FIELD) -> BeamError:
    """Bad input on one field: the message always starts with the field's name."""
    return BeamError(reason, f"{field}: {message}", field=field)

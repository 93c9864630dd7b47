"""Exceptions of the Beam client.

Every failure the service reports carries its stable reason code (the ``beam-reason``
trailer, see docs/API.md "Reason codes"); the client keeps it on :class:`BeamError`.
"""

from __future__ import annotations


class ConfigurationError(ValueError):
    """The client cannot be configured: a malformed ``BEAM_GRPC_TARGET``, no API key."""


class BeamError(Exception):
    """A call Beam refused, or could not answer.

    ``code`` is the gRPC status name (``"INVALID_ARGUMENT"``), ``reason`` the stable Beam
    reason (``"OUT_OF_RANGE"``; empty when the failure did not come from Beam, e.g. a
    connection refused), ``field`` the field at fault when there is one.
    """

    def __init__(self, code: str, reason: str, message: str, field: str | None = None) -> None:
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field
        where = f" ({field})" if field else ""
        super().__init__(f"{reason or code}{where}: {message}")


class BeamUnavailable(BeamError):
    """Beam could not be reached (or its stores could not) after every retry.

    Raised by the guard under the fail-closed policy, and by the plain calls.
    ``attempts`` is how many times the call was sent.
    """

    def __init__(
        self, code: str, reason: str, message: str, field: str | None = None, attempts: int = 1
    ) -> None:
        super().__init__(code, reason, message, field)
        self.attempts = attempts


class RequestRejected(BeamError):
    """The guard's CheckBalance was not approved; ``reason`` says why.

    ``reason`` is one of ``INSUFFICIENT_BALANCE`` (raised as :class:`InsufficientBalance`),
    ``MAX_REQUEST_GRAINS_EXCEEDED``, ``CUSTOMER_SUSPENDED``, ``CUSTOMER_CLOSED``,
    ``TOO_MANY_OPEN_HOLDS``. ``remaining_balance`` is the customer's available balance.
    """

    def __init__(self, customer_id: str, reason: str, remaining_balance: int) -> None:
        super().__init__(
            "FAILED_PRECONDITION",
            reason,
            f"customer {customer_id!r} cannot start this request "
            f"(available balance {remaining_balance} grains)",
        )
        self.customer_id = customer_id
        self.remaining_balance = remaining_balance


class InsufficientBalance(RequestRejected):
    """The customer's available balance cannot cover the request's hold."""

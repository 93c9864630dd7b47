"""Bounded retries with exponential back-off, for calls that are safe to repeat.

Every call the client sends is idempotent on the server: CheckBalance and
FinalizeRequest by ``request_id``, DeductTokens by ``request_id`` + ``sequence_number``
(the client always sends one), GetBalance by nature. So a call whose outcome is unknown
can be sent again with the same ids, and is charged at most once.

Retried: gRPC ``UNAVAILABLE`` (connection refused or reset, a replica draining, Beam's
``STORE_UNAVAILABLE``), any failure whose ``beam-reason`` is ``STORE_UNAVAILABLE``,
``DEADLINE_EXCEEDED`` (the per-attempt deadline passed; the call may or may not have
happened) and ``CANCELLED`` coming from the server (e.g. a replica shutting down; the
caller's own cancellation is never retried). Nothing else: a refused call fails the same
way every time.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from beam_client.errors import BeamError

RETRYABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})
RETRYABLE_REASONS = frozenset({"STORE_UNAVAILABLE"})

_random = secrets.SystemRandom()


def is_retryable(error: BeamError) -> bool:
    return error.code in RETRYABLE_CODES or error.reason in RETRYABLE_REASONS


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_attempts`` sends at most; the n-th wait is
    ``min(max_backoff, initial_backoff * multiplier**(n-1))``, less up to ``jitter`` of it.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("back-off must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        delay = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return delay * (1 - self.jitter * _random.random())

    def worst_case_wait(self) -> float:
        """Total back-off if every attempt fails (not counting the attempts themselves)."""
        return sum(
            min(self.max_backoff, self.initial_backoff * self.multiplier ** (n - 1))
            for n in range(1, self.max_attempts)
        )


# Check, Deduct, GetBalance: the stream waits on them, so give up within about a second.
DEFAULT_RETRY = RetryPolicy()
# Finalize: settles money; keep trying longer (about 15 s of back-off); a settlement still
# not acknowledged then waits in the outbox (beam_client.outbox), replayed until it is.
FINALIZE_RETRY = RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=3.0)
# One attempt: the outbox's replay (its own back-off spaces the attempts).
ONE_ATTEMPT = RetryPolicy(max_attempts=1)

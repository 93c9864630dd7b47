"""Beam's Python client: enforce prepaid AI spending limits around every LLM call.

.. code-block:: python

    from beam_client import AsyncBeamClient

    beam = AsyncBeamClient()  # BEAM_GRPC_TARGET, BEAM_API_KEY
    async with beam.guard("cus_42", model="gpt-4o-mini", prompt_tokens=120, max_tokens=400) as g:
        async for chunk in g.openai(await openai.chat.completions.create(...)):
            ...

See docs/INTEGRATION.md in the Beam repository.
"""

from __future__ import annotations

__version__ = "0.1.0"

from beam_client.adapters import estimate_tokens
from beam_client.aio import AsyncBeamClient, AsyncGuard
from beam_client.config import Target, parse_target
from beam_client.errors import (
    BeamError,
    BeamUnavailable,
    ConfigurationError,
    InsufficientBalance,
    RequestRejected,
)
from beam_client.outbox import MemoryOutbox, Outbox, OutboxEntry, SQLiteOutbox
from beam_client.policy import FailClosed, FailOpen, FailurePolicy, LetThrough, ModelPrice
from beam_client.retry import RetryPolicy
from beam_client.sync import BeamClient, Guard
from beam_client.types import (
    Balance,
    CheckResult,
    DeductResult,
    FinalizeResult,
    RequestStatus,
    Usage,
)

__all__ = [
    "AsyncBeamClient",
    "AsyncGuard",
    "Balance",
    "BeamClient",
    "BeamError",
    "BeamUnavailable",
    "CheckResult",
    "ConfigurationError",
    "DeductResult",
    "FailClosed",
    "FailOpen",
    "FailurePolicy",
    "FinalizeResult",
    "Guard",
    "InsufficientBalance",
    "LetThrough",
    "MemoryOutbox",
    "ModelPrice",
    "Outbox",
    "OutboxEntry",
    "RequestRejected",
    "RequestStatus",
    "RetryPolicy",
    "SQLiteOutbox",
    "Target",
    "Usage",
    "__version__",
    "estimate_tokens",
    "parse_target",
]

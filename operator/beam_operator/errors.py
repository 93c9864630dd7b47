"""Classify what a reconcile raised: retry later (temporary) or give up (permanent).

- An invalid spec (a ``BeamError`` whose reason maps to INVALID_ARGUMENT) cannot get better
  by retrying: ``kopf.PermanentError``, reported as ``Ready=False`` with the reason. The
  next edit of the spec runs the handler again.
- A store that cannot be reached (Redis, PostgreSQL, the Kubernetes API) will come back:
  ``kopf.TemporaryError`` with a delay that doubles per retry up to a cap. Handlers carry a
  bounded ``retries``, so an outage longer than the budget ends in a failed handler that
  the next spec change, or the operator's restart (resume), runs again.
- A Secret of the target name that something else owns is never overwritten: retried
  (the garbage collector may be about to remove it), bounded like an outage.
- Anything else is a defect or an unforeseen state; it is retried the same bounded way
  and logged with its traceback by Kopf.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import kopf
from kubernetes.client.exceptions import ApiException

from beam.errors import BeamError, Code, Reason
from beam_operator.conditions import reason_name
from beam_operator.constants import MAX_RETRY_DELAY_SECONDS
from beam_operator.secrets import SecretNotOwned

# The stores' adapters already answer an unreachable store as STORE_UNAVAILABLE; a raw
# socket error or timeout from elsewhere (the Kubernetes client) is the same condition.
_UNAVAILABLE = (OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class Failure:
    """What to publish (``Ready=False`` with this reason) and how Kopf should proceed."""

    reason: str
    message: str
    error: kopf.PermanentError | kopf.TemporaryError


def retry_delay(retry: int) -> float:
    """1, 2, 4, ... seconds, capped: the schedule of temporary errors."""
    return float(min(MAX_RETRY_DELAY_SECONDS, 2 ** min(max(retry, 0), 10)))


def classify(error: BaseException, retry: int) -> Failure:
    if isinstance(error, BeamError):
        if error.reason.code is Code.INVALID_ARGUMENT:
            return Failure(
                "InvalidSpec",
                f"{reason_name(error.reason)}: {error.message}",
                kopf.PermanentError(f"invalid spec: {error.message}"),
            )
        if error.reason is Reason.STORE_UNAVAILABLE:
            return _temporary("StoreUnavailable", error.message, retry)
        return _temporary(reason_name(error.reason), error.message, retry)
    if isinstance(error, SecretNotOwned):
        # Usually the Secret of a deleted BeamApiKey of the same name that the garbage
        # collector has not removed yet: retrying settles it. Otherwise a human must pick
        # another spec.secretName or remove the other Secret.
        return _temporary("SecretNotOwned", str(error), retry)
    if isinstance(error, ApiException):
        if error.status in (401, 403):
            # RBAC or an expired token: a human must act, but the token may also be renewed.
            return _temporary("KubernetesForbidden", _api_message(error), retry)
        return _temporary("KubernetesApiError", _api_message(error), retry)
    if isinstance(error, _UNAVAILABLE):
        return _temporary("StoreUnavailable", f"{type(error).__name__}: {error}", retry)
    return _temporary("ReconcileError", f"{type(error).__name__}: {error}", retry)


def _temporary(reason: str, message: str, retry: int) -> Failure:
    delay = retry_delay(retry)
    return Failure(
        reason,
        f"{message} (retrying in {delay:.0f}s)",
        kopf.TemporaryError(f"{reason}: {message}", delay=delay),
    )


def _api_message(error: ApiException) -> str:
    return f"Kubernetes API answered {error.status} {error.reason}"

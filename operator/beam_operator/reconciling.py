"""The frame around every handler: metrics, error classification, ``Ready=False``.

A handler body runs inside ``reconciling(...)``. If it raises, the error is classified
(``errors.classify``), ``Ready`` turns False with the reason and message, and the
matching Kopf error is raised so Kopf retries with a delay or stops. Kopf sends the
``patch`` (and runs its patch functions, which merge the condition into the freshest
conditions: ``beam_operator.conditions``) after the handler even when it fails, so the
condition is always published.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import kopf

from beam.core.reconcile import Condition
from beam_operator.conditions import READY, patch_conditions
from beam_operator.errors import classify
from beam_operator.metrics import RECONCILE_LATENCY, RECONCILES


@contextmanager
def reconciling(
    kind: str,
    handler: str,
    *,
    patch: Any,
    status: Mapping[str, Any],
    generation: int | None,
    retry: int,
    logger: Any,
) -> Iterator[None]:
    started = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except Exception as error:
        failure = classify(error, retry)
        permanent = isinstance(failure.error, kopf.PermanentError)
        outcome = "permanent" if permanent else "temporary"
        ready = Condition(READY, "False", failure.reason, failure.message)
        patch_conditions(patch, [ready], status, generation)
        if permanent:  # this generation was looked at and cannot be applied as written
            patch.status["observedGeneration"] = generation
        # Kopf logs the raised error itself (and posts it as an Event at WARNING and up).
        logger.debug(f"{kind} {handler}: {failure.reason}: {failure.message}")
        raise failure.error from error
    finally:
        RECONCILE_LATENCY.labels(kind, handler).observe(time.perf_counter() - started)
        RECONCILES.labels(kind, handler, outcome).inc()

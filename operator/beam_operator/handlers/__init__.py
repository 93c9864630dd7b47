"""One module per kind: BeamCustomer, BeamApiKey, BeamPriceList. Each has ``register()``.

``register_reconciler`` is the shape all three share: one idempotent ``reconcile`` run on
resume, create and every ``spec`` change (bounded retries and timeout), plus optionally a
delete handler (which makes Kopf add the finalizer) and a periodic timer.

Every handler is filtered by ``instance_labels``: an operator without an instance name
handles the objects that carry no ``beam.dev/operator-instance`` label; one with an
instance name (a second Helm release in the same cluster) handles only the objects
labelled with it. Two releases therefore never reconcile the same object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import kopf

from beam_operator.constants import (
    DELETE_RETRIES,
    GROUP,
    HANDLER_TIMEOUT_SECONDS,
    RECONCILE_RETRIES,
    VERSION,
)

INSTANCE_LABEL = "beam.dev/operator-instance"


def instance_labels(instance: str) -> dict[str, Any]:
    """The label filter of an operator instance ('' = the default instance)."""
    return {INSTANCE_LABEL: instance or kopf.ABSENT}


def register_reconciler(
    registry: kopf.OperatorRegistry,
    plural: str,
    reconcile: Callable[..., Any],
    *,
    labels: Mapping[str, Any],
    on_delete: tuple[str, Callable[..., Any]] | None = None,
    timer: tuple[str, Callable[..., Any], float] | None = None,
) -> None:
    resource = (GROUP, VERSION, plural)
    options: dict[str, Any] = {
        "registry": registry,
        "retries": RECONCILE_RETRIES,
        "timeout": HANDLER_TIMEOUT_SECONDS,
        "labels": dict(labels),
    }
    kopf.on.resume(*resource, id="reconcile", **options)(reconcile)
    kopf.on.create(*resource, id="reconcile", **options)(reconcile)
    kopf.on.update(*resource, id="reconcile", field="spec", **options)(reconcile)
    if on_delete is not None:
        handler_id, handler = on_delete
        kopf.on.delete(
            *resource, id=handler_id, registry=registry, retries=DELETE_RETRIES, labels=dict(labels)
        )(handler)
    if timer is not None:
        timer_id, tick, interval = timer
        kopf.timer(
            *resource, id=timer_id, registry=registry, interval=interval, idle=interval,
            labels=dict(labels),
        )(tick)  # fmt: skip

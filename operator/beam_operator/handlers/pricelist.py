"""BeamPriceList: versioned model prices for a tenant, all or nothing.

create / update of ``spec`` / resume -> ``reconcile_price_list``: every entry is validated
before anything is written, and the changed models get a new price version in one
PostgreSQL transaction that NOTIFYs the service's price cache. A bad entry the schema
let through is reported as ``Ready=False`` with the reason and the field; the previous
prices stay in force (``status.modelCount`` keeps describing them).

Deleting a BeamPriceList leaves its last prices in the stores: prices are a versioned
history that settled and in-flight requests refer to, and a model without a price would
start failing with UNKNOWN_MODEL. No delete handler, so no finalizer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import kopf

from beam.core.reconcile import Condition
from beam_operator.conditions import READY, publish_status
from beam_operator.constants import (
    PRICE_LISTS,
)
from beam_operator.context import context_of, tenant_of
from beam_operator.handlers import register_reconciler
from beam_operator.reconciling import reconciling

KIND = "BeamPriceList"


def register(registry: kopf.OperatorRegistry, *, labels: Mapping[str, Any]) -> None:
    register_reconciler(registry, PRICE_LISTS, reconcile, labels=labels)


async def reconcile(
    *,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    name: str,
    namespace: str | None,
    patch: kopf.Patch,
    memo: Any,
    retry: int,
    logger: Any,
    **_: Any,
) -> None:
    tenant = tenant_of(namespace)
    context = context_of(memo)
    generation = meta.get("generation")
    with reconciling(
        KIND, "reconcile", patch=patch, status=status, generation=generation, retry=retry,
        logger=logger,
    ):  # fmt: skip
        count = await context.reconciler.reconcile_price_list(
            tenant, name, copy.deepcopy(dict(spec))
        )
    ready = Condition(READY, "True", "PricesApplied", f"{count} models priced")
    fields = {"modelCount": count, "observedGeneration": generation}
    publish_status(patch, status, fields, [ready], generation)

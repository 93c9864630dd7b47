"""BeamCustomer: the customer record, its declarative credits, its balance in status.

- create / update of ``spec`` / resume (operator start) -> ``reconcile_customer``: the
  customer row and hot-path config, and every ``spec.credits`` entry applied once (the
  ledger transaction id is ``crd:<customerId>:<credit id>``, so a restart in the middle, a
  re-apply, or a second operator after the first cannot apply a credit twice).
- a timer (BEAM_STATUS_INTERVAL_SECONDS, idle while the spec is changing) refreshes the
  balance fields and the LowBalance/Suspended conditions; it leaves ``Ready`` and
  ``observedGeneration`` to the reconcile handler, and writes nothing when nothing moved.
- delete -> ``close_customer``: new checks get CUSTOMER_CLOSED; the ledger keeps every
  entry; then Kopf removes the finalizer.

Events: ``LowBalance`` and ``BalanceDepleted`` (Warning) when the customer crosses below
its threshold or to zero available, ``BalanceRestored`` (Normal) when it is back above.
Only transitions emit: the last state seen is kept per object in Kopf's memo, falling
back to the published status after a restart, so a restart does not repeat them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from beam.core.reconcile import Condition, CustomerStatus
from beam.errors import BeamError, Reason
from beam_operator.conditions import READY, condition_of, publish_status
from beam_operator.constants import (
    CUSTOMERS,
)
from beam_operator.context import context_of, tenant_of
from beam_operator.errors import classify
from beam_operator.handlers import register_reconciler
from beam_operator.metrics import EVENTS, STATUS_REFRESHES
from beam_operator.reconciling import reconciling

KIND = "BeamCustomer"
LOW_BALANCE = "LowBalance"
BALANCE_MEMO_KEY = "beam_balance_state"

log = logging.getLogger(__name__)


def register(
    registry: kopf.OperatorRegistry, *, status_interval_seconds: float, labels: Mapping[str, Any]
) -> None:
    register_reconciler(
        registry,
        CUSTOMERS,
        reconcile,
        labels=labels,
        on_delete=("close", close),
        timer=("refresh-status", refresh_status, status_interval_seconds),
    )


async def reconcile(
    *,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    name: str,
    namespace: str | None,
    body: kopf.Body,
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
        result = await context.reconciler.reconcile_customer(
            tenant, copy.deepcopy(dict(spec)), owner=owner_of(name)
        )
    fields = {
        **_balance_fields(result),
        "appliedCredits": result.applied_credits,
        "observedGeneration": generation,
    }
    publish_status(patch, status, fields, result.conditions, generation)
    announce_balance(body, memo, status, result)


async def refresh_status(
    *,
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: Any,
    **_: Any,
) -> None:
    tenant = tenant_of(namespace)
    if status.get("observedGeneration") is None:
        STATUS_REFRESHES.labels(KIND, "skipped").inc()
        return  # not reconciled yet: the reconcile handler publishes the first status
    context = context_of(memo)
    try:
        view = await context.reconciler.customer_status(
            tenant, str(spec.get("customerId")), copy.deepcopy(dict(spec))
        )
    except Exception as error:
        if isinstance(error, BeamError) and error.reason is Reason.CUSTOMER_NOT_FOUND:
            STATUS_REFRESHES.labels(KIND, "skipped").inc()  # never reconciled: invalid spec
            return
        # A store outage: the next interval tries again; the reconcile handler reports.
        STATUS_REFRESHES.labels(KIND, "failed").inc()
        log.info("status refresh of %s/%s failed: %s", tenant, name, classify(error, 0).message)
        return
    generation = status.get("observedGeneration")
    # Ready belongs to the reconcile handler (it knows about credit conflicts and specs).
    owned = [c for c in view.conditions if c.type != READY]
    changed = publish_status(patch, status, _balance_fields(view), owned, generation)
    STATUS_REFRESHES.labels(KIND, "patched" if changed else "unchanged").inc()
    announce_balance(body, memo, status, view)


async def close(
    *,
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    memo: Any,
    retry: int,
    logger: Any,
    **_: Any,
) -> None:
    tenant = tenant_of(namespace)
    customer_id = str(spec.get("customerId") or "")
    if not customer_id:
        return
    try:
        await context_of(memo).reconciler.close_customer(tenant, customer_id, owner_of(name))
    except Exception as error:
        raise classify(error, retry).error from error
    logger.info(f"customer {customer_id} closed; its ledger is kept")


def owner_of(name: str) -> str:
    """How the ledger names the resource that manages a customer (one per customerId)."""
    return f"{KIND}/{name}"


def _balance_fields(view: CustomerStatus) -> dict[str, Any]:
    return {
        "balance": view.balance,
        "reserved": view.reserved,
        "available": view.available,
        "lifetimeSpentGrains": view.lifetime_spent_grains,
        "overageGrains": view.overage_grains,
        "spentLast24hGrains": view.spent_last_24h_grains,
    }


# -- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BalanceState:
    low: bool
    depleted: bool


def balance_state(conditions: list[Condition], available: int) -> BalanceState:
    low = next((c for c in conditions if c.type == LOW_BALANCE), None)
    return BalanceState(low is not None and low.status == "True", available <= 0)


def published_state(status: Any) -> BalanceState | None:
    """The state the object's status shows, or None before the first status."""
    if status.get("available") is None:
        return None
    low = condition_of(status, LOW_BALANCE)
    return BalanceState(
        low is not None and low.get("status") == "True", int(status["available"]) <= 0
    )


def announce_balance(body: kopf.Body, memo: Any, status: Any, view: CustomerStatus) -> None:
    """Emit an Event when the balance crosses the threshold or zero (transitions only).

    No ``await`` between reading and writing the memo: the reconcile handler and the
    timer of one object run in one event loop and cannot interleave here.
    """
    now = balance_state(view.conditions, view.available)
    before = memo.get(BALANCE_MEMO_KEY) or published_state(status) or BalanceState(False, False)
    memo[BALANCE_MEMO_KEY] = now
    threshold = body.get("spec", {}).get("lowBalanceThresholdGrains")
    if now.depleted and not before.depleted:
        _event(body, "Warning", "BalanceDepleted",
               f"available balance is {view.available} grains: new checks are rejected "
               "with INSUFFICIENT_BALANCE until the customer is credited")  # fmt: skip
    elif now.low and not before.low:
        _event(body, "Warning", "LowBalance",
               f"available balance {view.available} grains is below the low-balance "
               f"threshold of {threshold} grains")  # fmt: skip
    elif (before.low or before.depleted) and not (now.low or now.depleted):
        _event(body, "Normal", "BalanceRestored",
               f"available balance is {view.available} grains, above the threshold")  # fmt: skip


def _event(body: kopf.Body, kind: str, reason: str, message: str) -> None:
    # kopf.event (not kopf.info/warn): posted regardless of the posting level, which only
    # filters the handlers' log lines.
    kopf.event(body, type=kind, reason=reason, message=message)
    EVENTS.labels(reason).inc()

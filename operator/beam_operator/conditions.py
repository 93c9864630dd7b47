"""metav1.Condition lists and minimal status patches.

The reconcile functions return ``Condition(type, status, reason, message)``; here they
become ``metav1.Condition`` dicts: ``lastTransitionTime`` is kept while a condition's
status does not change, ``observedGeneration`` says which spec it was computed from,
``Ready`` comes first, and conditions of types this operator does not set (another
controller's) are kept.

The dangerous part: a handler reads the object, awaits the stores, and only then is its
patch sent, so the status it read may be stale by then. A JSON merge patch replaces a list
whole, so nothing goes into the merge patch. The whole status change is a patch function
(Kopf's ``patch.fns``): Kopf calls it on the freshest body it has right before patching,
turns the difference into one JSON patch guarded by a ``test`` of
``metadata.resourceVersion``, and when the object moved on in between, keeps the function
and applies it again to the next version. A condition another controller added, or a newer
write, is therefore merged with, never overwritten; and the balances and the conditions
computed from them land in the same write, so no reader sees one without the other.

Only what differs is written: a timer that finds nothing new yields a patch function that
changes nothing, so no JSON patch is sent (no watch event, no resourceVersion churn on idle
objects).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

from beam.core.reconcile import Condition
from beam.errors import Reason
from beam_operator.constants import CONDITION_MESSAGE_MAX

READY = "Ready"


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


def rfc3339(moment: datetime) -> str:
    """Seconds precision, UTC, ``Z``: the form metav1.Time serializes to."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def reason_name(reason: Reason) -> str:
    """``INVALID_FIELD`` -> ``InvalidField`` (condition reasons are CamelCase)."""
    return "".join(part.capitalize() for part in reason.value.split("_"))


def merge_conditions(
    desired: Iterable[Condition],
    existing: Iterable[Mapping[str, Any]] | None,
    generation: int | None,
    *,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """The new condition list: ``desired`` replaces same-typed entries, others stay."""
    stamp = now or now_rfc3339()
    previous = {str(c.get("type")): dict(c) for c in existing or [] if c.get("type")}
    merged: dict[str, dict[str, Any]] = dict(previous)
    for condition in desired:
        old = previous.get(condition.type)
        unchanged = old is not None and old.get("status") == condition.status
        entry: dict[str, Any] = {
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message[:CONDITION_MESSAGE_MAX],
            "lastTransitionTime": (old or {}).get("lastTransitionTime") if unchanged else stamp,
        }
        if not entry["lastTransitionTime"]:
            entry["lastTransitionTime"] = stamp
        if generation is not None:
            entry["observedGeneration"] = generation
        merged[condition.type] = entry
    return sorted(merged.values(), key=lambda c: (c["type"] != READY,))


def status_changes(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``desired`` that differ from ``current`` (``None`` deletes a field)."""
    changes: dict[str, Any] = {}
    for key, value in desired.items():
        if value is None:
            if current.get(key) is not None:
                changes[key] = None
        elif current.get(key) != value:
            changes[key] = value
    return changes


def publish_status(
    patch: Any,
    current: Mapping[str, Any],
    fields: Mapping[str, Any],
    conditions: Iterable[Condition],
    generation: int | None,
    *,
    now: str | None = None,
) -> bool:
    """Queue one patch function that sets ``fields`` (``None`` deletes one) and merges
    ``conditions`` into the object's list, on the freshest body, in one JSON patch: a reader
    never sees a balance without the conditions computed from it. Returns whether anything
    differs from ``current`` (the status the handler read; for metrics)."""
    desired, wanted = tuple(conditions), dict(fields)
    stamp = now or now_rfc3339()
    patch.fns.append(
        functools.partial(
            apply_to_body, fields=wanted, conditions=desired, generation=generation, now=stamp
        )
    )
    merged = merge_conditions(desired, current.get("conditions"), generation, now=stamp)
    return bool(status_changes(current, wanted)) or merged != list(current.get("conditions") or [])


def patch_conditions(
    patch: Any,
    conditions: Iterable[Condition],
    current: Mapping[str, Any],
    generation: int | None,
    *,
    now: str | None = None,
) -> bool:
    """``publish_status`` with conditions only."""
    return publish_status(patch, current, {}, conditions, generation, now=now)


def apply_to_body(
    body: MutableMapping[str, Any],
    *,
    fields: Mapping[str, Any],
    conditions: Iterable[Condition],
    generation: int | None,
    now: str,
) -> None:
    """The patch function: set the fields and merge the conditions into the body's own
    status, in place. The body is left untouched when nothing changes, so Kopf sends
    nothing."""
    status = dict(body.get("status") or {})
    changes = status_changes(status, fields)
    for key, value in changes.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    existing = status.get("conditions")
    merged = merge_conditions(conditions, existing, generation, now=now)
    if changes or merged != list(existing or []):
        body["status"] = {**status, "conditions": merged}


def condition_of(status: Mapping[str, Any], condition_type: str) -> Mapping[str, Any] | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == condition_type:
            return dict(condition)
    return None

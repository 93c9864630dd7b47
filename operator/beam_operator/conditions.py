"""metav1.Condition lists and minimal status patches.

The reconcile functions return ``Condition(type, status, reason, message)``; here they
become ``metav1.Condition`` dicts: ``lastTransitionTime`` is kept while a condition's
status does not change, ``observedGeneration`` says which spec it was computed from,
``Ready`` comes first, and conditions of types this operator does not set (another
controller's) are kept, so the list is edited, never clobbered.

Status is written as a JSON merge patch with only the fields that differ from the
object's current status. A timer that finds nothing new therefore sends nothing, which
keeps the operator quiet on idle objects (no watch event, no resourceVersion churn).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


def apply_status(patch: Any, current: Mapping[str, Any], desired: Mapping[str, Any]) -> None:
    """Put the differing fields into Kopf's ``patch.status`` (sent after the handler)."""
    for key, value in status_changes(current, desired).items():
        patch.status[key] = value


def condition_of(status: Mapping[str, Any], condition_type: str) -> Mapping[str, Any] | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == condition_type:
            return dict(condition)
    return None

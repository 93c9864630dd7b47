"""The operator's pure parts, without a cluster: conditions, status patches, errors.

These are the rules every handler leans on (lastTransitionTime kept while a status holds,
Ready first, other controllers' conditions kept, only changed fields patched, invalid
specs permanent and outages temporary with a bounded, growing delay), checked directly
because the cluster tests can only reach some branches through real outages.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import kopf
import pytest
from pydantic import SecretStr

from beam.config import OperatorSettings, ServiceSettings
from beam.core.reconcile import Condition
from beam.core.runtime import UnsignedTokens, tokens_of
from beam.errors import BeamError, Reason, invalid
from beam_operator.conditions import (
    merge_conditions,
    publish_status,
    reason_name,
    rfc3339,
    status_changes,
)
from beam_operator.context import runtime_settings
from beam_operator.errors import classify, retry_delay
from beam_operator.handlers.customer import BalanceState, balance_state, published_state
from beam_operator.reconciling import reconciling
from beam_operator.secrets import SecretNotOwned

EARLIER = "2026-01-01T00:00:00Z"
NOW = "2026-06-01T12:00:00Z"


def test_transition_time_is_kept_while_the_status_holds() -> None:
    existing = [
        {"type": "LowBalance", "status": "False", "reason": "AboveThreshold", "message": "",
         "lastTransitionTime": EARLIER, "observedGeneration": 1},
        {"type": "Ready", "status": "True", "reason": "Reconciled", "message": "",
         "lastTransitionTime": EARLIER, "observedGeneration": 1},
        {"type": "example.com/Audited", "status": "True", "reason": "Seen", "message": "",
         "lastTransitionTime": EARLIER},
    ]  # fmt: skip
    merged = merge_conditions(
        [Condition("Ready", "True", "Reconciled", "ok"),
         Condition("LowBalance", "True", "BelowThreshold", "low")],
        existing, 2, now=NOW,
    )  # fmt: skip
    assert [(c["type"], c["status"], c["lastTransitionTime"]) for c in merged] == [
        ("Ready", "True", EARLIER),  # first, status unchanged: time kept
        ("LowBalance", "True", NOW),  # flipped: now
        ("example.com/Audited", "True", EARLIER),  # not ours: kept as it was
    ]
    assert [c.get("observedGeneration") for c in merged] == [2, 2, None]
    assert merged[0]["message"] == "ok"


def test_only_changed_fields_are_patched() -> None:
    current = {"balance": 5, "available": 5, "previousKeyExpiresAt": EARLIER}
    assert status_changes(current, {"balance": 5, "available": 4}) == {"available": 4}
    assert status_changes(current, {"previousKeyExpiresAt": None}) == {"previousKeyExpiresAt": None}
    assert status_changes({}, {"previousKeyExpiresAt": None}) == {}


def test_reason_names_and_times_have_the_crd_shapes() -> None:
    assert reason_name(Reason.TRANSACTION_ID_CONFLICT) == "TransactionIdConflict"
    assert rfc3339(datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=UTC)) == "2026-03-04T05:06:07Z"


def test_invalid_specs_are_permanent_and_outages_temporary() -> None:
    bad = classify(invalid("spec.customerId", "required", Reason.MISSING_FIELD), 0)
    assert isinstance(bad.error, kopf.PermanentError)
    assert (bad.reason, bad.message) == ("InvalidSpec", "MissingField: spec.customerId: required")
    down = classify(BeamError(Reason.STORE_UNAVAILABLE, "redis unavailable"), 3)
    assert isinstance(down.error, kopf.TemporaryError)
    assert (down.reason, down.error.delay) == ("StoreUnavailable", 8.0)
    refused = classify(ConnectionRefusedError("connect"), 0)
    assert (refused.reason, refused.error.delay) == ("StoreUnavailable", 1.0)
    foreign = classify(SecretNotOwned("Secret x is not ours"), 2)
    assert isinstance(foreign.error, kopf.TemporaryError)
    assert (foreign.reason, foreign.error.delay) == ("SecretNotOwned", 4.0)
    assert [retry_delay(n) for n in (0, 1, 5, 6, 20)] == [1.0, 2.0, 32.0, 60.0, 60.0]


@pytest.mark.parametrize(
    ("error", "kopf_error", "observed"),
    [
        (invalid("spec.models[0].model", "duplicate model 'x'"), kopf.PermanentError, 7),
        (BeamError(Reason.STORE_UNAVAILABLE, "down"), kopf.TemporaryError, None),
    ],
)
def test_a_failed_reconcile_publishes_ready_false(
    error: Exception, kopf_error: type[Exception], observed: int | None
) -> None:
    patch = kopf.Patch()
    status = {"conditions": [{"type": "Ready", "status": "True", "reason": "PricesApplied",
                              "message": "", "lastTransitionTime": EARLIER}]}  # fmt: skip
    with pytest.raises(kopf_error), reconciling(
        "BeamPriceList", "reconcile", patch=patch, status=status, generation=7, retry=0,
        logger=_NullLogger(),
    ):  # fmt: skip
        raise error
    assert "conditions" not in patch.get("status", {})  # never the whole list
    body: dict[str, Any] = {"status": copy.deepcopy(status)}
    for fn in patch.fns:
        fn(body)
    ready = body["status"]["conditions"][0]
    assert (ready["type"], ready["status"]) == ("Ready", "False")
    assert ready["lastTransitionTime"] != EARLIER
    assert patch.get("status", {}).get("observedGeneration") == observed


FOREIGN = {"type": "example.com/Audited", "status": "True", "reason": "Seen", "message": "",
           "lastTransitionTime": EARLIER}  # fmt: skip


def _object(resource_version: str, conditions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "beam.dev/v1alpha1", "kind": "BeamPriceList",
        "metadata": {"name": "prices", "namespace": "acme", "generation": 2,
                     "resourceVersion": resource_version},
        "status": {"modelCount": 1, "observedGeneration": 1, "conditions": conditions},
    }  # fmt: skip


def test_a_condition_added_after_the_read_is_kept() -> None:
    """The handler read version 1; another controller added its condition (version 2)
    before Kopf patched. The merge runs on version 2, so its condition stays."""
    read = _object("1", [])
    patch = kopf.Patch(body=kopf.Body(read))
    ready = Condition("Ready", "True", "PricesApplied", "2 models priced")
    changed = publish_status(
        patch, read["status"], {"modelCount": 2, "observedGeneration": 2}, [ready], 2, now=NOW
    )
    assert changed
    assert dict(patch) == {}  # no merge patch: nothing is written from the stale read
    fresh = _object("2", [FOREIGN])
    ops = patch.as_json_patch(fresh)  # what Kopf sends, guarded by a resourceVersion test
    assert sorted((op["op"], op["path"]) for op in ops) == [
        ("add", "/status/conditions/0"),  # Ready, inserted before the foreign one, not over it
        ("replace", "/status/modelCount"),  # with the fields, in the same JSON patch
        ("replace", "/status/observedGeneration"),
    ]
    patched = copy.deepcopy(fresh)
    for fn in patch.fns:
        fn(patched)
    assert [(c["type"], c["status"]) for c in patched["status"]["conditions"]] == [
        ("Ready", "True"),
        ("example.com/Audited", "True"),
    ]
    assert patched["status"]["conditions"][1] == FOREIGN


def test_nothing_is_sent_when_nothing_changed() -> None:
    ready = {"type": "Ready", "status": "True", "reason": "PricesApplied",
             "message": "1 models priced", "lastTransitionTime": EARLIER,
             "observedGeneration": 2}  # fmt: skip
    current = _object("5", [ready, FOREIGN])
    current["status"]["observedGeneration"] = 2
    patch = kopf.Patch(body=kopf.Body(current))
    condition = Condition("Ready", "True", "PricesApplied", "1 models priced")
    fields = {"modelCount": 1, "observedGeneration": 2}
    assert not publish_status(patch, current["status"], fields, [condition], 2, now=NOW)
    assert dict(patch) == {}
    assert patch.as_json_patch(current) == []  # the patch function changes nothing


def test_balance_states_come_from_conditions_or_the_published_status() -> None:
    low = [Condition("LowBalance", "True", "BelowThreshold")]
    assert balance_state(low, 10) == BalanceState(low=True, depleted=False)
    assert balance_state([], 0) == BalanceState(low=False, depleted=True)
    assert published_state({}) is None
    published = {"available": -5, "conditions": [{"type": "LowBalance", "status": "True"}]}
    assert published_state(published) == BalanceState(low=True, depleted=True)


def test_the_runtime_gets_the_operators_store_settings_and_no_key() -> None:
    settings = OperatorSettings(
        redis_url="redis://127.0.0.1:7000/2",
        database_url=SecretStr("postgresql://u@127.0.0.1:5433/db"),
        migrate_on_start=False,
    )
    derived = runtime_settings(settings)
    assert derived.redis_url == "redis://127.0.0.1:7000/2"
    assert derived.database_url.get_secret_value() == "postgresql://u@127.0.0.1:5433/db"
    assert derived.migrate_on_start is False
    assert not isinstance(derived, ServiceSettings)  # so no request-token key to carry
    assert isinstance(tokens_of(derived), UnsignedTokens)


class _NullLogger:
    def debug(self, *_: object) -> None:
        pass

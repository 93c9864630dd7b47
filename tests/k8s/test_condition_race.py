"""Another controller's condition, written between a handler's read and its patch, is kept.

The real BeamPriceList handler runs in a real Kopf against the real API server; only its
reconciler is replaced by one that waits, so the test can write a foreign condition into
the object's status while the handler holds a read that does not have it. A status patch
that carried the conditions as a whole list (a JSON merge patch replaces lists) would drop
it; the patch function merges into the freshest body, so it stays.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from beam.config import OperatorSettings
from beam_operator.context import MEMO_KEY, OperatorContext
from beam_operator.handlers import instance_labels, pricelist
from beam_operator.main import configure_kopf
from tests.k8s.operator_support import (
    CRD_DIR,
    ControlPlane,
    apply,
    condition,
    get_json,
    kubectl_ok,
    wait_for,
)

FOREIGN = {"type": "example.com/Audited", "status": "True", "reason": "Seen",
           "message": "audited", "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip

pytestmark = pytest.mark.timeout(180)


class PausingReconciler:
    """Stands in for ``Reconciler``: enters, waits for the test, reports two models."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.proceed = threading.Event()

    async def reconcile_price_list(self, tenant: str, name: str, spec: dict[str, Any]) -> int:
        self.entered.set()
        await asyncio.to_thread(self.proceed.wait, 60)
        return len(spec.get("models") or [])


class _Runtime:
    def __init__(self, reconciler: PausingReconciler) -> None:
        self.reconciler = reconciler


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    kubectl_ok(control_plane, "apply", "-f", str(CRD_DIR))
    kubectl_ok(control_plane, "wait", "--for=condition=Established", "--timeout=60s",
               "crd/beampricelists.beam.dev", timeout=90)  # fmt: skip
    name = f"race-{secrets.token_hex(3)}"
    kubectl_ok(control_plane, "create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def reconciler(
    control_plane: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PausingReconciler]:
    """Kopf in a thread, with the real handlers of BeamPriceList and a pausing reconciler."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    paused = PausingReconciler()
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_with_kubeconfig)
    pricelist.register(registry, labels=instance_labels(""))
    settings = kopf.OperatorSettings()
    configure_kopf(settings)
    context = OperatorContext(
        OperatorSettings(environment="dev"),  # type: ignore[arg-type]
        _Runtime(paused),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
    )
    stop = threading.Event()
    ready = threading.Event()

    def run() -> None:
        asyncio.run(kopf.operator(
            registry=registry, settings=settings, memo=kopf.Memo({MEMO_KEY: context}),
            standalone=True, namespaces=[namespace], stop_flag=stop, ready_flag=ready,
        ))  # fmt: skip

    thread = threading.Thread(target=run, name="kopf-under-test", daemon=True)
    thread.start()
    assert ready.wait(60), "Kopf did not start"
    yield paused
    paused.proceed.set()
    stop.set()
    thread.join(30)


def test_a_condition_written_during_the_reconcile_is_kept(
    control_plane: ControlPlane, namespace: str, reconciler: PausingReconciler
) -> None:
    models = [
        {"model": "m-1", "inputGrainsPerMillion": 1, "outputGrainsPerMillion": 2},
        {"model": "m-2", "inputGrainsPerMillion": 3, "outputGrainsPerMillion": 4},
    ]
    apply(control_plane, {
        "apiVersion": "beam.dev/v1alpha1", "kind": "BeamPriceList",
        "metadata": {"name": "prices", "namespace": namespace}, "spec": {"models": models},
    })  # fmt: skip
    assert reconciler.entered.wait(60), "the handler did not run"
    # The handler holds a read without conditions; another controller writes one now.
    kubectl_ok(control_plane, "patch", "beampricelist/prices", "-n", namespace,
               "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": {"conditions": [FOREIGN]}}))  # fmt: skip
    reconciler.proceed.set()

    def published() -> dict[str, Any] | None:
        obj = get_json(control_plane, namespace, "beampricelist/prices")
        return obj if condition(obj, "Ready") is not None else None

    obj = wait_for("Ready on the BeamPriceList", published, timeout=60)
    status = obj["status"]
    assert [c["type"] for c in status["conditions"]] == ["Ready", "example.com/Audited"]
    assert status["conditions"][1] == FOREIGN
    assert (status["modelCount"], status["observedGeneration"]) == (2, 1)
    ready = status["conditions"][0]
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == (
        "True", "PricesApplied", 1,
    )  # fmt: skip

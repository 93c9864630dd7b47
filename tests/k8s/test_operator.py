"""The operator on a real control plane, against real stores and a real `beam serve`.

`beam operator` runs as a child process with the chart's least-privilege RBAC (a
ServiceAccount token from the TokenRequest API, never the admin kubeconfig), on the
session's PostgreSQL and Redis; `beam serve` (the `service` fixture) shares those stores,
so what the operator writes is what the service enforces. Every wait is bounded and every
amount exact.

The examples live in the namespace `acme` (they name it themselves); every other object
goes into namespaces of this module, deleted at the end while the operator still runs
(the operator's finalizers must be processed for a namespace to go away).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.k8s.operator_support import (
    CRD_DIR,
    CRD_NAMES,
    EXAMPLES_DIR,
    PEERING_CRD_NAMES,
    ControlPlane,
    OperatorProcess,
    api_key,
    apply,
    chart_operator_peering,
    chart_operator_rbac,
    condition,
    credit_rows,
    customer,
    events_for,
    execute,
    get_json,
    kubectl_ok,
    secret_data,
    sql,
    wait_for,
)
from tests.support.stack import ServiceProcess, Stores

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]  # an operator process per module

ACME = "acme"
EXAMPLE_BALANCE = 60_000_000  # examples/customer.yaml: 10000000 + 50000000
EXAMPLE_MODELS = 7  # examples/pricelist.yaml
STATUS_INTERVAL_SECONDS = 1  # the operator's timers, so status follows the ledger quickly
RECONCILE_WAIT_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Namespaces:
    system: str  # the chart's release namespace: the operator's ServiceAccount lives here
    work: str  # this module's tenant for keys, checks and lifecycle tests
    other: str  # a second tenant, to prove isolation


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def namespaces() -> Namespaces:
    suffix = uuid.uuid4().hex[:6]
    return Namespaces(f"beam-op-system-{suffix}", f"beam-op-work-{suffix}",
                      f"beam-op-other-{suffix}")  # fmt: skip


@pytest.fixture(scope="module")
def kube(control_plane: ControlPlane) -> ControlPlane:
    kubectl_ok(control_plane, "apply", "-f", str(CRD_DIR))
    kubectl_ok(
        control_plane, "wait", "--for=condition=Established", "--timeout=60s",
        *(f"crd/{name}" for name in (*CRD_NAMES, *PEERING_CRD_NAMES)), timeout=90,
    )  # fmt: skip
    return control_plane


@pytest.fixture(scope="module")
def operator_kubeconfig(
    kube: ControlPlane, namespaces: Namespaces, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A kubeconfig for the chart's operator ServiceAccount, bound to the chart's RBAC."""
    release = "beamop"
    kubectl_ok(kube, "create", "namespace", namespaces.system)
    objects = chart_operator_rbac(kube, release, namespaces.system)
    apply(kube, *objects)
    account = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
    path = kube.service_account_kubeconfig(
        namespaces.system, account, tmp_path_factory.mktemp("operator") / "kubeconfig"
    )
    yield path
    for obj in objects:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            kube.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], check=False)
    kube.kubectl("delete", "namespace", namespaces.system, "--wait=false", check=False)


@pytest.fixture(scope="module")
def peering_env(kube: ControlPlane, namespaces: Namespaces) -> Iterator[dict[str, str]]:
    """The chart's Kopf peering object (a ClusterKopfPeering: cluster-wide) and the settings
    that name it, so the operator runs in its peering exactly as in a cluster."""
    objects, env = chart_operator_peering(kube, "beamop", namespaces.system)
    apply(kube, *objects)
    yield env
    for obj in objects:
        kube.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], check=False)


@pytest.fixture(scope="module")
def operator(
    kube: ControlPlane,
    operator_kubeconfig: Path,
    peering_env: dict[str, str],
    namespaces: Namespaces,
    stores: Stores,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    for namespace in (namespaces.work, namespaces.other):
        kubectl_ok(kube, "create", "namespace", namespace)
    env = {
        **stores.env(),
        **peering_env,
        # The pod's name in the chart: Kopf's identity in the peering. A restarted (or
        # killed) process keeps it, so it never waits for its own stale keep-alive.
        "POD_ID": "beamop-operator-0",
        "KUBECONFIG": str(operator_kubeconfig),
        "BEAM_NAMESPACES": "",  # cluster-wide, the chart's default
        "BEAM_STATUS_INTERVAL_SECONDS": str(STATUS_INTERVAL_SECONDS),
        "BEAM_LOG_LEVEL": "INFO",
    }
    process = OperatorProcess(env, tmp_path_factory.mktemp("operator-logs")).start()
    yield process
    # Delete our objects while the operator runs: its finalizers must be processed.
    if not process.running:
        process.start()
    for namespace in (namespaces.work, namespaces.other):
        kube.kubectl(
            "delete", "beamcustomers,beamapikeys,beampricelists", "--all", "-n", namespace,
            "--wait=true", "--timeout=60s", check=False, timeout=90,
        )  # fmt: skip
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    process.stop()


@pytest.fixture(scope="module")
def examples(kube: ControlPlane, operator: OperatorProcess) -> Iterator[None]:
    """`kubectl apply -f examples/`, then a bounded wait until the operator made all Ready."""
    existed = kube.kubectl("get", "namespace", ACME, check=False).returncode == 0
    kubectl_ok(kube, "apply", "-f", str(EXAMPLES_DIR))
    for resource in (
        "beamcustomer/cust-acme-1",
        "beamapikey/acme-enforcer",
        "beamapikey/acme-admin",
        "beampricelist/default",
    ):
        wait_ready(kube, ACME, resource, operator)
    yield
    if not existed:
        if not operator.running:
            operator.start()
        kube.kubectl(
            "delete", "-f", str(EXAMPLES_DIR), "--wait=true", "--timeout=90s",
            check=False, timeout=120,
        )  # fmt: skip


@pytest.fixture(scope="module")
def work_keys(
    kube: ControlPlane, operator: OperatorProcess, namespaces: Namespaces
) -> dict[str, str]:
    """Plaintext keys of the work tenant, by role, read from the operator's Secrets."""
    ns = namespaces.work
    apply(kube, api_key(ns, "work-admin", "admin"), api_key(ns, "work-enforcer", "enforcer"))
    keys = {}
    for role in ("admin", "enforcer"):
        wait_ready(kube, ns, f"beamapikey/work-{role}", operator)
        data = secret_data(kube, ns, f"work-{role}-key")
        assert data is not None
        keys[role] = data["api-key"]
    return keys


# --- helpers ---------------------------------------------------------------------------------


def wait_ready(
    kube: ControlPlane,
    namespace: str,
    resource: str,
    operator: OperatorProcess,
    *,
    status: str = "True",
    timeout: float = RECONCILE_WAIT_SECONDS,
) -> dict[str, Any]:
    """The object once its Ready condition has ``status`` for its current generation."""

    def probe() -> dict[str, Any] | None:
        obj = get_json(kube, namespace, resource)
        ready = condition(obj, "Ready")
        if obj is None or ready is None or ready["status"] != status:
            return None
        current = obj["metadata"]["generation"]
        return obj if obj["status"].get("observedGeneration") == current else None

    return wait_for(
        f"{resource} in {namespace} to be Ready={status}", probe, timeout=timeout,
        describe=operator.log_tail,
    )  # fmt: skip


def wait_status(
    kube: ControlPlane, namespace: str, resource: str, operator: OperatorProcess, **expected: Any
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = get_json(kube, namespace, resource)
        status = (obj or {}).get("status") or {}
        return obj if all(status.get(k) == v for k, v in expected.items()) else None

    return wait_for(f"{resource} status {expected}", probe, timeout=RECONCILE_WAIT_SECONDS,
                    describe=operator.log_tail)  # fmt: skip


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def get_balance(service: ServiceProcess, key: str, customer_id: str) -> httpx.Response:
    return httpx.get(
        f"{service.http_url}/v1/balance/{customer_id}",
        headers=bearer(key),
        timeout=HTTP_TIMEOUT_SECONDS,
    )


def check(service: ServiceProcess, key: str, customer_id: str, request_id: str) -> dict[str, Any]:
    response = httpx.post(
        f"{service.http_url}/v1/balance/check",
        headers=bearer(key),
        json={"customer_id": customer_id, "request_id": request_id, "estimated_grains": 1000,
              "buffer_multiplier": 1.0},
        timeout=HTTP_TIMEOUT_SECONDS,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def debit(service: ServiceProcess, key: str, customer_id: str, amount: int, tx: str) -> None:
    response = httpx.post(
        f"{service.http_url}/v1/customers/{customer_id}/debits",
        headers=bearer(key),
        json={"amount_grains": amount, "description": "test debit", "transaction_id": tx},
        timeout=HTTP_TIMEOUT_SECONDS,
    )
    assert response.status_code == 200, response.text


def error_reason(response: httpx.Response) -> str:
    return str(response.json()["error"]["reason"])


def printed_rows(kube: ControlPlane, namespace: str, resource: str) -> list[list[str]]:
    """`kubectl get` as a user sees it: the rows of the table, header first, AGE dropped."""
    lines = kubectl_ok(kube, "get", resource, "-n", namespace).splitlines()
    return [line.split()[:-1] for line in lines]


def dsn(stores: Stores) -> str:
    assert stores.postgres is not None
    return stores.postgres.dsn


# --- 1. the examples -------------------------------------------------------------------------


def test_examples_are_reconciled_and_printed(
    kube: ControlPlane, examples: None, stores: Stores, operator: OperatorProcess
) -> None:
    assert printed_rows(kube, ACME, "beamcustomers") == [
        ["NAME", "CUSTOMER", "BALANCE", "AVAILABLE", "READY"],
        ["cust-acme-1", "cus_acme_1", "60000000", "60000000", "True"],
    ]
    assert printed_rows(kube, ACME, "beamapikeys") == [
        ["NAME", "ROLE", "SECRET", "READY"],
        ["acme-admin", "admin", "acme-admin-key", "True"],
        ["acme-enforcer", "enforcer", "acme-enforcer-key", "True"],
    ]
    assert printed_rows(kube, ACME, "beampricelists") == [
        ["NAME", "MODELS", "READY"],
        ["default", str(EXAMPLE_MODELS), "True"],
    ]
    obj = get_json(kube, ACME, "beamcustomer/cust-acme-1")
    assert obj is not None
    status = obj["status"]
    assert {k: v for k, v in status.items() if k != "conditions"} == {
        "balance": EXAMPLE_BALANCE,
        "reserved": 0,
        "available": EXAMPLE_BALANCE,
        "lifetimeSpentGrains": 0,
        "overageGrains": 0,
        "spentLast24hGrains": 0,
        "appliedCredits": ["welcome", "2026-11-topup"],
        "observedGeneration": obj["metadata"]["generation"],
    }
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Ready", "True", "Reconciled"),
        ("LowBalance", "False", "AboveThreshold"),
        ("Suspended", "False", "Active"),
    ]
    for entry in status["conditions"]:
        assert entry["observedGeneration"] == obj["metadata"]["generation"]
        datetime.fromisoformat(entry["lastTransitionTime"].replace("Z", "+00:00"))
    assert "beam.dev/finalizer" in obj["metadata"]["finalizers"]
    prices = get_json(kube, ACME, "beampricelist/default")
    assert prices is not None
    assert "finalizers" not in prices["metadata"]  # nothing to do on delete
    assert credit_rows(dsn(stores), ACME, "cus_acme_1") == [
        {"transaction_id": "crd:cus_acme_1:welcome", "amount_grains": 10_000_000},
        {"transaction_id": "crd:cus_acme_1:2026-11-topup", "amount_grains": 50_000_000},
    ]
    # The metrics endpoint the chart's probes and ServiceMonitor use.
    metrics = httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).text
    for kind in ("BeamCustomer", "BeamApiKey", "BeamPriceList"):
        ok = f'beam_operator_reconciles_total{{handler="reconcile",kind="{kind}",outcome="ok"}}'
        assert ok in metrics


# --- 2. keys work for their namespace only ---------------------------------------------------


def test_secret_key_works_for_its_namespace_only(
    kube: ControlPlane,
    examples: None,
    operator: OperatorProcess,
    namespaces: Namespaces,
    service: ServiceProcess,
    stores: Stores,
) -> None:
    key_object = get_json(kube, ACME, "beamapikey/acme-enforcer")
    secret = get_json(kube, ACME, "secret/acme-enforcer-key")
    data = secret_data(kube, ACME, "acme-enforcer-key")
    assert key_object is not None
    assert secret is not None
    assert data is not None
    assert sorted(data) == ["api-key", "key-id", "tenant"]
    assert (data["tenant"], data["key-id"]) == (ACME, key_object["status"]["keyId"])
    assert [(o["kind"], o["name"], o["uid"], o.get("controller")) for o in
            secret["metadata"]["ownerReferences"]] == [
        ("BeamApiKey", "acme-enforcer", key_object["metadata"]["uid"], True)
    ]  # fmt: skip
    # Only the hash is stored.
    stored = sql(dsn(stores), "SELECT name, role, key_id FROM api_keys WHERE key_hash = $1",
                 hashlib.sha256(data["api-key"].encode()).hexdigest())  # fmt: skip
    assert stored == [{"name": "acme-enforcer#0", "role": "enforcer", "key_id": data["key-id"]}]

    acme_key = data["api-key"]
    response = get_balance(service, acme_key, "cus_acme_1")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "balance": str(EXAMPLE_BALANCE),
        "reserved": "0",
        "available": str(EXAMPLE_BALANCE),
    }

    other = namespaces.other
    apply(
        kube,
        customer(other, "other-1", "cus_other_1",
                 credits=[{"id": "welcome", "amountGrains": 5_000_000}]),
        api_key(other, "other-admin", "admin"),
    )  # fmt: skip
    wait_ready(kube, other, "beamcustomer/other-1", operator)
    wait_ready(kube, other, "beamapikey/other-admin", operator)
    other_data = secret_data(kube, other, "other-admin-key")
    assert other_data is not None
    other_key = other_data["api-key"]

    foreign = get_balance(service, acme_key, "cus_other_1")
    assert (foreign.status_code, error_reason(foreign)) == (404, "CUSTOMER_NOT_FOUND")
    own = get_balance(service, other_key, "cus_other_1")
    assert (own.status_code, own.json()["balance"]) == (200, "5000000")
    reverse = get_balance(service, other_key, "cus_acme_1")
    assert (reverse.status_code, error_reason(reverse)) == (404, "CUSTOMER_NOT_FOUND")


def test_role_customers_and_expiry_changes_reach_the_service(
    kube: ControlPlane,
    operator: OperatorProcess,
    namespaces: Namespaces,
    service: ServiceProcess,
) -> None:
    ns = namespaces.work
    apply(
        kube,
        customer(ns, "scoped-1", "cus_scoped_1", credits=[{"id": "a", "amountGrains": 100}]),
        customer(ns, "scoped-2", "cus_scoped_2", credits=[{"id": "a", "amountGrains": 200}]),
        api_key(ns, "scoped", "reader", customers=["cus_scoped_1"]),
    )
    for resource in ("beamcustomer/scoped-1", "beamcustomer/scoped-2", "beamapikey/scoped"):
        wait_ready(kube, ns, resource, operator)
    data = secret_data(kube, ns, "scoped-key")
    assert data is not None
    key = data["api-key"]
    assert get_balance(service, key, "cus_scoped_1").status_code == 200
    assert error_reason(get_balance(service, key, "cus_scoped_2")) == "CUSTOMER_NOT_FOUND"

    # Customer list: the key now sees cus_scoped_2 and no longer cus_scoped_1.
    kubectl_ok(kube, "patch", "beamapikey/scoped", "-n", ns, "--type=merge",
               "-p", json.dumps({"spec": {"customers": ["cus_scoped_2"]}}))  # fmt: skip
    wait_for(
        "the customer list to reach the service",
        lambda: (
            get_balance(service, key, "cus_scoped_2").status_code == 200
            and get_balance(service, key, "cus_scoped_1").status_code == 404
        ),
        timeout=10,
    )
    # Role: a reader may not open holds; an enforcer may.
    assert check_status(service, key, "cus_scoped_2", "role-1") == 403
    kubectl_ok(kube, "patch", "beamapikey/scoped", "-n", ns, "--type=merge",
               "-p", json.dumps({"spec": {"role": "enforcer"}}))  # fmt: skip
    wait_for(
        "the role to reach the service",
        lambda: check_status(service, key, "cus_scoped_2", "role-2") == 200,
        timeout=10,
    )
    # Expiry in the past: the key stops working, and the Secret keeps the same key.
    kubectl_ok(kube, "patch", "beamapikey/scoped", "-n", ns, "--type=merge",
               "-p", json.dumps({"spec": {"expiresAt": "2001-01-01T00:00:00Z"}}))  # fmt: skip
    wait_for(
        "the expiry to reach the service",
        lambda: get_balance(service, key, "cus_scoped_2").status_code == 401,
        timeout=10,
    )
    after = secret_data(kube, ns, "scoped-key")
    assert after is not None
    assert after["api-key"] == key


def check_status(service: ServiceProcess, key: str, customer_id: str, request_id: str) -> int:
    response = httpx.post(
        f"{service.http_url}/v1/balance/check",
        headers=bearer(key),
        json={"customer_id": customer_id, "request_id": request_id, "estimated_grains": 1},
        timeout=HTTP_TIMEOUT_SECONDS,
    )
    return response.status_code


# --- 4. exactly once -------------------------------------------------------------------------

BULK_CREDITS = 999  # one below the CRD's maxItems (1000): long enough to interrupt
BULK_AMOUNT = 1_000


def test_credits_apply_exactly_once_across_reapply_crash_and_second_operator(
    kube: ControlPlane,
    operator: OperatorProcess,
    namespaces: Namespaces,
    stores: Stores,
    service: ServiceProcess,
    work_keys: dict[str, str],
) -> None:
    ns, customer_id = namespaces.work, "cus_bulk"
    credits = [{"id": f"c{i:04d}", "amountGrains": BULK_AMOUNT} for i in range(BULK_CREDITS)]
    manifest = customer(ns, "bulk", customer_id, displayName="Bulk", credits=credits)

    # Crash in the middle: the operator is killed once the first credits are in the ledger.
    operator.stop()
    apply(kube, manifest)
    operator.start()
    wait_for("the first credits", lambda: len(credit_rows(dsn(stores), ns, customer_id)) > 0,
             timeout=RECONCILE_WAIT_SECONDS, interval=0.01, describe=operator.log_tail)  # fmt: skip
    operator.kill()
    interrupted = len(credit_rows(dsn(stores), ns, customer_id))
    assert 0 < interrupted < BULK_CREDITS, "the kill did not land mid-reconcile"

    # Restart: the operator finishes the job; nothing is applied twice.
    operator.start()
    wait_status(kube, ns, "beamcustomer/bulk", operator, balance=BULK_CREDITS * BULK_AMOUNT)
    expect_ledger(stores, ns, customer_id, BULK_CREDITS)

    # Re-apply the same manifest, then an edit that re-runs the reconcile.
    apply(kube, manifest)
    manifest["spec"]["displayName"] = "Bulk (renamed)"
    apply(kube, manifest)
    obj = wait_ready(kube, ns, "beamcustomer/bulk", operator)
    assert obj["metadata"]["generation"] == 2
    assert len(obj["status"]["appliedCredits"]) == BULK_CREDITS
    expect_ledger(stores, ns, customer_id, BULK_CREDITS)

    # A second operator process after the first: it resumes every object, idempotently.
    first_log = operator.log_path
    operator.stop()
    operator.start()
    assert operator.log_path != first_log
    wait_for("the second operator to re-run the reconcile of every credit",
             lambda: resumed(operator, "bulk"), timeout=RECONCILE_WAIT_SECONDS,
             describe=operator.log_tail)  # fmt: skip
    expect_ledger(stores, ns, customer_id, BULK_CREDITS)
    manifest["spec"]["credits"].append({"id": "extra", "amountGrains": BULK_AMOUNT})
    apply(kube, manifest)
    wait_status(kube, ns, "beamcustomer/bulk", operator,
                balance=(BULK_CREDITS + 1) * BULK_AMOUNT)  # fmt: skip
    expect_ledger(stores, ns, customer_id, BULK_CREDITS + 1)
    response = get_balance(service, work_keys["admin"], customer_id)
    assert response.json()["balance"] == str((BULK_CREDITS + 1) * BULK_AMOUNT)


def resumed(operator: OperatorProcess, name: str) -> bool:
    """Whether this operator process finished resuming the object (Kopf's log line)."""
    for line in operator.log_text().splitlines():
        if "Resuming is processed: 1 succeeded" in line and f'"name": "{name}"' in line:
            return True
    return False


def expect_ledger(stores: Stores, tenant: str, customer_id: str, count: int) -> None:
    rows = credit_rows(dsn(stores), tenant, customer_id)
    ids = [row["transaction_id"] for row in rows]
    assert len(ids) == count
    assert len(set(ids)) == count
    assert sum(row["amount_grains"] for row in rows) == count * BULK_AMOUNT
    cached = sql(dsn(stores), "SELECT current_balance_grains FROM customers "
                 "WHERE tenant = $1 AND customer_id = $2", tenant, customer_id)  # fmt: skip
    assert cached == [{"current_balance_grains": count * BULK_AMOUNT}]


def test_reused_credit_id_with_another_amount_is_reported_not_applied(
    kube: ControlPlane, operator: OperatorProcess, namespaces: Namespaces, stores: Stores
) -> None:
    ns = namespaces.work
    original = customer(ns, "reuse", "cus_reuse", credits=[{"id": "a", "amountGrains": 500}])
    apply(kube, original)
    wait_ready(kube, ns, "beamcustomer/reuse", operator)
    # The schema forbids changing an entry's amount; dropping it and re-adding it with
    # another amount in a later apply gets past the schema, not past the ledger.
    apply(kube, customer(ns, "reuse", "cus_reuse", credits=[]))
    wait_ready(kube, ns, "beamcustomer/reuse", operator)
    apply(kube, customer(ns, "reuse", "cus_reuse", credits=[{"id": "a", "amountGrains": 900}]))
    obj = wait_ready(kube, ns, "beamcustomer/reuse", operator, status="False")
    ready = condition(obj, "Ready")
    assert ready is not None
    assert ready["reason"] == "CreditConflict"
    assert "credits a were applied earlier with another amount" in ready["message"]
    assert obj["status"]["balance"] == 500
    assert credit_rows(dsn(stores), ns, "cus_reuse") == [
        {"transaction_id": "crd:cus_reuse:a", "amount_grains": 500}
    ]


# --- 5. revocation, rotation, closing, suspension --------------------------------------------


class Poller:
    """GET a balance with one key every 50 ms in a thread; remembers (time, status)."""

    def __init__(self, service: ServiceProcess, key: str, customer_id: str) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(service, key, customer_id))

    def _run(self, service: ServiceProcess, key: str, customer_id: str) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_SECONDS) as client:
            while not self._stop.is_set():
                response = client.get(f"{service.http_url}/v1/balance/{customer_id}",
                                      headers=bearer(key))  # fmt: skip
                self.samples.append((time.monotonic(), response.status_code))
                self._stop.wait(0.05)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def first(self, status: int, after: float = 0.0) -> float | None:
        return next((t for t, s in self.samples if s == status and t >= after), None)

    def wait_first(self, status: int, timeout: float) -> float:
        return wait_for(f"a {status} answer", lambda: self.first(status), timeout=timeout,
                        interval=0.02)  # fmt: skip


def test_deleting_a_key_revokes_it_within_a_second(
    kube: ControlPlane,
    operator: OperatorProcess,
    namespaces: Namespaces,
    service: ServiceProcess,
) -> None:
    ns = namespaces.work
    apply(kube, customer(ns, "revoke-target", "cus_revoke", credits=[{"id": "a",
          "amountGrains": 1}]), api_key(ns, "doomed", "reader"))  # fmt: skip
    wait_ready(kube, ns, "beamcustomer/revoke-target", operator)
    wait_ready(kube, ns, "beamapikey/doomed", operator)
    data = secret_data(kube, ns, "doomed-key")
    assert data is not None
    with Poller(service, data["api-key"], "cus_revoke") as poller:
        poller.wait_first(200, timeout=5)
        kubectl_ok(kube, "delete", "beamapikey/doomed", "-n", ns, "--wait=true", "--timeout=30s")
        gone = time.monotonic()  # the finalizer is removed: the operator's deletion finished
        rejected = poller.wait_first(401, timeout=5)
    assert rejected - gone <= 1.0, f"rejected {rejected - gone:.3f}s after the deletion"
    # Once rejected, never accepted again.
    assert all(status == 401 for t, status in poller.samples if t >= rejected)
    wait_for("the key's Secret to be deleted",
             lambda: secret_data(kube, ns, "doomed-key") is None, timeout=30)  # fmt: skip


def test_a_lost_secret_gets_a_new_key_and_the_lost_key_is_revoked(
    kube: ControlPlane,
    operator: OperatorProcess,
    namespaces: Namespaces,
    service: ServiceProcess,
) -> None:
    ns = namespaces.work
    apply(kube, customer(ns, "lost-target", "cus_lost", credits=[{"id": "a",
          "amountGrains": 3}]), api_key(ns, "lost", "reader"))  # fmt: skip
    wait_ready(kube, ns, "beamcustomer/lost-target", operator)
    before = wait_ready(kube, ns, "beamapikey/lost", operator)
    lost = secret_data(kube, ns, "lost-key")
    assert lost is not None
    kubectl_ok(kube, "delete", "secret/lost-key", "-n", ns, "--wait=true")
    renewed = wait_for("a re-issued Secret", lambda: secret_data(kube, ns, "lost-key"),
                       timeout=RECONCILE_WAIT_SECONDS, describe=operator.log_tail)  # fmt: skip
    assert renewed["api-key"] != lost["api-key"]
    wait_status(kube, ns, "beamapikey/lost", operator, keyId=renewed["key-id"])
    assert renewed["key-id"] != before["status"]["keyId"]
    assert get_balance(service, renewed["api-key"], "cus_lost").status_code == 200
    assert get_balance(service, lost["api-key"], "cus_lost").status_code == 401

    def reissued() -> list[str]:
        return [e["type"] for e in events_for(kube, ns, "lost") if e["reason"] == "KeyReissued"]

    assert wait_for("a KeyReissued event", reissued, timeout=10) == ["Warning"]


def test_a_secret_the_key_does_not_own_is_never_overwritten(
    kube: ControlPlane, operator: OperatorProcess, namespaces: Namespaces
) -> None:
    ns = namespaces.work
    kubectl_ok(kube, "create", "secret", "generic", "taken-key", "-n", ns,
               "--from-literal=api-key=someone-elses")  # fmt: skip
    apply(kube, api_key(ns, "taken", "reader"))

    def refused() -> dict[str, Any] | None:
        ready = condition(get_json(kube, ns, "beamapikey/taken"), "Ready")
        return ready if ready is not None and ready["status"] == "False" else None

    ready = wait_for("Ready=False", refused, timeout=RECONCILE_WAIT_SECONDS,
                     describe=operator.log_tail)  # fmt: skip
    assert ready["reason"] == "SecretNotOwned"
    assert ready["message"].startswith("Secret taken-key exists and is not owned by this")
    assert secret_data(kube, ns, "taken-key") == {"api-key": "someone-elses"}
    # Once the other Secret is gone, a retry issues the key.
    kubectl_ok(kube, "delete", "secret/taken-key", "-n", ns)
    wait_ready(kube, ns, "beamapikey/taken", operator)
    issued = secret_data(kube, ns, "taken-key")
    assert issued is not None
    assert issued["api-key"].startswith("beam_sk_")


def test_rotation_keeps_the_old_key_for_the_grace_period_only(
    kube: ControlPlane,
    operator: OperatorProcess,
    namespaces: Namespaces,
    service: ServiceProcess,
) -> None:
    ns, grace = namespaces.work, 3
    apply(kube, customer(ns, "rotate-target", "cus_rotate", credits=[{"id": "a",
          "amountGrains": 7}]), api_key(ns, "rotating", "reader",
          rotation={"generation": 0, "gracePeriodSeconds": grace}))  # fmt: skip
    wait_ready(kube, ns, "beamcustomer/rotate-target", operator)
    before = wait_ready(kube, ns, "beamapikey/rotating", operator)
    old = secret_data(kube, ns, "rotating-key")
    assert old is not None
    old_key = old["api-key"]

    with Poller(service, old_key, "cus_rotate") as poller:
        kubectl_ok(kube, "patch", "beamapikey/rotating", "-n", ns, "--type=merge",
                   "-p", json.dumps({"spec": {"rotation": {"generation": 1}}}))  # fmt: skip
        after = wait_status(kube, ns, "beamapikey/rotating", operator, rotationGeneration=1)
        rotated = time.monotonic()
        expires_at = datetime.fromisoformat(
            after["status"]["previousKeyExpiresAt"].replace("Z", "+00:00")
        )
        new = secret_data(kube, ns, "rotating-key")
        assert new is not None
        assert new["api-key"] != old_key
        assert new["key-id"] == after["status"]["keyId"] != before["status"]["keyId"]
        assert get_balance(service, new["api-key"], "cus_rotate").status_code == 200
        rejected = poller.wait_first(401, timeout=grace + 5)
        rejected_wall = time.time() - (time.monotonic() - rejected)
    assert poller.first(200, after=rotated) is not None, "old key refused during the grace"
    # previousKeyExpiresAt has seconds precision: the real end lies within [shown, shown+1).
    late = rejected_wall - expires_at.timestamp()
    assert 0.0 <= late <= 1.0 + 0.5, f"old key refused {late:+.3f}s from the end of grace"
    assert get_balance(service, new["api-key"], "cus_rotate").status_code == 200
    # The timer clears previousKeyExpiresAt once that moment has passed.
    wait_status(kube, ns, "beamapikey/rotating", operator, previousKeyExpiresAt=None)


def test_deleting_a_customer_blocks_checks_and_keeps_the_ledger(
    kube: ControlPlane,
    operator: OperatorProcess,
    namespaces: Namespaces,
    service: ServiceProcess,
    stores: Stores,
    work_keys: dict[str, str],
) -> None:
    ns, customer_id = namespaces.work, "cus_closing"
    apply(kube, customer(ns, "closing", customer_id,
                         credits=[{"id": "a", "amountGrains": 1_000_000}]))  # fmt: skip
    wait_ready(kube, ns, "beamcustomer/closing", operator)
    assert check(service, work_keys["enforcer"], customer_id, "before")["approved"] is True
    kubectl_ok(kube, "delete", "beamcustomer/closing", "-n", ns, "--wait=true", "--timeout=30s")
    refused = check(service, work_keys["enforcer"], customer_id, "after")
    assert (refused["approved"], refused["rejection_reason"]) == (False, "CUSTOMER_CLOSED")
    assert credit_rows(dsn(stores), ns, customer_id) == [
        {"transaction_id": "crd:cus_closing:a", "amount_grains": 1_000_000}
    ]
    row = sql(dsn(stores), "SELECT state, current_balance_grains FROM customers "
              "WHERE tenant = $1 AND customer_id = $2", ns, customer_id)  # fmt: skip
    assert row == [{"state": "closed", "current_balance_grains": 1_000_000}]


def test_suspended_customer_is_refused_until_resumed(
    kube: ControlPlane,
    operator: OperatorProcess,
    namespaces: Namespaces,
    service: ServiceProcess,
    work_keys: dict[str, str],
) -> None:
    ns, customer_id = namespaces.work, "cus_pausing"
    manifest = customer(ns, "pausing", customer_id, credits=[{"id": "a", "amountGrains": 10_000}])
    apply(kube, manifest)
    wait_ready(kube, ns, "beamcustomer/pausing", operator)
    manifest["spec"]["suspended"] = True
    apply(kube, manifest)
    obj = wait_ready(kube, ns, "beamcustomer/pausing", operator)
    suspended = condition(obj, "Suspended")
    assert suspended is not None
    assert (suspended["status"], suspended["reason"]) == ("True", "SuspendedBySpec")
    refused = check(service, work_keys["enforcer"], customer_id, "while-suspended")
    assert (refused["approved"], refused["rejection_reason"]) == (False, "CUSTOMER_SUSPENDED")
    manifest["spec"]["suspended"] = False
    apply(kube, manifest)
    wait_ready(kube, ns, "beamcustomer/pausing", operator)
    assert check(service, work_keys["enforcer"], customer_id, "resumed")["approved"] is True


def test_low_balance_and_depletion_emit_events_on_transitions(
    kube: ControlPlane,
    operator: OperatorProcess,
    namespaces: Namespaces,
    service: ServiceProcess,
    work_keys: dict[str, str],
) -> None:
    ns, customer_id = namespaces.work, "cus_lowbal"
    manifest = customer(ns, "lowbal", customer_id, lowBalanceThresholdGrains=1_000_000,
                        credits=[{"id": "a", "amountGrains": 2_000_000}])  # fmt: skip
    apply(kube, manifest)
    wait_ready(kube, ns, "beamcustomer/lowbal", operator)

    def reasons() -> list[str]:
        return sorted(e["reason"] for e in events_for(kube, ns, "lowbal"))

    debit(service, work_keys["admin"], customer_id, 1_500_000, "low-1")
    obj = wait_status(kube, ns, "beamcustomer/lowbal", operator, available=500_000)
    low = condition(obj, "LowBalance")
    assert low is not None
    assert (low["status"], low["reason"]) == ("True", "BelowThreshold")
    wait_for("a LowBalance event", lambda: "LowBalance" in reasons(), timeout=10)

    debit(service, work_keys["admin"], customer_id, 500_000, "low-2")
    obj = wait_status(kube, ns, "beamcustomer/lowbal", operator, available=0)
    low = condition(obj, "LowBalance")
    assert low is not None
    assert (low["status"], low["reason"]) == ("True", "Depleted")
    wait_for("a BalanceDepleted event", lambda: "BalanceDepleted" in reasons(), timeout=10)

    manifest["spec"]["credits"].append({"id": "b", "amountGrains": 5_000_000})
    apply(kube, manifest)
    wait_status(kube, ns, "beamcustomer/lowbal", operator, available=5_000_000)
    wait_for("a BalanceRestored event", lambda: "BalanceRestored" in reasons(), timeout=10)
    # Several timer passes later: still one event per transition.
    time.sleep(3 * STATUS_INTERVAL_SECONDS)
    assert [r for r in reasons() if r in ("LowBalance", "BalanceDepleted", "BalanceRestored")
            ] == ["BalanceDepleted", "BalanceRestored", "LowBalance"]  # fmt: skip
    warnings = [e for e in events_for(kube, ns, "lowbal") if e["reason"] == "LowBalance"]
    assert warnings[0]["type"] == "Warning"
    assert warnings[0]["message"] == (
        "available balance 500000 grains is below the low-balance threshold of 1000000 grains"
    )


# --- 6. least privilege ----------------------------------------------------------------------


def test_operator_runs_as_the_charts_service_account(
    kube: ControlPlane, operator: OperatorProcess, operator_kubeconfig: Path,
    namespaces: Namespaces,
) -> None:  # fmt: skip
    assert operator.env["KUBECONFIG"] == str(operator_kubeconfig)
    whoami = json.loads(kubectl_ok(kube, "auth", "whoami", "-o", "json",
                                   kubeconfig=operator_kubeconfig))  # fmt: skip
    assert whoami["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{namespaces.system}:beamop-operator"
    )

    def can(*args: str) -> str:
        result = kube.kubectl("auth", "can-i", *args, check=False,
                              kubeconfig=operator_kubeconfig)  # fmt: skip
        return result.stdout.strip()

    assert can("patch", "beamcustomers/status", "-n", ACME) == "yes"
    assert can("create", "secrets", "-n", ACME) == "yes"
    assert can("create", "events", "-n", ACME) == "yes"
    assert can("get", "pods", "-n", ACME) == "no"
    assert can("create", "clusterrolebindings") == "no"
    # Kopf peering: its own ClusterKopfPeering only, and never creating or deleting one.
    peering = f"clusterkopfpeerings.kopf.dev/{operator.env['BEAM_PEERING_NAME']}"
    assert can("patch", peering) == "yes"
    assert can("patch", "clusterkopfpeerings.kopf.dev/another") == "no"
    assert can("create", "clusterkopfpeerings.kopf.dev") == "no"
    assert can("create", "kopfpeerings.kopf.dev", "-n", ACME) == "no"
    assert can("delete", "beamcustomers", "-n", ACME) == "no"


# --- 7. beam apply without a cluster ---------------------------------------------------------


def test_beam_apply_produces_the_same_state_without_a_cluster(
    examples: None, stores: Stores, tmp_path: Path
) -> None:
    apart = f"beam_apply_{uuid.uuid4().hex[:8]}"
    execute(dsn(stores), f'CREATE DATABASE "{apart}"')
    apart_dsn = dsn(stores).rsplit("/", 1)[0] + f"/{apart}"
    env = {**stores.env(), "BEAM_DATABASE_URL": apart_dsn,
           "BEAM_REDIS_URL": stores.env()["BEAM_REDIS_URL"].rsplit("/", 1)[0] + "/1"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "beam.cli.main", "apply", "-f", str(EXAMPLES_DIR),
         "--state-dir", str(tmp_path)],
        env={**_environ(), **env}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        f"beampricelist/default (acme): {EXAMPLE_MODELS} models",
        f"beamcustomer/cust-acme-1 (acme): balance {EXAMPLE_BALANCE}, "
        f"available {EXAMPLE_BALANCE}, credits applied 2",
    ]
    assert [line.split(":")[0] for line in lines[2:]] == [
        "beamapikey/acme-enforcer (acme)", "beamapikey/acme-admin (acme)",
    ]  # fmt: skip
    for query in (
        """SELECT customer_id, display_name, current_balance_grains, state,
                  low_balance_threshold_grains FROM customers WHERE tenant = 'acme'""",
        """SELECT customer_id, transaction_id, amount_grains FROM transactions
           WHERE tenant = 'acme' ORDER BY transaction_id""",
        """SELECT DISTINCT ON (model) model, input_grains_per_million,
                  output_grains_per_million, cached_input_grains_per_million
           FROM model_prices WHERE tenant = 'acme' ORDER BY model, version DESC""",
        """SELECT name, role, customers, expires_at, revoked_at FROM api_keys
           WHERE tenant = 'acme' ORDER BY name""",
    ):
        via_cluster, via_apply = sql(dsn(stores), query), sql(apart_dsn, query)
        assert via_apply == via_cluster, query
        assert via_apply  # something to compare
    balances = sql(apart_dsn, "SELECT current_balance_grains FROM customers")
    assert balances == [{"current_balance_grains": EXAMPLE_BALANCE}]
    models = sql(apart_dsn, "SELECT count(DISTINCT model) AS n FROM model_prices")
    assert models == [{"n": EXAMPLE_MODELS}]


def _environ() -> dict[str, str]:
    """This process's environment without BEAM_* (the child gets exactly the test's)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BEAM_")}


def test_a_second_customer_with_the_same_id_is_refused_and_its_deletion_closes_nothing(
    kube: ControlPlane,
    operator: OperatorProcess,
    namespaces: Namespaces,
    service: ServiceProcess,
    work_keys: dict[str, str],
) -> None:
    ns, customer_id = namespaces.work, "cus_twice"
    apply(kube, customer(ns, "first", customer_id,
                         credits=[{"id": "a", "amountGrains": 1_000_000}]))  # fmt: skip
    wait_ready(kube, ns, "beamcustomer/first", operator)
    apply(kube, customer(ns, "second", customer_id))

    def refused() -> dict[str, Any] | None:
        ready = condition(get_json(kube, ns, "beamcustomer/second"), "Ready")
        return ready if ready and ready["status"] == "False" else None

    ready = wait_for("the second BeamCustomer to be refused", refused,
                     timeout=RECONCILE_WAIT_SECONDS, describe=operator.log_tail)  # fmt: skip
    assert ready["reason"] == "CustomerExists"
    assert "managed by another resource" in ready["message"]
    kubectl_ok(kube, "delete", "beamcustomer/second", "-n", ns, "--wait=true", "--timeout=30s")
    assert check(service, work_keys["enforcer"], customer_id, "still-open")["approved"] is True


def test_kopf_liveness_endpoint_answers(operator: OperatorProcess) -> None:
    """The chart's liveness probe is GET /healthz on Kopf's own endpoint (health_port)."""
    response = httpx.get(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=5)
    assert response.status_code == 200

"""End to end on kind: build the image, `helm install`, enforce, survive a Redis master loss.

Needs a Docker engine (kind runs Kubernetes nodes as containers) and network access for
kind's node image. Where Docker is missing the test is skipped with that reason: the
control-plane tests in tests/k8s cover the API objects, RBAC and the operator without
containers. Run it on a machine with Docker:

    .venv/bin/pytest tests/e2e/test_kind.py -v

`KIND_PATH` points at a kind binary (else pytest-kind downloads one); kubectl and helm come
from the control-plane harness (hack/controlplane/build.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.controlplane import find_or_build_binaries

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "beam:e2e"
RELEASE = "beam"
NAMESPACE = "beam-system"

pytestmark = pytest.mark.e2e


def _docker_available() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        return f"no Docker engine reachable ({probe.stderr.strip().splitlines()[-1:]})"
    return None


@pytest.fixture(scope="module")
def kind_cluster() -> Iterator[object]:
    missing = _docker_available()
    if missing:
        pytest.skip(f"kind e2e needs a Docker engine: {missing}")
    from pytest_kind import KindCluster

    bin_dir = find_or_build_binaries()
    kind_path = os.environ.get("KIND_PATH") or shutil.which("kind")
    cluster = KindCluster(
        "beam-e2e",
        kubectl_path=bin_dir / "kubectl",
        kind_path=Path(kind_path) if kind_path else None,
    )
    cluster.create()
    subprocess.run(["docker", "build", "-t", IMAGE, str(ROOT)], check=True, timeout=1200)
    cluster.load_docker_image(IMAGE)
    try:
        yield cluster
    finally:
        cluster.delete()


def _helm(cluster: object, *args: str) -> str:
    helm = find_or_build_binaries() / "helm"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig_path)}  # type: ignore[attr-defined]
    return subprocess.run(
        [str(helm), *args], env=env, check=True, capture_output=True, text=True, timeout=900
    ).stdout


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (httpx.HTTPError, subprocess.CalledProcessError):
            pass
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_install_enforce_and_survive_redis_failover(kind_cluster: object) -> None:
    cluster = kind_cluster
    _helm(
        cluster, "install", RELEASE, str(ROOT / "charts/beam"), "--namespace", NAMESPACE,
        "--create-namespace", "--wait", "--timeout", "10m",
        "--set", "image.registry=", "--set", "image.repository=beam", "--set", "image.tag=e2e",
        "--set", "image.pullPolicy=Never",
    )  # fmt: skip
    cluster.kubectl("apply", "-f", str(ROOT / "examples"))  # type: ignore[attr-defined]
    secret = "acme-enforcer-key"

    def key_ready() -> bool:
        out = cluster.kubectl("get", "secret", secret, "-n", "acme", "-o", "json")  # type: ignore[attr-defined]
        return bool(json.loads(out)["data"].get("api-key"))

    _wait(key_ready, 120, "the operator to write the enforcer key")
    import base64

    raw = cluster.kubectl("get", "secret", secret, "-n", "acme", "-o", "json")  # type: ignore[attr-defined]
    key = base64.b64decode(json.loads(raw)["data"]["api-key"]).decode()
    headers = {"Authorization": f"Bearer {key}"}
    service = f"service/{RELEASE}"
    with cluster.port_forward(service, 8080, "-n", NAMESPACE) as port:  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: httpx.get(f"{base}/v1/balance/cus_acme_1", headers=headers).status_code
              == 200, 120, "the customer to be reconciled")  # fmt: skip
        _lifecycle(base, headers, "e2e-1")
    # Kill the Redis master: Sentinel promotes a replica and the service follows it.
    # Pod 0 is the first master (the chart bootstraps it as master when no Sentinel answers).
    kubectl = cluster.kubectl  # type: ignore[attr-defined]
    kubectl("delete", "pod", f"{RELEASE}-redis-0", "-n", NAMESPACE, "--wait=false", "--force")
    with cluster.port_forward(service, 8080, "-n", NAMESPACE) as port:  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _lifecycle(base, headers, f"e2e-after-{time.time_ns()}"), 180,
              "enforcement to resume through Sentinel")  # fmt: skip


def _lifecycle(base: str, headers: dict[str, str], request_id: str) -> bool:
    check = httpx.post(f"{base}/v1/balance/check", headers=headers, json={
        "customer_id": "cus_acme_1", "request_id": request_id, "estimated_grains": 50_000,
        "buffer_multiplier": 1.2, "metadata": {"model": "gpt-4"}}).json()  # fmt: skip
    assert check["approved"] is True
    assert check["reserved_grains"] == "60000"
    deduct = httpx.post(f"{base}/v1/balance/deduct", headers=headers, json={
        "customer_id": "cus_acme_1", "request_id": request_id, "tokens_consumed": 50,
        "request_token": check["request_token"], "model": "gpt-4", "is_completion": True,
        "sequence_number": 1}).json()  # fmt: skip
    assert deduct["success"] is True
    assert deduct["consumed_grains"] == "3000"
    final = httpx.post(f"{base}/v1/balance/finalize", headers=headers, json={
        "customer_id": "cus_acme_1", "request_id": request_id, "status": "COMPLETED_SUCCESS",
        "actual_prompt_tokens": 234, "actual_completion_tokens": 487,
        "total_actual_cost_grains": 48_700, "model": "gpt-4"}).json()  # fmt: skip
    assert final["refunded_grains"] == "11300"
    return True

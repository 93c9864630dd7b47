"""End to end on kind: build the image, then the scenario of tests/e2e/cluster_scenario.py.

Needs a Docker engine (kind runs Kubernetes nodes as containers) and network access for
kind's node image and the chart's public Redis and TimescaleDB images. Where Docker is missing
the test is skipped with that reason; on this project's machines (no Docker) the same scenario
runs on real pods through `make e2e-cluster` (tests/e2e/test_cluster.py). Run it on a machine
with Docker:

    .venv/bin/pytest tests/e2e/test_kind.py -v

`KIND_PATH` points at a kind binary (else pytest-kind downloads one); kubectl and helm come
from the control-plane harness (hack/controlplane/build.sh).

Differences from the one-node cluster, and why: the chart's own public images for Redis,
Sentinel and TimescaleDB (the registries are reachable), Services through `kubectl
port-forward` (this process is outside the cluster's network), and no rolling restart under
load (a port-forward to a Service is pinned to one pod, which the restart removes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import cluster_scenario as scenario
from tests.support.controlplane import find_or_build_binaries

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "beam:e2e"

pytestmark = pytest.mark.e2e

# cluster-values.yaml names the locally built images; kind pulls the chart's public ones.
KIND_SETS = (
    "image.registry=", "image.repository=beam", "image.tag=e2e", "image.pullPolicy=Never",
    "redis.image.registry=docker.io", "redis.image.repository=redis",
    "redis.image.tag=7.4-alpine", "redis.image.pullPolicy=IfNotPresent",
    "redis.sentinel.image.registry=docker.io", "redis.sentinel.image.repository=redis",
    "redis.sentinel.image.tag=7.4-alpine", "redis.sentinel.image.pullPolicy=IfNotPresent",
    "timescaledb.image.registry=docker.io", "timescaledb.image.repository=timescale/timescaledb",
    "timescaledb.image.tag=2.17.2-pg16", "timescaledb.image.pullPolicy=IfNotPresent",
)  # fmt: skip


def _docker_available() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        return f"no Docker engine reachable ({probe.stderr.strip().splitlines()[-1:]})"
    return None


class KindAccess:
    """A pytest-kind cluster as the scenario's `Cluster`."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.bin_dir = find_or_build_binaries()
        self.env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig_path)}

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return scenario.run([str(self.bin_dir / "kubectl"), *args], stdin=stdin, env=self.env)

    def helm(self, *args: str) -> str:
        return scenario.run([str(self.bin_dir / "helm"), *args], env=self.env)

    @contextlib.contextmanager
    def service_address(self, service: str, port: int) -> Iterator[str]:
        with self.cluster.port_forward(
            f"service/{service}", port, "-n", scenario.NAMESPACE
        ) as local:
            yield f"127.0.0.1:{local}"


@pytest.fixture(scope="module")
def kind_cluster() -> Iterator[KindAccess]:
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
        yield KindAccess(cluster)
    finally:
        cluster.delete()


@pytest.mark.timeout(2400)  # image build, install, failover, upgrades, uninstall
def test_install_enforce_survive_failover_upgrade_uninstall(kind_cluster: KindAccess) -> None:
    scenario.step_install(kind_cluster, KIND_SETS)
    with scenario.connected(kind_cluster) as run:
        scenario.step_tenant(kind_cluster, run)
        scenario.step_walkthrough(run)
        scenario.step_redis_failover(kind_cluster, run)
        scenario.step_noop_upgrades(kind_cluster, KIND_SETS)
        scenario.step_integrity_cronjob(kind_cluster)
    scenario.step_uninstall(kind_cluster)

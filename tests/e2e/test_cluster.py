"""The chart end to end on the one-node cluster of hack/cluster: real pods, no Docker.

Run by `make e2e-cluster` (hack/cluster/e2e.sh), which builds the binaries and images, starts
the cluster, runs this module inside the cluster's network namespace with
BEAM_E2E_CLUSTER_DIR set, stops the cluster and checks the host is as it was. Anywhere else the
module skips with that reason. The steps (tests/e2e/cluster_scenario.py) run in file order and
build on each other; a failed step skips the rest.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import cluster_scenario as scenario

pytestmark = pytest.mark.e2e

CLUSTER_DIR = os.environ.get("BEAM_E2E_CLUSTER_DIR", "")


class LocalCluster:
    """hack/cluster's cluster, seen from inside its network namespace."""

    def __init__(self, workdir: Path) -> None:
        env = dict(
            line.split("=", 1)
            for line in (workdir / "cluster.env").read_text().splitlines()
            if "=" in line
        )
        self.kubeconfig = env["KUBECONFIG"]
        self.bin_dir = Path(env["CONTROLPLANE_BIN_DIR"])
        helm_home = workdir / "helm"
        self.env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }

    def _run(self, command: list[str], stdin: str | None = None) -> str:
        result = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=900,
            env=self.env, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} -> {result.returncode}: {result.stderr}")
        return result.stdout

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self._run([str(self.bin_dir / "kubectl"), "--request-timeout", "60s", *args], stdin)

    def helm(self, *args: str) -> str:
        return self._run([str(self.bin_dir / "helm"), *args])

    @contextlib.contextmanager
    def service_address(self, service: str, port: int) -> Iterator[str]:
        cluster_ip = self.kubectl(
            "get", "service", service, "-n", scenario.NAMESPACE, "-o", "jsonpath={.spec.clusterIP}"
        )
        yield f"{cluster_ip}:{port}"


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    if not CLUSTER_DIR:
        pytest.skip("runs inside hack/cluster's cluster: make e2e-cluster (needs root)")
    return LocalCluster(Path(CLUSTER_DIR))


RUN = scenario.Run()


@pytest.fixture(autouse=True)
def _in_order(request: pytest.FixtureRequest) -> None:
    if request.session.testsfailed:
        pytest.skip("an earlier step failed; the steps build on each other")


@pytest.mark.timeout(900)  # the images are present: installing takes 1-3 minutes on 2 cores
def test_install_every_pod_ready(cluster: LocalCluster) -> None:
    scenario.step_install(cluster)
    # ClusterIPs: usable for the whole module, not only inside the context.
    with scenario.connected(cluster) as run:
        RUN.http, RUN.grpc, RUN.dsn = run.http, run.grpc, run.dsn


@pytest.mark.timeout(300)
def test_operator_reconciles_the_examples(cluster: LocalCluster) -> None:
    scenario.step_tenant(cluster, RUN)


@pytest.mark.timeout(120)
def test_readme_walkthrough_over_rest_and_grpc(cluster: LocalCluster) -> None:
    scenario.step_walkthrough(RUN)


@pytest.mark.timeout(600)
def test_redis_master_loss_under_load(cluster: LocalCluster) -> None:
    scenario.step_redis_failover(cluster, RUN)
    print("failover load (acknowledged, failed, settled):", RUN.load_counts["failover-"])


@pytest.mark.timeout(900)
def test_two_noop_upgrades_restart_nothing(cluster: LocalCluster) -> None:
    scenario.step_noop_upgrades(cluster)


@pytest.mark.timeout(600)
def test_rolling_restart_of_the_service_under_load(cluster: LocalCluster) -> None:
    scenario.step_rolling_restart(cluster, RUN)
    print("rollout load (acknowledged, failed, settled):", RUN.load_counts["rollout-"])


@pytest.mark.timeout(300)
def test_integrity_cronjob_passes(cluster: LocalCluster) -> None:
    scenario.step_integrity_cronjob(cluster)


@pytest.mark.timeout(600)
def test_uninstall_leaves_nothing(cluster: LocalCluster) -> None:
    scenario.step_uninstall(cluster)

"""The chart end to end on the one-node cluster of hack/cluster: real pods, no Docker.

Run by `make e2e-cluster` (hack/cluster/e2e.sh), which builds the binaries and images, starts
the cluster, runs this module inside the cluster's network namespace with
BEAM_E2E_CLUSTER_DIR set, stops the cluster and checks the host is as it was. Anywhere else the
module skips with that reason. The steps (tests/e2e/cluster_scenario.py) run in file order and
build on each other; a failed step skips the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from beam_client import AsyncBeamClient
from beam_client.types import RequestStatus

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


class State:
    """What one step leaves for the next."""

    tenant: scenario.Tenant | None = None
    balance = scenario.INITIAL_GRAINS
    http = ""
    grpc = ""
    dsn = ""


@pytest.fixture(autouse=True)
def _in_order(request: pytest.FixtureRequest) -> None:
    if request.session.testsfailed:
        pytest.skip("an earlier step failed; the steps build on each other")


def _addresses(cluster: LocalCluster) -> None:
    with cluster.service_address(scenario.RELEASE, 8080) as http:
        State.http = f"http://{http}"
    with cluster.service_address(scenario.RELEASE, 9090) as grpc_address:
        State.grpc = grpc_address
    with cluster.service_address(f"{scenario.RELEASE}-timescaledb", 5432) as db:
        password = scenario.secret_value(
            cluster, scenario.NAMESPACE, f"{scenario.RELEASE}-timescaledb-auth", "password"
        )
        State.dsn = f"postgresql://beam:{password}@{db}/beam"


@pytest.mark.timeout(900)  # images are present: installing takes 1-3 minutes on 2 cores
def test_install_every_pod_ready(cluster: LocalCluster) -> None:
    scenario.install(cluster)
    ready = scenario.wait_all_pods_ready(cluster)
    scenario.assert_chart_pods(ready)
    _addresses(cluster)


@pytest.mark.timeout(300)
def test_operator_reconciles_the_examples(cluster: LocalCluster) -> None:
    State.tenant = scenario.apply_tenant(cluster)


@pytest.mark.timeout(120)
def test_readme_walkthrough_over_rest_and_grpc(cluster: LocalCluster) -> None:
    assert State.tenant is not None
    key = State.tenant.enforcer_key
    State.balance = scenario.rest_walkthrough(State.http, key, "walk-rest", State.balance)
    State.balance = asyncio.run(
        scenario.grpc_walkthrough(State.grpc, key, "walk-grpc", State.balance)
    )
    assert State.balance == scenario.INITIAL_GRAINS - 2 * scenario.WALK_CHARGED
    ledger = asyncio.run(scenario.read_ledger(State.dsn, "walk-"))
    assert ledger.costs == {"walk-rest": scenario.WALK_CHARGED, "walk-grpc": scenario.WALK_CHARGED}
    assert ledger.balance_grains == State.balance
    assert ledger.charged_grains == 2 * scenario.WALK_CHARGED


def _redis_role(cluster: LocalCluster, pod: str) -> str:
    out = cluster.kubectl(
        "exec", "-n", scenario.NAMESPACE, pod, "-c", "redis", "--", "sh", "-c",
        'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli --raw INFO replication',
    )  # fmt: skip
    for line in out.splitlines():
        if line.startswith("role:"):
            return line.split(":", 1)[1].strip()
    return ""


async def _settle_leftovers(result: scenario.LoadResult) -> None:
    """Finalize again every request whose Finalize was not acknowledged (same ids: idempotent)."""
    assert State.tenant is not None
    async with AsyncBeamClient(State.grpc, State.tenant.enforcer_key) as beam:
        for request_id, token in result.tokens.items():
            if request_id in result.acknowledged:
                continue
            final = await beam.finalize_request(
                scenario.CUSTOMER, request_id, status=RequestStatus.COMPLETED_SUCCESS,
                request_token=token, model="gpt-4", total_cost_grains=scenario.LOAD_COST,
            )  # fmt: skip
            assert final.charged_grains == scenario.LOAD_COST, final


def _assert_settled(prefix: str, result: scenario.LoadResult) -> None:
    """Exact money: every acknowledged (and re-settled) request charged LOAD_COST once, holds
    nobody settled expired at 0, the cached balance equals the ledger's."""
    assert State.tenant is not None

    def holds_released() -> bool:
        balance = scenario.httpx.get(
            f"{State.http}/v1/balance/{scenario.CUSTOMER}",
            headers={"Authorization": f"Bearer {State.tenant.enforcer_key}"},  # type: ignore[union-attr]
            timeout=10,
        ).json()
        return balance["reserved"] == "0"

    scenario.wait_until(holds_released, 120, "every hold settled or expired")
    ledger = asyncio.run(scenario.read_ledger(State.dsn, prefix))
    settled = {rid for rid, cost in ledger.costs.items() if cost == scenario.LOAD_COST}
    assert set(result.acknowledged) <= settled
    assert set(result.tokens) == settled, "a hold that was never settled was charged"
    assert {cost for rid, cost in ledger.costs.items() if rid not in settled} <= {0}
    State.balance -= scenario.LOAD_COST * len(settled)
    assert ledger.balance_grains == State.balance
    charged_before = scenario.INITIAL_GRAINS - State.balance
    assert ledger.charged_grains == charged_before
    integrity = scenario.verify_integrity(State.http, State.tenant.admin_key)
    assert integrity["ok"] is True, integrity


@pytest.mark.timeout(600)
def test_redis_master_loss_under_load(cluster: LocalCluster) -> None:
    assert State.tenant is not None
    redis_pods = [f"{scenario.RELEASE}-redis-{n}" for n in range(3)]
    masters = [pod for pod in redis_pods if _redis_role(cluster, pod) == "master"]
    assert len(masters) == 1, masters
    master = masters[0]

    def kill_master() -> None:
        cluster.kubectl("delete", "pod", master, "-n", scenario.NAMESPACE, "--wait=false")

        def promoted() -> bool:
            others = [p for p in redis_pods if p != master]
            return any(_redis_role(cluster, p) == "master" for p in others)

        scenario.wait_until(promoted, 120, "Sentinel to promote a replica")

    result = asyncio.run(
        scenario.load_during(State.grpc, State.tenant.enforcer_key, "failover", kill_master)
    )
    assert len(result.acknowledged) >= 20, "too little load to mean anything"
    asyncio.run(_settle_leftovers(result))
    _assert_settled("failover-", result)
    scenario.wait_all_pods_ready(cluster)


def _pod_generations(cluster: LocalCluster) -> dict[str, tuple[str, int]]:
    """name -> (uid, restarts) of every pod not owned by a Job (hooks make new Job pods)."""
    found = {}
    for pod in scenario.pods(cluster):
        owners = pod["metadata"].get("ownerReferences", [])
        if any(owner["kind"] == "Job" for owner in owners):
            continue
        restarts = sum(s.get("restartCount", 0) for s in pod["status"].get("containerStatuses", []))
        found[pod["metadata"]["name"]] = (pod["metadata"]["uid"], restarts)
    return found


@pytest.mark.timeout(900)
def test_two_noop_upgrades_restart_nothing(cluster: LocalCluster) -> None:
    before = _pod_generations(cluster)
    for _ in range(2):
        cluster.helm(
            "upgrade", scenario.RELEASE, str(scenario.CHART), "--namespace", scenario.NAMESPACE,
            *scenario.helm_values_args(), "--wait", "--timeout", "10m",
        )  # fmt: skip
        time.sleep(5)  # a template change would have started a rollout by now
        scenario.wait_all_pods_ready(cluster)
        assert _pod_generations(cluster) == before


@pytest.mark.timeout(600)
def test_rolling_restart_of_the_service_under_load(cluster: LocalCluster) -> None:
    assert State.tenant is not None

    def restart() -> None:
        deployment = f"deployment/{scenario.RELEASE}-service"
        cluster.kubectl("rollout", "restart", deployment, "-n", scenario.NAMESPACE)
        cluster.kubectl(
            "rollout", "status", deployment, "-n", scenario.NAMESPACE, "--timeout", "5m"
        )

    result = asyncio.run(
        scenario.load_during(State.grpc, State.tenant.enforcer_key, "rollout", restart)
    )
    assert result.failed == {}
    assert result.rejected == []
    assert len(result.acknowledged) >= 20
    _assert_settled("rollout-", result)


@pytest.mark.timeout(600)
def test_uninstall_leaves_nothing(cluster: LocalCluster) -> None:
    cluster.helm(
        "uninstall", scenario.RELEASE, "--namespace", scenario.NAMESPACE, "--wait",
        "--timeout", "5m",
    )  # fmt: skip
    selector = f"app.kubernetes.io/instance={scenario.RELEASE}"

    def release_gone() -> bool:
        kinds = ",".join((
            "pods", "services", "deployments", "statefulsets", "jobs", "cronjobs", "configmaps",
            "secrets", "serviceaccounts", "roles", "rolebindings", "poddisruptionbudgets",
        ))  # fmt: skip
        left = cluster.kubectl("get", kinds, "-n", scenario.NAMESPACE, "-l", selector, "-o", "name")
        cluster_left = cluster.kubectl(
            "get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name"
        )
        return not left.strip() and not cluster_left.strip()

    scenario.wait_until(release_gone, 180, "every object of the release to go")
    pods_left = cluster.kubectl("get", "pods", "-n", scenario.NAMESPACE, "-o", "name")
    assert pods_left.strip() == ""
    for kind in ("beamcustomers", "beamapikeys", "beampricelists"):
        items = scenario.kube_json(cluster, "get", kind, "-n", scenario.TENANT)["items"]
        assert items, kind
        for item in items:
            assert "beam.dev/finalizer" not in item["metadata"].get("finalizers", []), item
    cluster.kubectl("delete", "namespace", scenario.TENANT, "--timeout", "120s")
    cluster.kubectl("delete", "namespace", scenario.NAMESPACE, "--timeout", "120s")

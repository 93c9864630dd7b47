"""The chart's end-to-end scenario on a real cluster, shared by every way of getting one.

tests/e2e/test_cluster.py runs it on the one-node cluster of hack/cluster (no Docker; the test
process lives in the cluster's network namespace and calls Services by ClusterIP);
tests/e2e/test_kind.py on kind (Docker; Services through `kubectl port-forward`). A `Cluster`
is all a scenario step needs: kubectl, helm, and a way to reach a Service port.

The steps, in order, each with exact assertions:
  install            helm install with the local images, every pod Ready
  tenant             kubectl apply -f examples/: the operator makes the keys' Secrets and the
                     customer (60,000,000 grains from its two credits)
  walkthrough        the README's Check -> Deduct -> Finalize -> balance, over REST and gRPC
  redis_failover     the Redis master pod deleted under Check+Finalize load: Sentinel promotes
                     a replica, every acknowledged settlement is in the ledger, the rest are
                     settled by retrying them, balances and ledger sums match, verify-integrity
                     is clean
  noop_upgrades      two `helm upgrade`s with unchanged values restart no pod
  rolling_restart    `kubectl rollout restart` of the service under load: no call fails
                     beyond the client's retries
  integrity_cronjob  the chart's integrity CronJob, run once now, succeeds
  uninstall          helm uninstall: nothing of the release left, the operator's finalizers
                     released (the tenant namespace deletes)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx
from beam_client import AsyncBeamClient, RetryPolicy
from beam_client.types import RequestStatus

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "beam"
VALUES = Path(__file__).with_name("cluster-values.yaml")
RELEASE = "beam"
NAMESPACE = "beam-system"
TENANT = "acme"
CUSTOMER = "cus_acme_1"
# examples/customer.yaml: a welcome credit of 10,000,000 and a top-up of 50,000,000 grains.
INITIAL_GRAINS = 60_000_000
# The README walkthrough: a hold of ceil(50,000 x 1.2), 50 gpt-4 completion tokens at
# 60,000,000 grains per million (3,000), settled at the provider's 48,700.
WALK_RESERVED = 60_000
WALK_DEDUCTED = 3_000
WALK_CHARGED = 48_700
WALK_REFUNDED = WALK_RESERVED - WALK_CHARGED
# Each load request: a hold of 1,000 grains settled at 700.
LOAD_ESTIMATE = 1_000
LOAD_COST = 700
# Bound of one load run: far above what 4 workers send in a minute here (~30/s), and at 700
# grains each well inside the customer's balance. load_during fails if it was reached (the load
# would have stopped before the disruption ended).
MAX_LOAD_REQUESTS = 30_000
# The load generator's client: more patience than the default for the failover window.
LOAD_RETRY = RetryPolicy(max_attempts=12, initial_backoff=0.2, max_backoff=3.0)


class Cluster(Protocol):
    """What the scenario needs from a cluster."""

    def kubectl(self, *args: str, stdin: str | None = None) -> str: ...

    def helm(self, *args: str) -> str: ...

    def service_address(self, service: str, port: int) -> contextlib.AbstractContextManager[str]:
        """host:port where this test process reaches port `port` of Service `service` in
        the release namespace (kept usable while the context is open)."""
        ...


def run(
    command: list[str],
    *,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> str:
    result = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=timeout, env=env,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls `predicate` (exceptions count as "not yet") until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:
            last_error = error
        time.sleep(1)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error})"
    )


def kube_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


# -- install --------------------------------------------------------------------------------


def helm_values_args(extra_sets: tuple[str, ...] = ()) -> list[str]:
    args = ["-f", str(VALUES)]
    for item in extra_sets:
        args += ["--set", item]
    return args


def install(cluster: Cluster, extra_sets: tuple[str, ...] = ()) -> None:
    """helm install with cluster-values.yaml (+ `--set`s: kind swaps the images)."""
    cluster.helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace",
        *helm_values_args(extra_sets), "--wait", "--timeout", "10m",
    )  # fmt: skip


def pods(cluster: Cluster) -> list[dict[str, Any]]:
    return list(kube_json(cluster, "get", "pods", "-n", NAMESPACE)["items"])


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def wait_all_pods_ready(cluster: Cluster, timeout: float = 300) -> dict[str, str]:
    """Every pod of the release Ready (finished Job pods aside); returns name -> uid."""

    def ready() -> dict[str, str] | None:
        running = [p for p in pods(cluster) if p["status"].get("phase") != "Succeeded"]
        if running and all(
            is_ready(p) and not p["metadata"].get("deletionTimestamp") for p in running
        ):
            return {p["metadata"]["name"]: p["metadata"]["uid"] for p in running}
        return None

    result: dict[str, str] = wait_until(ready, timeout, "every pod of the release Ready")
    return result


def expected_workloads() -> set[str]:
    """The pods the chart runs with cluster-values.yaml (StatefulSet pods by name)."""
    return {
        f"{RELEASE}-redis-0", f"{RELEASE}-redis-1", f"{RELEASE}-redis-2",
        f"{RELEASE}-redis-sentinel-0", f"{RELEASE}-redis-sentinel-1",
        f"{RELEASE}-redis-sentinel-2", f"{RELEASE}-timescaledb-0",
    }  # fmt: skip


def assert_chart_pods(ready: dict[str, str]) -> None:
    names = set(ready)
    assert expected_workloads() <= names, sorted(names)
    service = sorted(n for n in names if n.startswith(f"{RELEASE}-service-"))
    operator = sorted(n for n in names if n.startswith(f"{RELEASE}-operator-"))
    assert len(service) == 2, sorted(names)
    assert len(operator) == 1, sorted(names)
    assert len(names) == len(expected_workloads()) + 3, sorted(names)


# -- tenant ---------------------------------------------------------------------------------


def secret_value(cluster: Cluster, namespace: str, name: str, key: str) -> str:
    data = kube_json(cluster, "get", "secret", name, "-n", namespace)["data"]
    return base64.b64decode(data[key]).decode()


@dataclass
class Tenant:
    enforcer_key: str
    admin_key: str


def apply_tenant(cluster: Cluster) -> Tenant:
    cluster.kubectl("apply", "-f", str(ROOT / "examples"))
    keys: dict[str, str] = {}
    for role in ("enforcer", "admin"):
        secret = f"acme-{role}-key"

        def api_key(secret: str = secret) -> str:
            return secret_value(cluster, TENANT, secret, "api-key")

        keys[role] = wait_until(api_key, 180, f"the operator to write Secret {secret}")

    def customer_ready() -> bool:
        customer = kube_json(cluster, "get", "beamcustomer", "cust-acme-1", "-n", TENANT)
        status = customer.get("status", {})
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        return bool(ready) and ready[0]["status"] == "True"

    wait_until(customer_ready, 180, "BeamCustomer cust-acme-1 Ready")
    return Tenant(keys["enforcer"], keys["admin"])


# -- the README walkthrough -------------------------------------------------------------------


def rest_walkthrough(base_url: str, key: str, request_id: str, balance_before: int) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
        balance = http.get(f"/v1/balance/{CUSTOMER}").json()
        assert balance == {"balance": str(balance_before), "reserved": "0",
                           "available": str(balance_before)}, balance  # fmt: skip
        check = http.post("/v1/balance/check", json={
            "customer_id": CUSTOMER, "estimated_grains": 50_000, "buffer_multiplier": 1.2,
            "request_id": request_id, "metadata": {"model": "gpt-4"}}).json()  # fmt: skip
        assert check["approved"] is True, check
        assert check["reserved_grains"] == str(WALK_RESERVED)
        assert check["remaining_balance"] == str(balance_before - WALK_RESERVED)
        deduct = http.post("/v1/balance/deduct", json={
            "customer_id": CUSTOMER, "request_id": request_id,
            "request_token": check["request_token"], "tokens_consumed": 50, "model": "gpt-4",
            "is_completion": True, "sequence_number": 1}).json()  # fmt: skip
        assert deduct["success"] is True, deduct
        assert deduct["consumed_grains"] == str(WALK_DEDUCTED)
        final = http.post("/v1/balance/finalize", json={
            "customer_id": CUSTOMER, "request_id": request_id, "status": "COMPLETED_SUCCESS",
            "actual_prompt_tokens": 234, "actual_completion_tokens": 487,
            "total_actual_cost_grains": WALK_CHARGED, "model": "gpt-4"}).json()  # fmt: skip
        after = balance_before - WALK_CHARGED
        assert final["success"] is True, final
        assert final["charged_grains"] == str(WALK_CHARGED)
        assert final["refunded_grains"] == str(WALK_REFUNDED)
        assert final["final_balance"] == str(after)
        balance = http.get(f"/v1/balance/{CUSTOMER}").json()
        assert balance == {"balance": str(after), "reserved": "0", "available": str(after)}
    return after


async def grpc_walkthrough(target: str, key: str, request_id: str, balance_before: int) -> int:
    async with AsyncBeamClient(target, key) as beam:
        balance = await beam.get_balance(CUSTOMER)
        assert (balance.balance, balance.reserved) == (balance_before, 0)
        check = await beam.check_balance(
            CUSTOMER, request_id, model="gpt-4", estimated_grains=50_000, buffer_multiplier=1.2
        )
        assert check.approved, check
        assert check.reserved_grains == WALK_RESERVED
        deduct = await beam.deduct_tokens(
            CUSTOMER, request_id, check.request_token, 50, sequence_number=1, model="gpt-4"
        )
        assert deduct.success, deduct
        assert deduct.consumed_grains == WALK_DEDUCTED
        final = await beam.finalize_request(
            CUSTOMER, request_id, status=RequestStatus.COMPLETED_SUCCESS,
            request_token=check.request_token, model="gpt-4", prompt_tokens=234,
            completion_tokens=487, total_cost_grains=WALK_CHARGED,
        )  # fmt: skip
        after = balance_before - WALK_CHARGED
        assert (final.charged_grains, final.refunded_grains, final.final_balance) == (
            WALK_CHARGED, WALK_REFUNDED, after,
        )  # fmt: skip
        balance = await beam.get_balance(CUSTOMER)
        assert (balance.balance, balance.reserved, balance.available) == (after, 0, after)
    return after


# -- load ----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    acknowledged: list[str] = field(default_factory=list)  # Finalize answered success
    failed: dict[str, str] = field(default_factory=dict)  # request id -> the error
    rejected: list[str] = field(default_factory=list)  # Check answered approved=False
    tokens: dict[str, str] = field(default_factory=dict)  # request id -> its hold's token


async def run_load(
    target: str, key: str, prefix: str, stop: asyncio.Event, workers: int = 4,
    max_requests: int = MAX_LOAD_REQUESTS,
) -> LoadResult:  # fmt: skip
    """Check+Finalize loops until `stop` is set (bounded by `max_requests` in all)."""
    result = LoadResult()
    counter = iter(range(max_requests))
    async with AsyncBeamClient(target, key, retry=LOAD_RETRY) as beam:

        async def worker() -> None:
            for n in counter:
                if stop.is_set():
                    return
                request_id = f"{prefix}-{n}"
                try:
                    check = await beam.check_balance(
                        CUSTOMER, request_id, model="gpt-4", estimated_grains=LOAD_ESTIMATE,
                        buffer_multiplier=1.0,
                    )  # fmt: skip
                    if not check.approved:
                        result.rejected.append(request_id)
                        continue
                    result.tokens[request_id] = check.request_token
                    final = await beam.finalize_request(
                        CUSTOMER, request_id, status=RequestStatus.COMPLETED_SUCCESS,
                        request_token=check.request_token, model="gpt-4",
                        total_cost_grains=LOAD_COST,
                    )  # fmt: skip
                    assert final.charged_grains == LOAD_COST, final
                    result.acknowledged.append(request_id)
                except Exception as error:
                    result.failed[request_id] = f"{type(error).__name__}: {error}"

        await asyncio.gather(*(worker() for _ in range(workers)))
    return result


async def load_during(
    target: str, key: str, prefix: str, action: Callable[[], None], settle_seconds: float = 5
) -> LoadResult:
    """Runs load, then `action` (in a thread), then `settle_seconds` more load."""
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(target, key, prefix, stop))
    await asyncio.sleep(3)
    await asyncio.to_thread(action)
    await asyncio.sleep(settle_seconds)
    stop.set()
    result = await load
    sent = len(result.tokens) + len(result.rejected) + len(result.failed)
    assert sent < MAX_LOAD_REQUESTS, "the load stopped at its bound before the disruption ended"
    return result


# -- the ledger --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ledger:
    balance_grains: int  # customers.current_balance_grains
    charged_grains: int  # minus the sum of every settlement and expiry entry
    costs: dict[str, int]  # request id -> actual_cost_grains, for the ids with the prefix


async def read_ledger(dsn: str, prefix: str) -> Ledger:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        balance = await conn.fetchval(
            "SELECT current_balance_grains FROM customers WHERE tenant = $1 AND customer_id = $2",
            TENANT, CUSTOMER,
        )  # fmt: skip
        charged = await conn.fetchval(
            "SELECT coalesce(-sum(amount_grains), 0) FROM transactions WHERE tenant = $1 AND "
            "customer_id = $2 AND transaction_type IN ('settlement', 'expiry')", TENANT, CUSTOMER,
        )  # fmt: skip
        rows = await conn.fetch(
            "SELECT request_id, actual_cost_grains FROM requests WHERE tenant = $1 AND "
            "customer_id = $2 AND starts_with(request_id, $3)", TENANT, CUSTOMER, prefix,
        )  # fmt: skip
    finally:
        await conn.close()
    costs = {str(r["request_id"]): int(r["actual_cost_grains"]) for r in rows}
    return Ledger(int(balance), int(charged), costs)


def verify_integrity(base_url: str, admin_key: str) -> dict[str, Any]:
    response = httpx.post(
        f"{base_url}/v1/admin/verify-integrity",
        headers={"Authorization": f"Bearer {admin_key}"},
        json={"customer_id": CUSTOMER},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


# -- the steps, with what one leaves for the next ------------------------------------------


@dataclass
class Run:
    """One scenario run's state: where the Services are, the tenant's keys, the balance."""

    http: str = ""  # http://host:port of the API Service's REST port
    grpc: str = ""  # host:port of its gRPC port
    dsn: str = ""  # the database, as Beam's own role
    tenant: Tenant | None = None
    balance: int = INITIAL_GRAINS
    load_counts: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def keys(self) -> Tenant:
        assert self.tenant is not None, "the tenant step has not run"
        return self.tenant


@contextlib.contextmanager
def connected(cluster: Cluster) -> Iterator[Run]:
    """A Run whose addresses stay usable while the context is open (port-forwards on kind)."""
    with (
        cluster.service_address(RELEASE, 8080) as http,
        cluster.service_address(RELEASE, 9090) as grpc_address,
        cluster.service_address(f"{RELEASE}-timescaledb", 5432) as database,
    ):
        password = secret_value(cluster, NAMESPACE, f"{RELEASE}-timescaledb-auth", "password")
        yield Run(f"http://{http}", grpc_address, f"postgresql://beam:{password}@{database}/beam")


def step_install(cluster: Cluster, extra_sets: tuple[str, ...] = ()) -> None:
    install(cluster, extra_sets)
    assert_chart_pods(wait_all_pods_ready(cluster))


def step_tenant(cluster: Cluster, run: Run) -> None:
    run.tenant = apply_tenant(cluster)


def step_walkthrough(run: Run) -> None:
    key = run.keys.enforcer_key
    run.balance = rest_walkthrough(run.http, key, "walk-rest", run.balance)
    run.balance = asyncio.run(grpc_walkthrough(run.grpc, key, "walk-grpc", run.balance))
    assert run.balance == INITIAL_GRAINS - 2 * WALK_CHARGED
    ledger = asyncio.run(read_ledger(run.dsn, "walk-"))
    assert ledger.costs == {"walk-rest": WALK_CHARGED, "walk-grpc": WALK_CHARGED}
    assert ledger.balance_grains == run.balance
    assert ledger.charged_grains == 2 * WALK_CHARGED


def redis_role(cluster: Cluster, pod: str) -> str:
    out = cluster.kubectl(
        "exec", "-n", NAMESPACE, pod, "-c", "redis", "--", "sh", "-c",
        'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli --raw INFO replication',
    )  # fmt: skip
    for line in out.splitlines():
        if line.startswith("role:"):
            return line.split(":", 1)[1].strip()
    return ""


async def settle_leftovers(run: Run, result: LoadResult) -> None:
    """Finalize again every approved request whose Finalize was not acknowledged (same ids
    and tokens: idempotent, a settlement that did commit is replayed)."""
    async with AsyncBeamClient(run.grpc, run.keys.enforcer_key) as beam:
        for request_id, token in result.tokens.items():
            if request_id in result.acknowledged:
                continue
            final = await beam.finalize_request(
                CUSTOMER, request_id, status=RequestStatus.COMPLETED_SUCCESS,
                request_token=token, model="gpt-4", total_cost_grains=LOAD_COST,
            )  # fmt: skip
            assert final.charged_grains == LOAD_COST, final


def assert_settled(run: Run, prefix: str, result: LoadResult) -> None:
    """Exact money: every approved request charged LOAD_COST exactly once (acknowledged ones
    included), nothing else charged, no hold left, the cached balance equals the ledger's,
    verify-integrity clean."""

    def holds_released() -> bool:
        balance = httpx.get(
            f"{run.http}/v1/balance/{CUSTOMER}",
            headers={"Authorization": f"Bearer {run.keys.enforcer_key}"},
            timeout=10,
        ).json()
        return bool(balance["reserved"] == "0")

    wait_until(holds_released, 120, "every hold settled or expired")
    ledger = asyncio.run(read_ledger(run.dsn, prefix))
    settled = {rid for rid, cost in ledger.costs.items() if cost == LOAD_COST}
    assert set(result.acknowledged) <= settled, "an acknowledged settlement was lost"
    assert set(result.tokens) == settled, "an approved request was not settled exactly once"
    assert {cost for rid, cost in ledger.costs.items() if rid not in settled} <= {0}
    run.balance -= LOAD_COST * len(settled)
    assert ledger.balance_grains == run.balance
    assert ledger.charged_grains == INITIAL_GRAINS - run.balance
    run.load_counts[prefix] = (len(result.acknowledged), len(result.failed), len(settled))
    integrity = verify_integrity(run.http, run.keys.admin_key)
    assert integrity["ok"] is True, integrity


def step_redis_failover(cluster: Cluster, run: Run) -> None:
    redis_pods = [f"{RELEASE}-redis-{n}" for n in range(3)]
    masters = [pod for pod in redis_pods if redis_role(cluster, pod) == "master"]
    assert len(masters) == 1, masters
    master = masters[0]

    def kill_master() -> None:
        # Killed, not drained: no grace period, so the pod's preStop hook (which asks Sentinel
        # for a graceful failover) never runs and Sentinel has to notice the master is down.
        cluster.kubectl(
            "delete", "pod", master, "-n", NAMESPACE, "--grace-period=0", "--force", "--wait=false"
        )

        def promoted() -> bool:
            return any(redis_role(cluster, p) == "master" for p in redis_pods if p != master)

        wait_until(promoted, 120, "Sentinel to promote a replica")

    result = asyncio.run(load_during(run.grpc, run.keys.enforcer_key, "failover", kill_master))
    assert len(result.acknowledged) >= 20, "too little load to mean anything"
    assert result.rejected == []
    asyncio.run(settle_leftovers(run, result))
    assert_settled(run, "failover-", result)
    wait_all_pods_ready(cluster)


def pod_generations(cluster: Cluster) -> dict[str, tuple[str, int]]:
    """name -> (uid, restarts) of every pod not owned by a Job (hooks make new Job pods)."""
    found = {}
    for pod in pods(cluster):
        owners = pod["metadata"].get("ownerReferences", [])
        if any(owner["kind"] == "Job" for owner in owners):
            continue
        statuses = pod["status"].get("containerStatuses", [])
        found[pod["metadata"]["name"]] = (
            pod["metadata"]["uid"], sum(s.get("restartCount", 0) for s in statuses),
        )  # fmt: skip
    return found


def step_noop_upgrades(cluster: Cluster, extra_sets: tuple[str, ...] = ()) -> None:
    before = pod_generations(cluster)
    for _ in range(2):
        cluster.helm(
            "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE,
            *helm_values_args(extra_sets), "--wait", "--timeout", "10m",
        )  # fmt: skip
        time.sleep(5)  # a changed pod template would have started a rollout by now
        wait_all_pods_ready(cluster)
        assert pod_generations(cluster) == before


def step_rolling_restart(cluster: Cluster, run: Run) -> None:
    deployment = f"deployment/{RELEASE}-service"

    def restart() -> None:
        cluster.kubectl("rollout", "restart", deployment, "-n", NAMESPACE)
        cluster.kubectl("rollout", "status", deployment, "-n", NAMESPACE, "--timeout", "5m")

    result = asyncio.run(load_during(run.grpc, run.keys.enforcer_key, "rollout", restart))
    assert result.failed == {}, "a call failed beyond the client's retries"
    assert result.rejected == []
    assert len(result.acknowledged) >= 20
    assert_settled(run, "rollout-", result)


def step_integrity_cronjob(cluster: Cluster) -> None:
    """The chart's scheduled integrity check, run now: its pod runs verify-integrity for every
    tenant in the cluster and must succeed (the ledger, the cached balances and Redis agree)."""
    job = "integrity-now"
    cluster.kubectl("create", "job", job, f"--from=cronjob/{RELEASE}-integrity", "-n", NAMESPACE)
    cluster.kubectl(
        "wait", f"job/{job}", "-n", NAMESPACE, "--for=condition=Complete", "--timeout=240s"
    )
    status = kube_json(cluster, "get", "job", job, "-n", NAMESPACE)["status"]
    assert (status.get("succeeded"), status.get("failed", 0)) == (1, 0), status
    cluster.kubectl("delete", "job", job, "-n", NAMESPACE, "--wait=true")


RELEASE_KINDS = (
    "pods", "services", "deployments", "statefulsets", "jobs", "cronjobs", "configmaps",
    "secrets", "serviceaccounts", "roles", "rolebindings", "poddisruptionbudgets",
)  # fmt: skip


def step_uninstall(cluster: Cluster) -> None:
    cluster.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "5m")
    selector = f"app.kubernetes.io/instance={RELEASE}"

    def release_gone() -> bool:
        left = cluster.kubectl(
            "get", ",".join(RELEASE_KINDS), "-n", NAMESPACE, "-l", selector, "-o", "name"
        )
        cluster_left = cluster.kubectl(
            "get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name"
        )
        return not left.strip() and not cluster_left.strip()

    wait_until(release_gone, 180, "every object of the release to go")
    assert cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "name").strip() == ""
    for kind in ("beamcustomers", "beamapikeys", "beampricelists"):
        items = kube_json(cluster, "get", kind, "-n", TENANT)["items"]
        assert len(items) == {"beamcustomers": 1, "beamapikeys": 2, "beampricelists": 1}[kind]
        for item in items:
            assert "beam.dev/finalizer" not in item["metadata"].get("finalizers", []), item
    # With the finalizers released, the tenant's namespace (and its objects) deletes.
    cluster.kubectl("delete", "namespace", TENANT, "--timeout", "120s")
    cluster.kubectl("delete", "namespace", NAMESPACE, "--timeout", "120s")

"""`helm install` brings up the whole stack: the chart against a real kube-apiserver.

What a control plane without nodes can prove, and how:
- `helm lint --strict` is clean for the defaults and every CI value set.
- Each CI value set renders to objects the API server accepts (`kubectl apply
  --dry-run=server`: full admission and schema validation, nothing persisted).
- A real install creates every object; an upgrade changes what it should and keeps the
  generated Secrets byte for byte; an uninstall removes the workloads (the garbage collector
  takes their ReplicaSets and Pods) and keeps the Secrets, which a re-install adopts unchanged.
- The operator's RBAC grants what it needs and nothing else, asked of the API server with
  `kubectl auth can-i --as` its ServiceAccount; the service's ServiceAccount may do nothing.

Pods never run here (no kubelet), so nothing waits for readiness. No install hook exists (the
operator migrates on start); the migration Job is a pre-upgrade hook and the finalizer
cleanup a pre-delete hook, which Helm would wait for forever without a kubelet, so upgrades
and uninstalls here pass `--no-hooks`; the migration Job's hook contract is asserted on the
rendered manifest, and the cleanup Job's script runs here as its own ServiceAccount.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml


class ControlPlane(Protocol):
    """What tests/k8s/conftest.py's `control_plane` fixture provides."""

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]: ...

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]: ...


pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]  # helm install/upgrade cycles

REPO_ROOT = Path(__file__).resolve().parents[2]
# BEAM_TEST_CHART installs another copy of the chart (e.g. an older commit's, to watch a
# regression test fail against it), as in tests/chart.
CHART = Path(os.environ.get("BEAM_TEST_CHART") or REPO_ROOT / "charts" / "beam")
CRD_DIR = REPO_ROOT / "crds"
CI_VALUES = {path.name.removesuffix("-values.yaml"): path for path in (CHART / "ci").glob("*.yaml")}
CRD_NAMES = (
    "beamcustomers.beam.dev", "beamapikeys.beam.dev", "beampricelists.beam.dev",
    "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev",  # the chart's peering objects
)  # fmt: skip
HELM_TIMEOUT = 120
GC_WAIT_SECONDS = 90.0
POLICY_LOAD_SECONDS = 30.0  # a new ValidatingAdmissionPolicy takes effect within ~1 s when idle


@pytest.fixture(scope="module")
def kube(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with Beam's CRDs established (the chart's objects need none, but a
    real cluster always has them before the operator starts)."""
    control_plane.kubectl("apply", "-f", str(CRD_DIR))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        *(f"crd/{name}" for name in CRD_NAMES),
        timeout=90,
    )
    return control_plane


@pytest.fixture
def namespace(kube: ControlPlane) -> Iterator[str]:
    name = f"beam-helm-{uuid.uuid4().hex[:10]}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def release(kube: ControlPlane, namespace: str) -> Iterator[str]:
    """A release name, uninstalled afterwards whatever the test did (cluster-scoped RBAC
    objects would otherwise outlive the namespace)."""
    name = f"rel{uuid.uuid4().hex[:6]}"
    yield name
    kube.helm(
        "uninstall", name, "--namespace", namespace, "--no-hooks", check=False, timeout=HELM_TIMEOUT
    )


def helm_template(kube: ControlPlane, namespace: str, *args: str) -> str:
    return kube.helm(
        "template", "beam", str(CHART), "--namespace", namespace, *args, timeout=HELM_TIMEOUT
    ).stdout


def documents(manifest: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def apply_dry_run(kube: ControlPlane, manifest: str) -> list[str]:
    """Server-side dry run of a rendered chart; the lines kubectl printed."""
    result = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def release_secrets(kube: ControlPlane, namespace: str, release: str) -> dict[str, dict[str, str]]:
    listed = json.loads(
        kube.kubectl(
            "get",
            "secrets",
            "--namespace",
            namespace,
            "--selector",
            f"app.kubernetes.io/instance={release}",
            "--output",
            "json",
        ).stdout
    )
    return {item["metadata"]["name"]: item["data"] for item in listed["items"]}


def names(kube: ControlPlane, namespace: str, kind: str, release: str) -> list[str]:
    output = kube.kubectl(
        "get",
        kind,
        "--namespace",
        namespace,
        "--selector",
        f"app.kubernetes.io/instance={release}",
        "--output",
        "name",
    ).stdout
    return sorted(output.split())


def container_env(kube: ControlPlane, namespace: str, deployment: str) -> dict[str, Any]:
    spec = json.loads(
        kube.kubectl("get", "deployment", deployment, "--namespace", namespace, "-o", "json").stdout
    )
    env = spec["spec"]["template"]["spec"]["containers"][0]["env"]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in env}


def wait_until_gone(kube: ControlPlane, namespace: str, release: str, kinds: str) -> list[str]:
    """Poll (bounded) until no object of `kinds` carries the release label; what is left."""
    deadline = time.monotonic() + GC_WAIT_SECONDS
    while True:
        left = names(kube, namespace, kinds, release)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


def can_i(kube: ControlPlane, user: str, verb: str, resource: str, namespace: str) -> bool:
    result = kube.kubectl(
        "auth", "can-i", verb, resource, "--as", user, "--namespace", namespace, check=False
    )
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


# --- lint and render -------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *sorted(CI_VALUES)])
def test_lint_is_clean(kube: ControlPlane, values: str | None) -> None:
    args = ["-f", str(CI_VALUES[values])] if values else []
    result = kube.helm("lint", str(CHART), "--strict", *args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    for level in ("[INFO]", "[WARNING]", "[ERROR]"):
        assert level not in result.stdout, result.stdout


@pytest.mark.parametrize("values", sorted(CI_VALUES))
def test_each_ci_value_set_is_accepted_by_the_api_server(
    kube: ControlPlane, namespace: str, values: str
) -> None:
    manifest = helm_template(kube, namespace, "-f", str(CI_VALUES[values]))
    kinds = sorted({doc["kind"] for doc in documents(manifest)})
    printed = apply_dry_run(kube, manifest)
    assert len(printed) == len(documents(manifest))
    assert all(line.endswith("(server dry run)") for line in printed), printed
    assert {"Deployment", "Service", "ServiceAccount", "ClusterRole"} <= set(kinds)
    assert ("Job" in kinds) is (values != "gitops")  # GitOps: no hook Job, start-up migrations


def test_ci_value_sets_differ_as_documented(kube: ControlPlane, namespace: str) -> None:
    def kinds_and_names(values: str) -> set[tuple[str, str]]:
        manifest = helm_template(kube, namespace, "-f", str(CI_VALUES[values]))
        return {(doc["kind"], doc["metadata"]["name"]) for doc in documents(manifest)}

    default, external, minimal = (kinds_and_names(v) for v in ("default", "external", "minimal"))
    workloads = {
        ("StatefulSet", f"beam-{part}") for part in ("redis", "redis-sentinel", "timescaledb")
    }
    assert workloads <= default
    assert not {kind for kind, _ in external} & {"StatefulSet", "Secret", "ConfigMap"}
    assert ("StatefulSet", "beam-redis-sentinel") not in minimal
    assert ("Service", "beam-redis") in minimal  # standalone: BEAM_REDIS_URL points here
    assert ("HorizontalPodAutoscaler", "beam-service") not in minimal
    assert ("PodDisruptionBudget", "beam-service") not in minimal


def test_optional_features_are_accepted_by_the_api_server(
    kube: ControlPlane, namespace: str
) -> None:
    tenants = [f"{namespace}-t{index}" for index in (1, 2)]
    for tenant in tenants:
        kube.kubectl("create", "namespace", tenant)
    try:
        manifest = helm_template(
            kube,
            namespace,
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "networkPolicy.allowExternal=false",
            "--set",
            "networkPolicy.ingressNamespaceSelector.matchLabels.team=apps",
            "--set",
            f"operator.watchNamespaces={{{','.join(tenants)}}}",
            "--set",
            "pgbouncer.enabled=true",
        )
        docs = documents(manifest)
        roles = sorted(
            doc["metadata"]["namespace"]
            for doc in docs
            if doc["kind"] == "Role"
            and doc["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
        )
        assert roles == tenants
        assert sum(doc["kind"] == "NetworkPolicy" for doc in docs) == 5
        apply_dry_run(kube, manifest)
    finally:
        for tenant in tenants:
            kube.kubectl("delete", "namespace", tenant, "--wait=false", check=False)


def test_service_monitor_renders_only_when_enabled_and_its_crd_exists(
    kube: ControlPlane, namespace: str
) -> None:
    crd = ("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    off = documents(helm_template(kube, namespace, *crd))
    assert not [doc for doc in off if doc["kind"] == "ServiceMonitor"]
    no_crd = documents(helm_template(kube, namespace, "--set", "serviceMonitor.enabled=true"))
    assert not [doc for doc in no_crd if doc["kind"] == "ServiceMonitor"]
    on = documents(helm_template(kube, namespace, *crd, "--set", "serviceMonitor.enabled=true"))
    monitors = [doc for doc in on if doc["kind"] == "ServiceMonitor"]
    assert [doc["apiVersion"] for doc in monitors] == ["monitoring.coreos.com/v1"] * 2
    assert sorted(doc["metadata"]["name"] for doc in monitors) == [
        "beam-operator",
        "beam-service",
    ]


def test_migration_job_is_a_pre_upgrade_hook(kube: ControlPlane, namespace: str) -> None:
    jobs = [
        doc
        for doc in documents(helm_template(kube, namespace))
        if doc["kind"] == "Job" and doc["metadata"]["name"] == "beam-migrate"
    ]
    assert len(jobs) == 1
    annotations = jobs[0]["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert annotations["helm.sh/hook-weight"] == "0"
    pod = jobs[0]["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["migrate"]
    assert [c["name"] for c in pod["initContainers"]] == ["wait-for-database"]


def test_invalid_values_fail_before_anything_is_created(kube: ControlPlane, namespace: str) -> None:
    typo = kube.helm("template", "beam", str(CHART), "--set", "service.replicas=2", check=False)
    assert typo.returncode != 0
    assert "additional properties 'replicas' not allowed" in typo.stderr
    no_host = kube.helm(
        "template", "beam", str(CHART), "--set", "timescaledb.enabled=false", check=False
    )
    assert no_host.returncode != 0
    assert "externalDatabase.host is required" in no_host.stderr
    two_operators = kube.helm(
        "template", "beam", str(CHART), "--set", "operator.replicaCount=2", check=False
    )
    assert two_operators.returncode != 0
    assert "at '/operator/replicaCount': maximum: got 2, want 1" in two_operators.stderr


# --- install, upgrade, uninstall -------------------------------------------------------------


def test_install_upgrade_uninstall_keeps_generated_secrets(
    kube: ControlPlane, namespace: str, release: str
) -> None:
    prefix = f"{release}-beam"
    install = kube.helm(
        "install", release, str(CHART), "--namespace", namespace, timeout=HELM_TIMEOUT
    )
    assert "STATUS: deployed" in install.stdout
    assert names(kube, namespace, "deployments", release) == [
        f"deployment.apps/{prefix}-operator",
        f"deployment.apps/{prefix}-service",
    ]
    assert names(kube, namespace, "statefulsets", release) == [
        f"statefulset.apps/{prefix}-redis",
        f"statefulset.apps/{prefix}-redis-sentinel",
        f"statefulset.apps/{prefix}-timescaledb",
    ]
    assert names(kube, namespace, "services", release) == sorted(
        f"service/{prefix}{suffix}"
        for suffix in (
            "",
            "-headless",
            "-metrics",
            "-operator-metrics",
            "-redis-headless",
            "-redis-sentinel-headless",
            "-timescaledb",
            "-timescaledb-headless",
        )
    )
    assert names(kube, namespace, "hpa,pdb", release) == sorted(
        [
            f"horizontalpodautoscaler.autoscaling/{prefix}-service",
            f"poddisruptionbudget.policy/{prefix}-redis",
            f"poddisruptionbudget.policy/{prefix}-redis-sentinel",
            f"poddisruptionbudget.policy/{prefix}-service",
        ]
    )
    assert names(kube, namespace, "jobs", release) == []  # no install hook

    generated = release_secrets(kube, namespace, release)
    assert sorted(generated) == [
        f"{prefix}-redis-auth",
        f"{prefix}-request-token",
        f"{prefix}-timescaledb-auth",
    ]
    token = base64.b64decode(generated[f"{prefix}-request-token"]["request-token-secret"])
    assert len(token) == 64
    assert token.isalnum()
    for name, key in (
        (f"{prefix}-redis-auth", "redis-password"),
        (f"{prefix}-timescaledb-auth", "password"),
    ):
        assert len(base64.b64decode(generated[name][key])) == 48

    env = container_env(kube, namespace, f"{prefix}-service")
    assert env["BEAM_LOG_LEVEL"] == "INFO"
    assert env["BEAM_REDIS_MODE"] == "sentinel"
    assert env["BEAM_REDIS_SENTINELS"].count(":26379") == 3
    assert env["BEAM_DATABASE_URL"] == (
        f"postgresql://{prefix}-timescaledb.{namespace}.svc.cluster.local:5432/beam?sslmode=disable"
    )

    kube.helm(
        "upgrade",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--no-hooks",
        "--set",
        "service.logLevel=DEBUG",
        timeout=HELM_TIMEOUT,
    )
    assert container_env(kube, namespace, f"{prefix}-service")["BEAM_LOG_LEVEL"] == "DEBUG"
    assert release_secrets(kube, namespace, release) == generated

    # --no-hooks: the pre-delete cleanup Job would wait for a kubelet forever (its script is
    # run directly in test_uninstall_cleanup_removes_the_finalizers_as_its_service_account).
    uninstall = kube.helm(
        "uninstall", release, "--namespace", namespace, "--no-hooks", timeout=HELM_TIMEOUT
    )
    assert "uninstalled" in uninstall.stdout
    left = wait_until_gone(
        kube, namespace, release, "deployments,statefulsets,replicasets,pods,services"
    )
    assert left == [], f"still there {GC_WAIT_SECONDS:.0f}s after uninstall: {left}"
    assert release_secrets(kube, namespace, release) == generated  # helm.sh/resource-policy: keep

    kube.helm("install", release, str(CHART), "--namespace", namespace, timeout=HELM_TIMEOUT)
    assert release_secrets(kube, namespace, release) == generated  # adopted, not regenerated


WORKLOADS = (
    ("deployment", "operator"),
    ("deployment", "service"),
    ("statefulset", "redis"),
    ("statefulset", "redis-sentinel"),
    ("statefulset", "timescaledb"),
)


def workload_templates(kube: ControlPlane, namespace: str, release: str) -> dict[str, Any]:
    """.spec.template of the five workloads, by name."""
    found = {}
    for kind, suffix in WORKLOADS:
        name = f"{release}-beam-{suffix}"
        obj = json.loads(kube.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)
        found[name] = obj["spec"]["template"]
    return found


def test_upgrades_that_change_nothing_keep_every_pod_template(
    kube: ControlPlane, namespace: str, release: str
) -> None:
    """A no-op `helm upgrade --reuse-values` must not restart the database or roll Redis:
    the checksum annotations hash only the generated values each pod reads, and the value
    the install generated is the one an upgrade reads back."""
    kube.helm("install", release, str(CHART), "--namespace", namespace, timeout=HELM_TIMEOUT)
    installed = workload_templates(kube, namespace, release)
    assert len(installed) == 5
    for _ in range(2):
        kube.helm(
            "upgrade", release, str(CHART), "--namespace", namespace, "--reuse-values",
            "--no-hooks", timeout=HELM_TIMEOUT,
        )  # fmt: skip
        assert workload_templates(kube, namespace, release) == installed
    # A changed generated value still rolls exactly the pods that read it.
    kube.kubectl("delete", "secret", f"{release}-beam-redis-auth", "-n", namespace)
    kube.helm(
        "upgrade", release, str(CHART), "--namespace", namespace, "--reuse-values",
        "--no-hooks", timeout=HELM_TIMEOUT,
    )  # fmt: skip
    rolled = workload_templates(kube, namespace, release)
    changed = sorted(name for name in installed if rolled[name] != installed[name])
    assert changed == [
        f"{release}-beam-{suffix}" for suffix in ("operator", "redis", "redis-sentinel", "service")
    ]


def test_existing_secrets_replace_generated_ones(
    kube: ControlPlane, namespace: str, release: str
) -> None:
    kube.helm(
        "install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "-f",
        str(CI_VALUES["external"]),
        timeout=HELM_TIMEOUT,
    )
    assert release_secrets(kube, namespace, release) == {}
    env = container_env(kube, namespace, f"{release}-beam-service")
    assert env["BEAM_REDIS_SENTINEL_MASTER"] == "beam"
    assert env["BEAM_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "beam-redis", "key": "password"}}
    assert env["BEAM_REQUEST_TOKEN_SECRET"] == {
        "secretKeyRef": {"name": "beam-request-token", "key": "hmac-key"}
    }
    assert env["BEAM_DATABASE_URL"] == (
        "postgresql://postgres.data.svc.cluster.local:5432/beam?sslmode=require"
    )


# --- RBAC ------------------------------------------------------------------------------------


def test_operator_rbac_is_least_privilege(kube: ControlPlane, namespace: str, release: str) -> None:
    kube.helm("install", release, str(CHART), "--namespace", namespace, timeout=HELM_TIMEOUT)
    operator = f"system:serviceaccount:{namespace}:{release}-beam-operator"
    service = f"system:serviceaccount:{namespace}:{release}-beam-service"
    tenant = "default"

    allowed = [
        ("watch", "beamcustomers.beam.dev"),
        ("patch", "beamapikeys.beam.dev"),
        ("update", "beampricelists.beam.dev"),
        ("patch", "beamcustomers.beam.dev/status"),
        ("create", "secrets"),
        ("get", "secrets"),
        ("patch", "secrets"),
        ("delete", "secrets"),
        ("create", "events"),
        ("create", "events.events.k8s.io"),
        ("list", "namespaces"),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
        ("watch", "clusterkopfpeerings.kopf.dev"),
        ("patch", f"clusterkopfpeerings.kopf.dev/{release}-beam-{namespace}-operator"),
    ]
    denied = [
        ("create", "beamcustomers.beam.dev"),
        ("delete", "beamapikeys.beam.dev"),
        ("list", "pods"),
        ("create", "configmaps"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("delete", "namespaces"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("list", "kopfpeerings.kopf.dev"),
        ("create", "clusterkopfpeerings.kopf.dev"),
        ("delete", f"clusterkopfpeerings.kopf.dev/{release}-beam-{namespace}-operator"),
        ("patch", "clusterkopfpeerings.kopf.dev/another-operators"),
        # Secrets by name only: reading every Secret of the cluster is not the operator's job.
        ("list", "secrets"),
        ("watch", "secrets"),
        ("update", "secrets"),
    ]
    assert [rule for rule in allowed if not can_i(kube, operator, *rule, tenant)] == []
    assert [rule for rule in denied if can_i(kube, operator, *rule, tenant)] == []
    every_rule = allowed + denied
    assert [rule for rule in every_rule if can_i(kube, service, *rule, namespace)] == []


def test_the_operator_may_write_only_secrets_its_api_keys_own(
    kube: ControlPlane, namespace: str, release: str, tmp_path: Path
) -> None:
    """RBAC lets the operator create, patch and delete Secrets by name in every watched
    namespace; the chart's ValidatingAdmissionPolicy narrows writes to the Secrets a
    BeamApiKey controls (issue 18 item 9)."""
    kube.helm("install", release, str(CHART), "--namespace", namespace, timeout=HELM_TIMEOUT)
    tenant = f"{namespace}-s"
    kube.kubectl("create", "namespace", tenant)
    try:
        operator = kube.service_account_kubeconfig(
            namespace, f"{release}-beam-operator", tmp_path / "operator.kubeconfig"
        )
        key = {
            "apiVersion": "beam.dev/v1alpha1",
            "kind": "BeamApiKey",
            "metadata": {"name": "app", "namespace": tenant},
            "spec": {"role": "enforcer"},
        }
        kube.kubectl("apply", "-f", "-", input=json.dumps(key))
        uid = kube.kubectl(
            "get", "beamapikey/app", "-n", tenant, "-o", "jsonpath={.metadata.uid}"
        ).stdout
        owner = {"apiVersion": "beam.dev/v1alpha1", "kind": "BeamApiKey", "name": "app",
                 "uid": uid, "controller": True}  # fmt: skip

        def secret(name: str, owners: list[dict[str, Any]]) -> str:
            metadata = {"name": name, "namespace": tenant, "ownerReferences": owners}
            return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": metadata})

        refusal = "the Beam operator may only write Secrets a BeamApiKey controls"
        # The API server loads a new admission policy asynchronously (an informer, then a
        # type check): wait, bounded, until a dry run of a foreign Secret is refused.
        deadline = time.monotonic() + POLICY_LOAD_SECONDS
        while True:
            probe = kube.kubectl(
                "create", "--dry-run=server", "-f", "-", input=secret("probe", []),
                kubeconfig=operator, check=False,
            )  # fmt: skip
            if refusal in probe.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # Its own Secret: allowed (the RBAC and the policy both agree).
        mine = kube.kubectl(
            "create", "-f", "-", input=secret("app-key", [owner]), kubeconfig=operator
        )
        assert mine.returncode == 0
        # A Secret it does not own: refused on create...
        foreign = kube.kubectl(
            "create", "-f", "-", input=secret("foreign", []), kubeconfig=operator, check=False
        )
        assert foreign.returncode != 0
        assert refusal in foreign.stderr
        # ...and someone else's Secret can be neither adopted nor deleted.
        kube.kubectl("create", "-f", "-", input=secret("victim", []))
        adopt = kube.kubectl(
            "patch", "secret", "victim", "-n", tenant, "--type", "merge", "-p",
            json.dumps({"metadata": {"ownerReferences": [owner]}}),
            kubeconfig=operator, check=False,
        )  # fmt: skip
        assert adopt.returncode != 0
        assert refusal in adopt.stderr
        delete = kube.kubectl(
            "delete", "secret", "victim", "-n", tenant, kubeconfig=operator, check=False
        )
        assert delete.returncode != 0
        assert refusal in delete.stderr
        # Other accounts are not the policy's business.
        kube.kubectl("delete", "secret", "victim", "-n", tenant)
        kube.kubectl("delete", "secret", "app-key", "-n", tenant, kubeconfig=operator)
    finally:
        kube.kubectl("delete", "namespace", tenant, "--wait=false", check=False)


def test_operator_rbac_follows_watched_namespaces(
    kube: ControlPlane, namespace: str, release: str
) -> None:
    watched, other = f"{namespace}-w", f"{namespace}-o"
    for name in (watched, other):
        kube.kubectl("create", "namespace", name)
    try:
        kube.helm(
            "install",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--set",
            f"operator.watchNamespaces={{{watched}}}",
            timeout=HELM_TIMEOUT,
        )
        operator = f"system:serviceaccount:{namespace}:{release}-beam-operator"
        assert can_i(kube, operator, "create", "secrets", watched)
        assert can_i(kube, operator, "patch", "beamcustomers.beam.dev/status", watched)
        assert not can_i(kube, operator, "create", "secrets", other)
        assert not can_i(kube, operator, "watch", "beamcustomers.beam.dev", other)
        assert can_i(kube, operator, "list", "namespaces", other)  # cluster-scoped read
        # Kopf peering: the release's KopfPeering in the watched namespace, and only there.
        peering = f"kopfpeerings.kopf.dev/{release}-beam-{namespace}-operator"
        assert kube.kubectl("get", peering, "-n", watched).returncode == 0
        assert can_i(kube, operator, "patch", peering, watched)
        assert not can_i(kube, operator, "patch", peering, other)
        assert not can_i(kube, operator, "watch", "clusterkopfpeerings.kopf.dev", other)
        env = container_env(kube, namespace, f"{release}-beam-operator")
        assert env["BEAM_NAMESPACES"] == watched
    finally:
        kube.helm("uninstall", release, "--namespace", namespace, "--no-hooks", check=False)
        for name in (watched, other):
            kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_uninstall_cleanup_removes_the_finalizers_as_its_service_account(
    kube: ControlPlane, namespace: str, release: str, tmp_path: Path
) -> None:
    tenant = f"{namespace}-t"
    kube.kubectl("create", "namespace", tenant)
    try:
        kube.helm("install", release, str(CHART), "--namespace", namespace, timeout=HELM_TIMEOUT)
        # What the operator leaves behind: its finalizer (next to someone else's), and an
        # object of another release's operator (operator.instance "other"), which stays.
        for kind, name, spec, labels in (
            ("BeamCustomer", "acme", {"customerId": "cus_acme"}, {}),
            ("BeamApiKey", "app", {"role": "enforcer"}, {}),
            ("BeamCustomer", "theirs", {"customerId": "cus_theirs"},
             {"beam.dev/operator-instance": "other"}),
        ):  # fmt: skip
            manifest = {
                "apiVersion": "beam.dev/v1alpha1",
                "kind": kind,
                "metadata": {
                    "name": name,
                    "namespace": tenant,
                    "labels": labels,
                    "finalizers": ["beam.dev/finalizer", "example.com/keep"],
                },
                "spec": spec,
            }
            kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))

        # The pre-delete hook's objects and script, as `helm uninstall` would create and run them.
        hook = [
            doc
            for doc in documents(
                kube.helm(
                    "template", release, str(CHART), "--namespace", namespace, timeout=HELM_TIMEOUT
                ).stdout
            )
            if (doc["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
            == "operator-cleanup"
        ]
        assert all(d["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete" for d in hook)
        rbac = [d for d in hook if d["kind"] != "Job"]
        kube.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in rbac))
        try:
            job = next(d for d in hook if d["kind"] == "Job")
            cleanup = job["spec"]["template"]["spec"]["containers"][0]
            assert job["spec"]["template"]["spec"]["serviceAccountName"] == (
                f"{release}-beam-operator-cleanup"
            )
            kubeconfig = kube.service_account_kubeconfig(
                namespace, f"{release}-beam-operator-cleanup", tmp_path / "cleanup.kubeconfig"
            )
            env = {e["name"]: e["value"] for e in cleanup["env"]}
            result = subprocess.run(
                [sys.executable, *cleanup["command"][1:]],
                env={**os.environ, **env, "KUBECONFIG": str(kubeconfig)},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert "removed beam.dev/finalizer from 2 objects" in result.stdout
        finally:
            objects = "\n---\n".join(json.dumps(d) for d in rbac)
            kube.kubectl("delete", "-f", "-", "--wait=false", input=objects, check=False)
        scale = json.loads(
            kube.kubectl(
                "get", "deployment", f"{release}-beam-operator", "-n", namespace, "-o", "json"
            ).stdout
        )
        assert scale["spec"]["replicas"] == 0
        for resource in ("beamcustomer/acme", "beamapikey/app"):
            obj = json.loads(kube.kubectl("get", resource, "-n", tenant, "-o", "json").stdout)
            assert obj["metadata"]["finalizers"] == ["example.com/keep"]
        theirs = json.loads(
            kube.kubectl("get", "beamcustomer/theirs", "-n", tenant, "-o", "json").stdout
        )
        assert theirs["metadata"]["finalizers"] == ["beam.dev/finalizer", "example.com/keep"]
    finally:
        kube.kubectl("delete", "namespace", tenant, "--wait=false", check=False)

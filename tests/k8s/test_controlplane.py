"""The test control plane behaves like a real cluster where Beam depends on it.

Beam's operator relies on server-side behaviour that a fake API would only imitate: namespace
deletion (a namespace is a tenant), owner-reference garbage collection (an API key's Secret is
owned by its BeamApiKey), ServiceAccount tokens checked by RBAC (the operator's permissions),
and helm installs. These tests pin that the harness in hack/controlplane/ provides each one,
at the versions in versions.env. Under BEAM_TEST_KUBECONFIG the version checks are skipped
(the cluster is someone else's); the behaviour checks run against it unchanged.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.controlplane import ControlPlane, pinned_versions

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]  # starts the control plane

# Bounds for waiting on controllers; they normally converge in a second or two.
CONVERGE_TIMEOUT_SECONDS = 60.0
POLL_INTERVAL_SECONDS = 0.25


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CONVERGE_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(POLL_INTERVAL_SECONDS)
    pytest.fail(f"not within {CONVERGE_TIMEOUT_SECONDS:.0f}s: {what}")


def exists(kube: ControlPlane, *resource: str) -> bool:
    result = kube.kubectl("get", *resource, "-o", "name", check=False)
    if result.returncode == 0:
        return True
    assert "NotFound" in result.stderr, result.stderr
    return False


def get_json(kube: ControlPlane, *resource: str) -> dict[str, object]:
    document: dict[str, object] = json.loads(kube.kubectl("get", *resource, "-o", "json").stdout)
    return document


def config_map(name: str, namespace: str, **metadata: object) -> str:
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "data": {"owner": name},
    }
    return json.dumps(manifest)


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"beam-cp-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


# --- versions --------------------------------------------------------------------------------


def test_api_server_reports_the_pinned_kubernetes_version(control_plane: ControlPlane) -> None:
    if control_plane.is_external:
        pytest.skip("BEAM_TEST_KUBECONFIG cluster: its version is not ours to pin")
    expected = pinned_versions()["KUBERNETES_VERSION"]
    version = json.loads(control_plane.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == expected
    assert (version["major"], version["minor"]) == ("1", expected.split(".")[1])
    assert version["gitTreeState"] == "clean"
    client = json.loads(control_plane.kubectl("version", "--client", "-o", "json").stdout)
    assert client["clientVersion"]["gitVersion"] == expected


def test_helm_reports_the_pinned_version(control_plane: ControlPlane) -> None:
    if control_plane.is_external:
        pytest.skip("BEAM_TEST_KUBECONFIG: helm comes from PATH, not the pinned build")
    shown = control_plane.helm("version", "--template", "{{.Version}}").stdout
    assert shown == pinned_versions()["HELM_VERSION"]


# --- namespaces ------------------------------------------------------------------------------


def test_new_namespace_gets_its_service_account_and_root_ca(
    control_plane: ControlPlane, namespace: str
) -> None:
    wait_until(
        lambda: exists(control_plane, "serviceaccount", "default", "-n", namespace),
        f"ServiceAccount {namespace}/default created by the serviceaccount controller",
    )
    wait_until(
        lambda: exists(control_plane, "configmap", "kube-root-ca.crt", "-n", namespace),
        f"ConfigMap {namespace}/kube-root-ca.crt published by root-ca-cert-publisher",
    )
    published = get_json(control_plane, "configmap", "kube-root-ca.crt", "-n", namespace)
    data = published["data"]
    assert isinstance(data, dict)
    assert data["ca.crt"].startswith("-----BEGIN CERTIFICATE-----")


def test_deleted_namespace_is_emptied_and_removed(control_plane: ControlPlane) -> None:
    name = f"beam-cp-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl("create", "namespace", name)
    control_plane.kubectl("create", "-f", "-", input=config_map("tenant-data", name))

    control_plane.kubectl("delete", "namespace", name, "--wait=false")
    phase = control_plane.kubectl(
        "get", "namespace", name, "-o", "jsonpath={.status.phase}", check=False
    )
    # Either still finalizing or already gone: the namespace controller may be that quick.
    if phase.returncode == 0:
        assert phase.stdout == "Terminating"
    else:
        assert "NotFound" in phase.stderr
    refused = control_plane.kubectl(
        "create", "-f", "-", input=config_map("late", name), check=False
    )
    assert refused.returncode != 0
    assert "is being terminated" in refused.stderr or "NotFound" in refused.stderr

    wait_until(
        lambda: not exists(control_plane, "namespace", name),
        f"namespace {name} removed by the namespace controller",
    )
    listed = control_plane.kubectl(
        "get", "configmaps", "-n", name, "-o", "name", "--ignore-not-found"
    )
    assert listed.stdout == ""


# --- garbage collection ----------------------------------------------------------------------


def create_owned_pair(kube: ControlPlane, namespace: str) -> None:
    """ConfigMap `owner` and ConfigMap `dependent` with an ownerReference to it."""
    kube.kubectl("create", "-f", "-", input=config_map("owner", namespace))
    owner_uid = kube.kubectl(
        "get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    assert owner_uid
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
    kube.kubectl(
        "create",
        "-f",
        "-",
        input=config_map("dependent", namespace, ownerReferences=[reference]),
    )


def test_dependent_is_collected_after_its_owner_is_deleted(
    control_plane: ControlPlane, namespace: str
) -> None:
    create_owned_pair(control_plane, namespace)
    assert exists(control_plane, "configmap", "dependent", "-n", namespace)

    control_plane.kubectl("delete", "configmap", "owner", "-n", namespace, "--cascade=background")
    wait_until(
        lambda: not exists(control_plane, "configmap", "dependent", "-n", namespace),
        "garbage collector deleting the dependent ConfigMap",
    )


def test_orphaned_dependent_survives_and_loses_its_owner_reference(
    control_plane: ControlPlane, namespace: str
) -> None:
    create_owned_pair(control_plane, namespace)

    control_plane.kubectl("delete", "configmap", "owner", "-n", namespace, "--cascade=orphan")
    wait_until(
        lambda: not exists(control_plane, "configmap", "owner", "-n", namespace),
        "owner removed once the garbage collector has orphaned its dependents",
    )
    dependent = get_json(control_plane, "configmap", "dependent", "-n", namespace)
    metadata = dependent["metadata"]
    assert isinstance(metadata, dict)
    assert metadata.get("ownerReferences") is None


# --- authentication and RBAC -----------------------------------------------------------------


def test_service_account_token_is_authenticated_and_limited_by_rbac(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    control_plane.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    control_plane.kubectl("create", "-f", "-", input=config_map("settings", namespace))
    kubeconfig = control_plane.service_account_kubeconfig(
        namespace, "reader", tmp_path / "reader.kubeconfig"
    )
    user = f"system:serviceaccount:{namespace}:reader"

    def as_reader(*args: str) -> subprocess.CompletedProcess[str]:
        return control_plane.kubectl(*args, check=False, kubeconfig=kubeconfig)

    whoami = json.loads(
        control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout
    )
    assert whoami["status"]["userInfo"]["username"] == user
    assert "system:serviceaccounts" in whoami["status"]["userInfo"]["groups"]

    denied = as_reader("get", "configmaps", "-n", namespace)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert f'User "{user}" cannot list resource "configmaps"' in denied.stderr

    control_plane.kubectl(
        "create",
        "role",
        "read-config",
        "--verb=get,list",
        "--resource=configmaps",
        "-n",
        namespace,
    )
    control_plane.kubectl(
        "create",
        "rolebinding",
        "reader-reads-config",
        "--role=read-config",
        f"--serviceaccount={namespace}:reader",
        "-n",
        namespace,
    )
    # The RBAC authorizer reads roles from an informer cache: allow it to catch up.
    wait_until(
        lambda: as_reader("auth", "can-i", "list", "configmaps", "-n", namespace).returncode == 0,
        "RoleBinding granting list configmaps taking effect",
    )
    listed = as_reader("get", "configmaps", "-n", namespace, "-o", "name")
    assert listed.returncode == 0, listed.stderr
    assert "configmap/settings" in listed.stdout.split()

    # Only what was granted: no writes, and nothing in other namespaces.
    refused = control_plane.kubectl(
        "create",
        "-f",
        "-",
        input=config_map("sneaky", namespace),
        check=False,
        kubeconfig=kubeconfig,
    )
    assert refused.returncode != 0
    assert f'User "{user}" cannot create resource "configmaps"' in refused.stderr
    assert as_reader("auth", "can-i", "delete", "configmaps", "-n", namespace).stdout == "no\n"
    assert as_reader("auth", "can-i", "list", "configmaps", "-n", "default").stdout == "no\n"


def test_tampered_token_is_rejected(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    control_plane.kubectl("create", "serviceaccount", "victim", "-n", namespace)
    kubeconfig = control_plane.service_account_kubeconfig(
        namespace, "victim", tmp_path / "victim.kubeconfig"
    )
    config = json.loads(kubeconfig.read_text(encoding="utf-8"))
    token: str = config["users"][0]["user"]["token"]
    header, payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    config["users"][0]["user"]["token"] = f"{header}.{payload}.{flipped}"
    kubeconfig.write_text(json.dumps(config), encoding="utf-8")

    result = control_plane.kubectl("auth", "whoami", check=False, kubeconfig=kubeconfig)
    assert result.returncode != 0
    assert "Unauthorized" in result.stderr


# --- helm ------------------------------------------------------------------------------------


def test_helm_installs_and_uninstalls_a_chart(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: probe\nversion: 0.1.0\n", encoding="utf-8"
    )
    (chart / "values.yaml").write_text("greeting: hello\n", encoding="utf-8")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-probe\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n",
        encoding="utf-8",
    )

    control_plane.helm(
        "install",
        "rel",
        str(chart),
        "-n",
        namespace,
        "--set",
        "greeting=hi",
        "--wait",
        "--timeout",
        "60s",
    )
    installed = get_json(control_plane, "configmap", "rel-probe", "-n", namespace)
    assert installed["data"] == {"greeting": "hi"}
    releases = json.loads(control_plane.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"], r["chart"]) for r in releases] == [
        ("rel", "deployed", "probe-0.1.0")
    ]

    control_plane.helm("uninstall", "rel", "-n", namespace, "--wait", "--timeout", "60s")
    assert not exists(control_plane, "configmap", "rel-probe", "-n", namespace)
    assert json.loads(control_plane.helm("list", "-n", namespace, "-o", "json").stdout) == []

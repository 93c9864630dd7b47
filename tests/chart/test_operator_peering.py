"""The chart's operator peering, on `helm template` output (issue 18 item 12).

One name ties three things together: the Kopf peering object the chart creates (a
ClusterKopfPeering, or a KopfPeering in each watched namespace), the only object of that
kind the operator's RBAC lets it get and patch, and BEAM_PEERING_NAME in its Deployment.
tests/k8s/test_operator_peering.py runs two operators with exactly these objects.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, Helm

pytestmark = pytest.mark.timeout(120)

NAME = "beam-beam-test-operator"  # <fullname>-<release namespace>-operator
LIST_WATCH = ["list", "watch"]
GET_PATCH = ["get", "patch"]


def render(helm: Helm, *args: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(helm.template(*args)) if doc]


def operator_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = next(d for d in docs if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "beam-operator")  # fmt: skip
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def peering_objects(docs: list[dict[str, Any]]) -> list[tuple[str, str | None, str]]:
    return [
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        for d in docs
        if d["apiVersion"] == "kopf.dev/v1"
    ]


def kopf_rules(docs: list[dict[str, Any]], kind: str) -> dict[str | None, list[dict[str, Any]]]:
    """The kopf.dev rules of the operator's ClusterRole or Roles, by namespace."""
    return {
        d["metadata"].get("namespace"): [r for r in d["rules"] if r["apiGroups"] == ["kopf.dev"]]
        for d in docs
        if d["kind"] == kind
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    }


def rules(resource: str) -> list[dict[str, Any]]:
    return [
        {"apiGroups": ["kopf.dev"], "resources": [resource], "verbs": LIST_WATCH},
        {"apiGroups": ["kopf.dev"], "resources": [resource], "resourceNames": [NAME],
         "verbs": GET_PATCH},
    ]  # fmt: skip


def test_all_namespaces_peer_through_one_cluster_kopf_peering(helm: Helm) -> None:
    docs = render(helm)
    assert peering_objects(docs) == [("ClusterKopfPeering", None, NAME)]
    peering = next(d for d in docs if d["kind"] == "ClusterKopfPeering")
    assert peering["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    assert "status" not in peering  # the operators' keep-alives
    assert kopf_rules(docs, "ClusterRole") == {None: rules("clusterkopfpeerings")}
    assert kopf_rules(docs, "Role") == {}
    env = operator_env(docs)
    assert env["BEAM_STANDALONE"] == "false"
    assert env["BEAM_PEERING_NAME"] == NAME
    assert env["BEAM_PEERING_LIFETIME_SECONDS"] == "60"
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # Kopf's identity


def test_watched_namespaces_each_get_a_kopf_peering(helm: Helm) -> None:
    docs = render(
        helm, "--set", "operator.watchNamespaces={acme,globex}",
        "--set", "operator.peering.lifetimeSeconds=30",
    )  # fmt: skip
    assert peering_objects(docs) == [
        ("KopfPeering", "acme", NAME),
        ("KopfPeering", "globex", NAME),
    ]
    assert kopf_rules(docs, "ClusterRole") == {None: []}  # no cluster-wide peering
    assert kopf_rules(docs, "Role") == {ns: rules("kopfpeerings") for ns in ("acme", "globex")}
    env = operator_env(docs)
    assert (env["BEAM_NAMESPACES"], env["BEAM_PEERING_NAME"]) == ("acme,globex", NAME)
    assert env["BEAM_PEERING_LIFETIME_SECONDS"] == "30"


def test_disabled_peering_runs_the_operator_standalone(helm: Helm) -> None:
    for extra in ((), ("--set", "operator.watchNamespaces={acme}")):
        docs = render(helm, "--set", "operator.peering.enabled=false", *extra)
        assert peering_objects(docs) == []
        assert all(rules == [] for rules in kopf_rules(docs, "ClusterRole").values())
        assert all(rules == [] for rules in kopf_rules(docs, "Role").values())
        env = operator_env(docs)
        assert env["BEAM_STANDALONE"] == "true"
        assert not {"BEAM_PEERING_NAME", "BEAM_PEERING_LIFETIME_SECONDS", "POD_ID"} & set(env)


def test_releases_and_namespaces_never_share_a_peering(helm: Helm) -> None:
    def name(release: str, namespace: str) -> str:
        manifest = helm.run("template", release, str(CHART), "--namespace", namespace).stdout
        docs = [d for d in yaml.safe_load_all(manifest) if d]
        (peering,) = peering_objects(docs)
        return peering[2]

    assert name("one", "ns-a") == "one-beam-ns-a-operator"
    assert len({name("one", "ns-a"), name("two", "ns-a"), name("one", "ns-b")}) == 3


def test_peering_lifetime_is_bounded(helm: Helm) -> None:
    for value in ("9", "3601"):
        result = helm.run(
            "template", "beam", str(CHART), "--set", f"operator.peering.lifetimeSeconds={value}",
            check=False,
        )  # fmt: skip
        assert result.returncode != 0
        assert "/operator/peering/lifetimeSeconds" in result.stderr

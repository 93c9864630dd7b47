"""Static checks of the CRDs in crds/: every field described and bounded.

The API server only enforces the bounds a schema states, and a field without `maxLength`,
`maxItems` or `maximum` also blows the CEL cost budget of any rule that touches it. These
tests walk every schema node of every CRD so a field added later cannot slip in unbounded or
undocumented. No cluster needed: tests/k8s/test_crds.py proves the API server enforces them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"
EXAMPLES_DIR = REPO_ROOT / "examples"

# Largest integer a float64 (how OpenAPI stores `maximum`) and a JSON client hold exactly.
MAX_SAFE_INTEGER = 2**53 - 1

EXPECTED_CRDS = {
    "beam.dev_beamcustomers.yaml": ("BeamCustomer", ["bc", "beamcust"]),
    "beam.dev_beamapikeys.yaml": ("BeamApiKey", ["bak"]),
    "beam.dev_beampricelists.yaml": ("BeamPriceList", ["bpl"]),
}

# Root fields whose schema Kubernetes owns: a CRD may not even describe metadata, only
# restrict metadata.name and metadata.generateName.
ROOT_EXEMPT = {"metadata"}

SchemaNode = tuple[str, dict[str, Any]]


def load_crd(file_name: str) -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all((CRD_DIR / file_name).read_text()) if d]
    assert len(documents) == 1, f"{file_name}: expected one document, got {len(documents)}"
    crd: dict[str, Any] = documents[0]
    return crd


def only_version(crd: dict[str, Any]) -> dict[str, Any]:
    versions = crd["spec"]["versions"]
    assert [v["name"] for v in versions] == ["v1alpha1"]
    version: dict[str, Any] = versions[0]
    return version


def walk(path: str, node: dict[str, Any]) -> Iterator[SchemaNode]:
    """Yield (path, schema) for `node` and every schema below it."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(f"{path}.{name}", child)
    if "items" in node:
        yield from walk(f"{path}[]", node["items"])
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        yield from walk(f"{path}{{}}", additional)


def all_nodes() -> list[tuple[str, str, dict[str, Any]]]:
    """(file, path, schema) for every schema node of every CRD, root fields exempted."""
    nodes: list[tuple[str, str, dict[str, Any]]] = []
    for file_name in sorted(EXPECTED_CRDS):
        root = only_version(load_crd(file_name))["schema"]["openAPIV3Schema"]
        for name, child in root["properties"].items():
            if name in ROOT_EXEMPT:
                continue
            nodes.extend((file_name, p, n) for p, n in walk(name, child))
    return nodes


NODES = all_nodes()


def nodes_of_type(type_name: str) -> list[Any]:
    return [
        pytest.param(node, id=f"{file_name}:{path}")
        for file_name, path, node in NODES
        if node.get("type") == type_name
    ]


# Kopf's own peering CRDs (kopf.dev), shipped as Kopf defines them: not Beam's kinds, so the
# checks below do not apply (tests/unit/test_operator_peering.py checks them).
KOPF_PEERING_CRDS = ("kopf.dev_clusterkopfpeerings.yaml", "kopf.dev_kopfpeerings.yaml")


def test_crd_directory_holds_exactly_the_three_kinds_and_kopfs_peering() -> None:
    found = sorted(p.name for p in CRD_DIR.glob("*.yaml"))
    assert found == sorted([*EXPECTED_CRDS, *KOPF_PEERING_CRDS])


@pytest.mark.parametrize(("file_name", "kind_and_short_names"), EXPECTED_CRDS.items())
def test_crd_identity(file_name: str, kind_and_short_names: tuple[str, list[str]]) -> None:
    kind, short_names = kind_and_short_names
    crd = load_crd(file_name)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    spec = crd["spec"]
    plural = f"{kind.lower()}s"
    assert crd["metadata"]["name"] == f"{plural}.beam.dev"
    assert file_name == f"beam.dev_{plural}.yaml"
    assert spec["group"] == "beam.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == kind
    assert spec["names"]["plural"] == plural
    assert spec["names"]["shortNames"] == short_names
    assert spec["names"]["categories"] == ["beam"]
    version = only_version(crd)
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}
    root = version["schema"]["openAPIV3Schema"]
    assert root["type"] == "object"
    assert "spec" in root["required"]
    assert {"spec", "status"} <= set(root["properties"])
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert "Ready" in columns
    assert columns[-1] == "Age"


@pytest.mark.parametrize(
    ("file_name", "path", "node"),
    [pytest.param(f, p, n, id=f"{f}:{p}") for f, p, n in NODES],
)
def test_every_field_is_described_and_typed(file_name: str, path: str, node: Any) -> None:
    assert node.get("description", "").strip(), f"{file_name}: {path} has no description"
    assert node.get("type") in {"object", "array", "string", "integer", "boolean"}, (
        f"{file_name}: {path} has no structural type (found {node.get('type')!r})"
    )
    assert "x-kubernetes-preserve-unknown-fields" not in node, (
        f"{file_name}: {path} keeps unknown fields; give it a schema"
    )


@pytest.mark.parametrize("node", nodes_of_type("string"))
def test_every_string_is_bounded(node: dict[str, Any]) -> None:
    if "enum" in node:
        assert all(isinstance(v, str) and v for v in node["enum"])
        return
    if node.get("format") == "date-time":
        return
    assert isinstance(node.get("maxLength"), int), "string without maxLength"
    assert 1 <= node["maxLength"] <= 32768


@pytest.mark.parametrize("node", nodes_of_type("array"))
def test_every_array_is_bounded_and_has_a_list_type(node: dict[str, Any]) -> None:
    assert isinstance(node.get("maxItems"), int), "array without maxItems"
    assert 1 <= node["maxItems"] <= 1000
    list_type = node.get("x-kubernetes-list-type")
    assert list_type in {"map", "set"}, "array without x-kubernetes-list-type map or set"
    items = node["items"]
    if list_type == "map":
        keys = node["x-kubernetes-list-map-keys"]
        assert keys, "map list without keys"
        # The API server can only key items on fields every item has.
        assert set(keys) <= set(items["required"])
    else:
        assert items["type"] in {"string", "integer"}, "a set must hold scalars"


@pytest.mark.parametrize("node", nodes_of_type("integer"))
def test_every_integer_is_bounded_exactly(node: dict[str, Any]) -> None:
    assert isinstance(node.get("minimum"), int), "integer without minimum"
    assert isinstance(node.get("maximum"), int), "integer without maximum"
    assert node["minimum"] <= node["maximum"]
    # Bounds are stored as float64: past 2^53 they would silently round.
    assert node["minimum"] >= -MAX_SAFE_INTEGER
    assert node["maximum"] <= MAX_SAFE_INTEGER
    assert node.get("format") in {"int32", "int64"}
    if node["format"] == "int32":
        assert node["maximum"] < 2**31
    if "default" in node:
        assert node["minimum"] <= node["default"] <= node["maximum"]


@pytest.mark.parametrize(
    ("file_name", "path", "node"),
    [
        pytest.param(f, p, n, id=f"{f}:{p}")
        for f, p, n in NODES
        if p.split(".")[-1].removesuffix("[]") in {"balance", "reserved", "available"}
        or "Grains" in p.split(".")[-1]
    ],
)
def test_grain_amounts_are_int64(file_name: str, path: str, node: Any) -> None:
    assert node["type"] == "integer", f"{file_name}: {path}"
    assert node["format"] == "int64", f"{file_name}: {path}"


def test_no_phase_field_anywhere() -> None:
    offenders = [f"{f}:{p}" for f, p, _ in NODES if p.split(".")[-1].lower() == "phase"]
    assert offenders == []


@pytest.mark.parametrize("file_name", sorted(EXPECTED_CRDS))
def test_every_cel_rule_has_a_message(file_name: str) -> None:
    root = only_version(load_crd(file_name))["schema"]["openAPIV3Schema"]
    rules = [r for _, node in walk("", root) for r in node.get("x-kubernetes-validations", [])]
    for rule in rules:
        assert rule.get("message", "").strip(), f"{file_name}: rule {rule['rule']!r}"


@pytest.mark.parametrize("file_name", sorted(EXPECTED_CRDS))
def test_conditions_are_metav1_condition_shaped(file_name: str) -> None:
    root = only_version(load_crd(file_name))["schema"]["openAPIV3Schema"]
    status = root["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["maxItems"] == 16
    item = conditions["items"]
    assert set(item["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["reason"]["pattern"] == "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert status["properties"]["observedGeneration"]["format"] == "int64"


def spec_of(file_name: str) -> dict[str, Any]:
    root = only_version(load_crd(file_name))["schema"]["openAPIV3Schema"]
    spec: dict[str, Any] = root["properties"]["spec"]
    return spec


def test_customer_id_is_required_immutable_and_patterned() -> None:
    spec = spec_of("beam.dev_beamcustomers.yaml")
    assert spec["required"] == ["customerId"]
    customer_id = spec["properties"]["customerId"]
    assert customer_id["maxLength"] == 128
    assert customer_id["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
    assert [r["rule"] for r in customer_id["x-kubernetes-validations"]] == ["self == oldSelf"]


def test_credit_amount_is_immutable_per_credit_id() -> None:
    credits = spec_of("beam.dev_beamcustomers.yaml")["properties"]["credits"]
    assert credits["x-kubernetes-list-type"] == "map"
    assert credits["x-kubernetes-list-map-keys"] == ["id"]
    amount = credits["items"]["properties"]["amountGrains"]
    assert (amount["minimum"], amount["maximum"]) == (1, MAX_SAFE_INTEGER)
    (rule,) = amount["x-kubernetes-validations"]
    assert rule["rule"] == "self == oldSelf"
    assert rule["message"] == (
        "credit amountGrains is immutable once applied; add a new credit id instead"
    )


def field_paths_of(value: Any, prefix: str = "") -> Iterator[str]:
    """Every field path in an example object, with list items as []."""
    if isinstance(value, dict):
        for key, child in value.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path
            yield from field_paths_of(child, path)
    elif isinstance(value, list):
        for child in value:
            yield from field_paths_of(child, f"{prefix}[]")


def test_examples_use_only_schema_fields_and_set_a_namespace() -> None:
    schema_paths = {
        f"{kind}:{p}"
        for file_name, (kind, _) in EXPECTED_CRDS.items()
        for f, p, _ in NODES
        if f == file_name
    }
    beam_objects = 0
    for example in sorted(EXAMPLES_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(example.read_text()):
            if not document or document["kind"] == "Namespace":
                continue
            beam_objects += 1
            assert document["apiVersion"] == "beam.dev/v1alpha1"
            assert document["metadata"]["namespace"] == "acme", example.name
            for path in field_paths_of(document["spec"], "spec"):
                assert f"{document['kind']}:{path}" in schema_paths, f"{example.name}: {path}"
    assert beam_objects == 4  # one price list, one customer, two API keys

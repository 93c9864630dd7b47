"""The Helm chart's contract with its users, checked without a cluster.

- Every key of values.yaml is documented by a `## @param` line and every `## @param` names a
  key that exists (Bitnami readme-generator convention, STYLE.md), so the docs cannot rot.
- values.schema.json declares every key, accepts the defaults and the CI value sets, and
  rejects the mistakes users make: a word where a number goes, a misspelt key, a Redis mode
  Beam does not speak. Helm validates values against the same file at install time.
- The chart ships the repository's CRDs byte for byte (Helm installs charts/beam/crds/), so
  `helm install` and `kubectl apply -f crds/` can never disagree.
- The chart README's parameter tables are the `## @param` lines, in order.
- The image and the chart agree on the user id and the ports.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "beam"
VALUES_FILE = CHART_DIR / "values.yaml"
SCHEMA_FILE = CHART_DIR / "values.schema.json"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
PARAM_LINE = re.compile(r"^\s*## @param (\S+) \S")

# Objects whose keys are free-form (label maps, selectors, Kubernetes structs): documented as
# one parameter, and their keys are the user's, not the chart's.
FREE_FORM_KEYS = frozenset(
    {
        "nodeSelector",
        "podLabels",
        "podAnnotations",
        "annotations",
        "labels",
        "commonLabels",
        "commonAnnotations",
        "affinity",
        "ingressNamespaceSelector",
        "ingressPodSelector",
        "metricsNamespaceSelector",
        "metricsPodSelector",
    }
)


def load_values() -> dict[str, Any]:
    values = yaml.safe_load(VALUES_FILE.read_text(encoding="utf-8"))
    assert isinstance(values, dict)
    return values


def load_schema() -> dict[str, Any]:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


def leaf_paths(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of every leaf: scalars, lists, empty maps and free-form maps."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in FREE_FORM_KEYS:
            yield from leaf_paths(value, f"{path}.")
        else:
            yield path


def all_paths(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict):
            yield from all_paths(value, f"{path}.")


def documented_params() -> list[str]:
    params = []
    for line in VALUES_FILE.read_text(encoding="utf-8").splitlines():
        match = PARAM_LINE.match(line)
        if match:
            params.append(match.group(1))
    return params


def coalesce(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of user values over the chart's: maps merge, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = coalesce(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validation_errors(values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(load_schema())
    return [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(values)
    ]


def with_value(path: str, value: Any) -> dict[str, Any]:
    """The chart defaults with one dotted path set (created when missing)."""
    values = load_values()
    *parents, last = path.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return values


# --- documentation -------------------------------------------------------------------------


def test_every_values_key_has_a_param_line() -> None:
    documented = set(documented_params())
    missing = [path for path in leaf_paths(load_values()) if path not in documented]
    assert missing == [], f"values.yaml keys without a '## @param' line: {missing}"


def test_every_param_line_names_an_existing_key() -> None:
    existing = set(all_paths(load_values()))
    stale = [param for param in documented_params() if param not in existing]
    assert stale == [], f"'## @param' lines for keys values.yaml does not have: {stale}"


def test_readme_parameter_tables_match_the_param_lines() -> None:
    readme = (CHART_DIR / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \| `.*` \|$", readme, re.MULTILINE)
    params = re.findall(
        r"^\s*## @param (\S+) (.*)$", VALUES_FILE.read_text(encoding="utf-8"), re.MULTILINE
    )
    expected = [(name, text.replace("|", "\\|")) for name, text in params]
    assert rows == expected, "run `python -m tests.chart.readme` to regenerate the README tables"


def test_no_key_is_documented_twice() -> None:
    params = documented_params()
    duplicates = sorted({param for param in params if params.count(param) > 1})
    assert duplicates == []


# --- schema ----------------------------------------------------------------------------------


def test_schema_is_valid_draft_07() -> None:
    schema = load_schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)


def schema_node(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The subschema for a dotted path: a declared property, or a typed additionalProperties."""
    node: dict[str, Any] | None = schema
    for key in path.split("."):
        if node is None:
            return None
        declared = node.get("properties", {}).get(key)
        extra = node.get("additionalProperties")
        node = declared if declared is not None else extra if isinstance(extra, dict) else None
    return node


def test_schema_declares_every_values_key() -> None:
    schema = load_schema()
    undeclared = [path for path in leaf_paths(load_values()) if schema_node(schema, path) is None]
    assert undeclared == [], f"values.yaml keys missing from values.schema.json: {undeclared}"


def test_defaults_satisfy_the_schema() -> None:
    assert validation_errors(load_values()) == []


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda path: path.name)
def test_ci_value_sets_satisfy_the_schema(values_file: Path) -> None:
    override = yaml.safe_load(values_file.read_text(encoding="utf-8")) or {}
    assert validation_errors(coalesce(load_values(), override)) == []


def test_the_ci_value_sets_exist() -> None:
    assert [path.name for path in CI_VALUES] == [
        "default-values.yaml",
        "external-values.yaml",
        "gitops-values.yaml",
        "minimal-values.yaml",
    ]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("service.replicaCount", "two", "'two' is not of type 'integer'"),
        (
            "replicaCount",
            2,
            "Additional properties are not allowed ('replicaCount' was unexpected)",
        ),
        (
            "service.replicas",
            2,
            "Additional properties are not allowed ('replicas' was unexpected)",
        ),
        (
            "externalRedis.mode",
            "replica",
            "'replica' is not one of ['standalone', 'sentinel', 'cluster']",
        ),
        (
            "redis.architecture",
            "sentinel",
            "'sentinel' is not one of ['standalone', 'replication']",
        ),
        ("operator.replicaCount", 2, "2 is greater than the maximum of 1"),
        ("service.service.ports.grpc", 70000, "70000 is greater than the maximum of 65535"),
        ("config.environment", "staging", "'staging' is not one of ['dev', 'production']"),
        ("externalRedis.sentinels", ["no-port"], "'no-port' does not match"),
        ("service.containerSecurityContext.runAsUsr", 0, "('runAsUsr' was unexpected)"),
        ("gitops.enabled", "yes", "'yes' is not of type 'boolean'"),
        ("service.migrateOnStart", "sometimes", "'sometimes' is not valid under any"),
        ("redis.sentinel.zoneSpreadPreset", "zone", "'zone' is not one of ['', 'soft', 'hard']"),
    ],
)
def test_schema_rejects_mistakes(path: str, value: Any, expected: str) -> None:
    errors = validation_errors(with_value(path, value))
    assert len(errors) == 1, errors
    assert expected in errors[0]


def test_schema_rejects_a_missing_required_key() -> None:
    values = load_values()
    del values["service"]["autoscaling"]
    assert validation_errors(values) == ["service: 'autoscaling' is a required property"]


# --- CRDs ------------------------------------------------------------------------------------


def test_chart_ships_the_repository_crds_byte_for_byte() -> None:
    source = {path.name: path.read_bytes() for path in (REPO_ROOT / "crds").glob("*.yaml")}
    shipped = {path.name: path.read_bytes() for path in (CHART_DIR / "crds").glob("*.yaml")}
    assert source, "crds/ has no CRDs"
    assert sorted(shipped) == sorted(source), "charts/beam/crds/ and crds/ list different files"
    drifted = [name for name in source if shipped[name] != source[name]]
    assert drifted == [], f"copy crds/ to charts/beam/crds/ again; these differ: {drifted}"


# --- image -----------------------------------------------------------------------------------


def test_image_user_and_ports_match_the_chart() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    values = load_values()
    users = re.findall(r"^USER (\d+)", dockerfile, re.MULTILINE)
    assert users == [str(values["service"]["containerSecurityContext"]["runAsUser"])]
    assert users == [str(values["operator"]["containerSecurityContext"]["runAsUser"])]
    exposed = re.findall(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE)
    ports = values["service"]["containerPorts"]
    assert exposed == [f"{ports['http']} {ports['grpc']}"]
    assert re.search(r'^ENTRYPOINT \["beam"\]$', dockerfile, re.MULTILINE)
    assert re.search(r'^CMD \["serve"\]$', dockerfile, re.MULTILINE)

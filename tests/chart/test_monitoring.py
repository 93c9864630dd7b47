"""The chart's PrometheusRule and Grafana dashboard ask only for what Beam exports.

Every `beam_*` series an alert or a panel queries must be one the service
(`beam.observability`) or the operator (`beam_operator.metrics`) registers, with the right
suffix for its type (a Counter's `_total`, a Histogram's `_bucket`/`_count`/`_sum`), and every
label it groups or filters by must be one of that metric's labels: a renamed metric or label
fails here, not silently in Grafana. The dashboard is valid, well laid out JSON with a data
source and a namespace variable; the rule has the alerts the issue lists, scoped to the
release's namespace, with thresholds from values.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import beam.observability
import beam_operator.metrics
from tests.chart.conftest import CHART, Helm

pytestmark = pytest.mark.timeout(120)

DASHBOARD = CHART / "dashboards" / "beam.json"
RULE_CRD = ("--api-versions", "monitoring.coreos.com/v1/PrometheusRule")
# Series from elsewhere that the rules read: kube-state-metrics, the kubelet, redis_exporter
# and Prometheus's own `up`.
EXTERNAL = {
    "kube_cronjob_created": {"namespace", "cronjob"},
    "kube_cronjob_status_last_successful_time": {"namespace", "cronjob"},
    "kubelet_volume_stats_available_bytes": {"namespace", "persistentvolumeclaim"},
    "kubelet_volume_stats_capacity_bytes": {"namespace", "persistentvolumeclaim"},
    "redis_memory_used_bytes": {"namespace", "pod"},
    "redis_memory_max_bytes": {"namespace", "pod"},
    "redis_instance_info": {"namespace", "pod", "role"},
    "redis_connected_slaves": {"namespace", "pod"},
    "up": {"namespace", "service"},
}
# Labels every scraped series carries (Prometheus target labels) or PromQL adds.
TARGET_LABELS = {"namespace", "pod", "le", "job", "service", "instance"}
SERIES = re.compile(r"\b((?:beam|container|kube|kubelet|redis)_[a-z_]+|up)\b")
BY_LABELS = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\b([a-z_]+)\s*(?:=~|!=|=)\s*\"")


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, for every metric Beam registers."""
    series: dict[str, set[str]] = {}
    for module in (beam.observability, beam_operator.metrics):
        for metric in vars(module).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            name, labels = metric._name, set(metric._labelnames)
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_count", "_sum"),
                "gauge": ("",),
            }[str(metric._type)]
            for suffix in suffixes:
                series[name + suffix] = labels
    return series


def check_expression(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Problems with one PromQL expression: unknown series, unknown labels, no namespace."""
    problems = []
    names = set(SERIES.findall(expr))
    if not names:
        problems.append(f"queries no known kind of series: {expr}")
    labels: set[str] = set()
    for name in names:
        if name not in known:
            problems.append(f"{name} is not exported")
        else:
            labels |= known[name]
    used = {label.strip() for group in BY_LABELS.findall(expr) for label in group.split(",")}
    used |= set(MATCHERS.findall(expr))
    unknown = {label for label in used if label} - labels - TARGET_LABELS
    if unknown:
        problems.append(f"labels {sorted(unknown)} are not labels of {sorted(names)}: {expr}")
    if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
        problems.append(f"unbalanced brackets: {expr}")
    return problems


@pytest.fixture(scope="module")
def known() -> dict[str, set[str]]:
    series = exported_series()
    assert "beam_decisions_total" in series
    assert "beam_call_duration_seconds_bucket" in series
    assert "beam_operator_events_total" in series
    return {**series, **EXTERNAL}


# --- the dashboard ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels() -> Iterator[dict[str, Any]]:
    yield from dashboard()["panels"]


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "beam-overview"
    assert board["title"] == "Beam"
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["type"] == "query"
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels():
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["title"], panel["id"]
        assert panel["description"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        own = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
               for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not own & cells, f"{panel['title']} overlaps another panel"
        cells |= own
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_every_panel_queries_exported_series_and_labels_in_the_chosen_namespace(
    known: dict[str, set[str]],
) -> None:
    problems = []
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            if 'namespace="$namespace"' not in expr:
                problems.append(f"{panel['title']}: not scoped to $namespace: {expr}")
            problems += [f"{panel['title']}: {p}" for p in check_expression(expr, known)]
            legend_labels = set(re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")))
            grouped = {
                label.strip()
                for group in BY_LABELS.findall(expr)
                for label in group.split(",")
            }  # fmt: skip
            if legend_labels - grouped:
                problems.append(f"{panel['title']}: legend uses {legend_labels - grouped}")
    assert problems == []


def test_the_dashboard_covers_what_operators_watch() -> None:
    queried = " ".join(t["expr"] for p in panels() for t in p["targets"])
    for series in (
        "beam_decisions_total",  # decisions/s
        "beam_stream_kills_total",  # stream kills
        'beam_grains_total{namespace="$namespace"}',  # held grains
        'reason="LowBalance"',  # low-balance customers
        "beam_call_duration_seconds_bucket",  # latency
        "beam_reaper_passes_total",  # reaper
    ):
        assert series in queried, series


def test_the_configmap_carries_the_dashboard_file(helm: Helm) -> None:
    off = [d for d in yaml.safe_load_all(helm.template()) if d]
    assert not [d for d in off if d["metadata"]["name"].endswith("-dashboard")]
    docs = [
        d
        for d in yaml.safe_load_all(
            helm.template(
                "--set",
                "grafanaDashboard.enabled=true",
                "--set",
                "grafanaDashboard.annotations.grafana_folder=Beam",
            )
        )
        if d
    ]
    configmap = next(d for d in docs if d["metadata"]["name"] == "beam-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Beam"}
    rendered = json.loads(configmap["data"]["beam.json"])
    # The uid and title are the release's (two releases' dashboards must not collide).
    uid = "beam-" + hashlib.sha256(b"beam-test/beam").hexdigest()[:12]
    assert (rendered["uid"], rendered["title"]) == (uid, "Beam (beam-test/beam)")
    assert {**rendered, "uid": "beam-overview", "title": "Beam"} == dashboard()
    other = next(
        d
        for d in yaml.safe_load_all(
            helm.template("--set", "grafanaDashboard.enabled=true", namespace="payments")
        )
        if d and d["metadata"]["name"] == "beam-dashboard"
    )
    assert json.loads(other["data"]["beam.json"])["uid"] == (
        "beam-" + hashlib.sha256(b"payments/beam").hexdigest()[:12]
    )


# --- the alerts ------------------------------------------------------------------------------


def rules(helm: Helm, *args: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(helm.template(*args)) if d]
    found = [d for d in docs if d["kind"] == "PrometheusRule"]
    if not found:
        return []
    (rule,) = found
    (group,) = rule["spec"]["groups"]
    result: list[dict[str, Any]] = group["rules"]
    return result


def test_the_rule_needs_its_crd_and_the_switch(helm: Helm) -> None:
    assert rules(helm, *RULE_CRD) == []
    assert rules(helm, "--set", "prometheusRule.enabled=true") == []
    assert rules(helm, "--set", "prometheusRule.enabled=true", *RULE_CRD)


def test_the_alerts_the_issue_asks_for_are_there_and_well_formed(
    helm: Helm, known: dict[str, set[str]]
) -> None:
    alerts = rules(helm, "--set", "prometheusRule.enabled=true", *RULE_CRD)
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    assert set(names) == {
        "BeamServiceDown",
        "BeamOperatorDown",
        "BeamErrorRatioHigh",
        "BeamBalanceLow",
        "BeamBalanceDepleted",
        "BeamLedgerDrift",
        "BeamReaperStalled",
        "BeamReaperFailing",
        "BeamStoreErrors",
        "BeamRedisMemoryHigh",
        "BeamRedisNoMaster",
        "BeamRedisNoReplicas",
        "BeamDatabaseVolumeFull",
        "BeamLatencyP99High",
    }
    problems = []
    for alert in alerts:
        expr = alert["expr"]
        if 'namespace="beam-test"' not in expr:
            problems.append(f"{alert['alert']} is not scoped to the release namespace")
        if "beam_" in expr and 'service="beam-' not in expr:
            problems.append(f"{alert['alert']} is not scoped to the release's metrics Services")
        if alert["labels"].get("release") != "beam":
            problems.append(f"{alert['alert']} carries no release label")
        problems += [f"{alert['alert']}: {p}" for p in check_expression(expr, known)]
        if alert["labels"]["severity"] not in {"info", "warning", "critical"}:
            problems.append(f"{alert['alert']}: severity {alert['labels']['severity']}")
        if not (alert["annotations"]["summary"] and alert["annotations"]["description"]):
            problems.append(f"{alert['alert']}: no summary or description")
    assert problems == []


def test_alert_thresholds_come_from_values(helm: Helm) -> None:
    alerts = {
        a["alert"]: a
        for a in rules(
            helm,
            "--set",
            "prometheusRule.enabled=true",
            "--set-json",  # --set keeps 0.02 a string
            "prometheusRule.latencyP99Seconds=0.02",
            "--set",
            "prometheusRule.redisMemoryPercent=80",
            "--set",
            "redis.maxmemoryPercent=75",
            "--set",
            "prometheusRule.additionalRules[0].alert=Custom",
            "--set",
            "prometheusRule.additionalRules[0].expr=vector(1)",
            *RULE_CRD,
        )
    }
    assert alerts["BeamLatencyP99High"]["expr"].rstrip().endswith("> 0.02")
    # Redis's own used_memory / maxmemory, whatever share of the limit maxmemory is.
    assert alerts["BeamRedisMemoryHigh"]["expr"].rstrip().endswith("> 0.8000")
    assert 'cronjob="beam-integrity"' in alerts["BeamLedgerDrift"]["expr"]
    assert alerts["Custom"]["expr"] == "vector(1)"

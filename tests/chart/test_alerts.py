"""The chart's alerts, evaluated by Prometheus itself (issue 18 item 10).

`promtool check rules` parses every expression and annotation template of the rendered
PrometheusRule with Prometheus's own parser; `promtool test rules` evaluates the rules over
input series and checks each alert fires on the series that should fire it, with the labels
it should carry, and stays silent otherwise, including on the series of another release.
promtool comes from hack/promtool/build.sh (built from the Go module proxy at a pinned
version and cached; .ci/run builds it before the tests).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import Helm
from tests.chart.test_monitoring import RULE_CRD, rules

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
NS = "beam-test"
SERVICE = f'namespace="{NS}", service="beam-metrics"'
OPERATOR = f'namespace="{NS}", service="beam-operator-metrics"'
OTHER = f'namespace="{NS}", service="other-metrics"'  # a second release, same namespace
CRONJOB = f'namespace="{NS}", cronjob="beam-integrity"'
PVC = f'namespace="{NS}", persistentvolumeclaim="data-beam-timescaledb-0"'


@pytest.fixture(scope="module")
def promtool() -> Path:
    result = subprocess.run(
        ["bash", str(REPO / "hack" / "promtool" / "build.sh")],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    if result.returncode != 0:
        message = f"promtool unavailable: {result.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return Path(result.stdout.strip())


def _rule_file(helm: Helm, directory: Path, *, annotations: bool) -> Path:
    alerts = rules(helm, "--set", "prometheusRule.enabled=true", *RULE_CRD)
    if not annotations:  # `test rules` compares annotations too; the labels are the point
        alerts = [{k: v for k, v in a.items() if k != "annotations"} for a in alerts]
    path = directory / ("rules.yaml" if annotations else "rules-bare.yaml")
    path.write_text(yaml.safe_dump({"groups": [{"name": "beam", "rules": alerts}]}))
    return path


def test_promtool_parses_every_expression_and_template(
    helm: Helm, promtool: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        [str(promtool), "check", "rules", str(_rule_file(helm, tmp_path, annotations=True))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 14 rules found" in result.stdout, result.stdout


def _labels(alert: str, **extra: str) -> dict[str, str]:
    severity = {
        "BeamServiceDown": "critical",
        "BeamOperatorDown": "warning",
        "BeamErrorRatioHigh": "critical",
        "BeamBalanceLow": "info",
        "BeamLedgerDrift": "critical",
        "BeamReaperStalled": "warning",
        "BeamStoreErrors": "critical",
        "BeamRedisMemoryHigh": "warning",
        "BeamRedisNoMaster": "critical",
        "BeamRedisNoReplicas": "critical",
        "BeamDatabaseVolumeFull": "critical",
        "BeamLatencyP99High": "warning",
    }[alert]
    return {"severity": severity, "release": "beam", "namespace": NS, **extra}


def _case(
    name: str, series: dict[str, str], alert: str, minute: int, fired: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        "name": name,
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [
            {
                "eval_time": f"{minute}m",
                "alertname": alert,
                "exp_alerts": [{"exp_labels": labels} for labels in fired],
            }
        ],
    }


def _drift_one_failed_run() -> str:
    """The integrity CronJob every 30 min; the run at minute 60 fails, the one at 90 works:
    kube_cronjob_status_last_successful_time per minute, for 150 minutes."""
    values = []
    for minute in range(150):
        last_run = 30 * (minute // 30)
        values.append(str(60 * (1800 // 60 if last_run == 60 else last_run)))
    return " ".join(values)


def cases() -> list[dict[str, Any]]:
    service_labels = {"service": "beam-metrics"}
    redis0 = f'namespace="{NS}", pod="beam-redis-0"'
    redis1 = f'namespace="{NS}", pod="beam-redis-1"'
    their_master = f'redis_instance_info{{namespace="{NS}", pod="other-redis-0", role="master"}}'
    cache = f'container_memory_working_set_bytes{{{redis0}, container="redis"}}'
    return [
        # Every service pod gone: a rate over no series is silent, absent(up == 1) is not.
        _case("service gone", {f"up{{{OTHER}}}": "1x20"}, "BeamServiceDown", 5,
              [_labels("BeamServiceDown")]),
        _case("service down", {f'up{{{SERVICE}, pod="a"}}': "0x20"}, "BeamServiceDown", 5,
              [_labels("BeamServiceDown")]),
        _case("one of two up", {f'up{{{SERVICE}, pod="a"}}': "0x20",
                                f'up{{{SERVICE}, pod="b"}}': "1x20"},
              "BeamServiceDown", 5, []),
        _case("operator gone", {}, "BeamOperatorDown", 15, [_labels("BeamOperatorDown")]),
        _case("operator up", {f"up{{{OPERATOR}}}": "1x20"}, "BeamOperatorDown", 15, []),
        # 10 of 110 calls per minute fail: 9 %, over 5 %; 1 of 101 is not.
        _case("errors", {f'beam_decisions_total{{{SERVICE}, reason="OK"}}': "0+100x20",
                         f'beam_decisions_total{{{SERVICE}, reason="STORE_UNAVAILABLE"}}':
                         "0+10x20"},
              "BeamErrorRatioHigh", 15, [_labels("BeamErrorRatioHigh", **service_labels)]),
        _case("few errors", {f'beam_decisions_total{{{SERVICE}, reason="OK"}}': "0+100x20",
                             f'beam_decisions_total{{{SERVICE}, reason="INTERNAL"}}': "0+1x20",
                             f'beam_decisions_total{{{OTHER}, reason="INTERNAL"}}': "0+50x20"},
              "BeamErrorRatioHigh", 15, []),
        _case("low balance", {f'beam_operator_events_total{{{OPERATOR}, reason="LowBalance"}}':
                              "0 1 1 1"},
              "BeamBalanceLow", 2, [_labels("BeamBalanceLow", service="beam-operator-metrics")]),
        # The integrity check never succeeded: nothing until integrityMaxAgeSeconds (90 min)
        # after the CronJob was created, then it fires.
        _case("never succeeded, young", {f"kube_cronjob_created{{{CRONJOB}}}": "0x150"},
              "BeamLedgerDrift", 60, []),
        _case("never succeeded", {f"kube_cronjob_created{{{CRONJOB}}}": "0x150"},
              "BeamLedgerDrift", 100,
              [_labels("BeamLedgerDrift", cronjob="beam-integrity")]),
        # One failed run (minute 60) that the next makes good does not page...
        _case("one failed run", {f"kube_cronjob_created{{{CRONJOB}}}": "0x150",
                                 f"kube_cronjob_status_last_successful_time{{{CRONJOB}}}":
                                 _drift_one_failed_run()},
              "BeamLedgerDrift", 89, []),
        # ...runs that stop succeeding do.
        _case("stopped succeeding", {f"kube_cronjob_created{{{CRONJOB}}}": "0x150",
                                     f"kube_cronjob_status_last_successful_time{{{CRONJOB}}}":
                                     "0x150"},
              "BeamLedgerDrift", 100,
              [_labels("BeamLedgerDrift", cronjob="beam-integrity")]),
        _case("reaper stalled", {f'beam_reaper_passes_total{{{SERVICE}, result="ok"}}': "5x40"},
              "BeamReaperStalled", 25, [_labels("BeamReaperStalled", **service_labels)]),
        _case("reaper runs", {f'beam_reaper_passes_total{{{SERVICE}, result="ok"}}': "0+12x40"},
              "BeamReaperStalled", 25, []),
        _case("store errors", {f'beam_reaper_passes_total{{{SERVICE}, result="failed"}}':
                               "0+12x20"},
              "BeamStoreErrors", 10, [_labels("BeamStoreErrors", **service_labels)]),
        # Redis's own used_memory against maxmemory (85 %), never the container's page cache.
        _case("redis full", {f"redis_memory_used_bytes{{{redis0}}}": "900x30",
                             f"redis_memory_max_bytes{{{redis0}}}": "1000x30",
                             cache: "100x30"},
              "BeamRedisMemoryHigh", 15,
              [_labels("BeamRedisMemoryHigh", pod="beam-redis-0")]),
        _case("redis page cache", {f"redis_memory_used_bytes{{{redis0}}}": "500x30",
                                   f"redis_memory_max_bytes{{{redis0}}}": "1000x30",
                                   cache: "990x30"},
              "BeamRedisMemoryHigh", 15, []),
        _case("no master", {f'redis_instance_info{{{redis0}, role="slave"}}': "1x10",
                            f'redis_instance_info{{{redis1}, role="slave"}}': "1x10",
                            their_master: "1x10"},
              "BeamRedisNoMaster", 5, [_labels("BeamRedisNoMaster", role="master")]),
        _case("a master", {f'redis_instance_info{{{redis0}, role="master"}}': "1x10",
                           f'redis_instance_info{{{redis1}, role="slave"}}': "1x10"},
              "BeamRedisNoMaster", 5, []),
        _case("noreplicas", {f'redis_instance_info{{{redis0}, role="master"}}': "1x10",
                             f"redis_connected_slaves{{{redis0}}}": "0x10",
                             f"redis_connected_slaves{{{redis1}}}": "0x10",
                             f'redis_instance_info{{{redis1}, role="slave"}}': "1x10"},
              "BeamRedisNoReplicas", 3,
              [_labels("BeamRedisNoReplicas", pod="beam-redis-0")]),
        _case("replicas", {f'redis_instance_info{{{redis0}, role="master"}}': "1x10",
                           f"redis_connected_slaves{{{redis0}}}": "1x10"},
              "BeamRedisNoReplicas", 3, []),
        _case("volume full", {f"kubelet_volume_stats_available_bytes{{{PVC}}}": "10x10",
                              f"kubelet_volume_stats_capacity_bytes{{{PVC}}}": "100x10"},
              "BeamDatabaseVolumeFull", 8,
              [_labels("BeamDatabaseVolumeFull", persistentvolumeclaim="data-beam-timescaledb-0")]),
        _case("volume half", {f"kubelet_volume_stats_available_bytes{{{PVC}}}": "50x10",
                              f"kubelet_volume_stats_capacity_bytes{{{PVC}}}": "100x10"},
              "BeamDatabaseVolumeFull", 8, []),
        _case("slow", {f'beam_call_duration_seconds_bucket{{{SERVICE}, call="check", le="0.025"}}':
                       "0x30",
                       f'beam_call_duration_seconds_bucket{{{SERVICE}, call="check", le="0.1"}}':
                       "0+100x30",
                       f'beam_call_duration_seconds_bucket{{{SERVICE}, call="check", le="+Inf"}}':
                       "0+100x30"},
              "BeamLatencyP99High", 20,
              [_labels("BeamLatencyP99High", call="check", **service_labels)]),
        _case("fast", {f'beam_call_duration_seconds_bucket{{{SERVICE}, call="check", le="0.025"}}':
                       "0+100x30",
                       f'beam_call_duration_seconds_bucket{{{SERVICE}, call="check", le="+Inf"}}':
                       "0+100x30"},
              "BeamLatencyP99High", 20, []),
    ]  # fmt: skip


def test_each_alert_fires_on_its_series_and_only_there(
    helm: Helm, promtool: Path, tmp_path: Path
) -> None:
    rule_file = _rule_file(helm, tmp_path, annotations=False)
    test_file = tmp_path / "tests.yaml"
    test_file.write_text(
        yaml.safe_dump(
            {"rule_files": [rule_file.name], "evaluation_interval": "1m", "tests": cases()},
            width=1000,
        )
    )
    result = subprocess.run(
        [str(promtool), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout

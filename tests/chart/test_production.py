"""Production hardening of the chart (issue 18), asserted on `helm template` output.

What a rendered manifest can prove: which values each pod's checksum covers, which Secret
keys are required, resources and disruption settings of the stateful pods, the alert rules
and their expressions, the operator's Secret access. tests/k8s/test_helm.py proves the
no-op upgrade on a real API server; tests/chart/test_redis_readiness.py runs the Redis
readiness probe against real replicas.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
from typing import Any

import pytest

from tests.chart.conftest import Helm
from tests.chart.test_render import EXISTING_SECRETS, container, env, find, refused, render

pytestmark = pytest.mark.timeout(120)


def annotations(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, str]:
    found: dict[str, str] = find(docs, kind, name)["spec"]["template"]["metadata"].get(
        "annotations", {}
    )
    return found


def _checksum(docs: list[dict[str, Any]], *reads: tuple[str, str]) -> str:
    parts = []
    for secret, key in reads:
        value = find(docs, "Secret", secret)["data"][key]
        assert len(base64.b64decode(value)) in (48, 64)
        parts.append(f"{secret}/{key}={value}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# --- 1. checksums -----------------------------------------------------------------------------


def test_each_checksum_covers_exactly_the_generated_values_its_pod_reads(helm: Helm) -> None:
    docs = render(helm)
    token = ("beam-request-token", "request-token-secret")
    redis = ("beam-redis-auth", "redis-password")
    database = ("beam-timescaledb-auth", "password")
    expected = {
        ("Deployment", "beam-service"): _checksum(docs, token, redis, database),
        ("Deployment", "beam-operator"): _checksum(docs, redis, database),
        ("StatefulSet", "beam-redis"): _checksum(docs, redis),
        ("StatefulSet", "beam-redis-sentinel"): _checksum(docs, redis),
    }
    for (kind, name), checksum in expected.items():
        assert annotations(docs, kind, name)["checksum/secrets"] == checksum, name
    # The database reads its passwords at initdb only: nothing may restart it.
    assert annotations(docs, "StatefulSet", "beam-timescaledb") == {}
    pgbouncer = render(helm, "--set", "pgbouncer.enabled=true")
    assert annotations(pgbouncer, "Deployment", "beam-pgbouncer")["checksum/secrets"] == (
        _checksum(pgbouncer, database)
    )


def test_checksums_ignore_labels_and_secrets_the_chart_does_not_generate(helm: Helm) -> None:
    plain = render(helm, *EXISTING_SECRETS)
    labelled = render(helm, *EXISTING_SECRETS, "--set", "commonLabels.team=payments")
    empty = hashlib.sha256(b"").hexdigest()
    for kind, name in (
        ("Deployment", "beam-service"),
        ("Deployment", "beam-operator"),
        ("StatefulSet", "beam-redis"),
        ("StatefulSet", "beam-redis-sentinel"),
    ):
        assert annotations(plain, kind, name)["checksum/secrets"] == empty
        assert annotations(plain, kind, name) == annotations(labelled, kind, name)


# --- 2. the database's superuser key -----------------------------------------------------------


def test_the_superuser_password_key_is_required_and_named(helm: Helm) -> None:
    docs = render(
        helm,
        "--set",
        "gitops.enabled=true",
        *EXISTING_SECRETS,
        "--set",
        "timescaledb.auth.existingSecretSuperuserPasswordKey=superuser",
    )
    database = env(container(docs, "StatefulSet", "beam-timescaledb"))
    assert database["POSTGRES_PASSWORD"] == {
        "secretKeyRef": {"name": "beam-timescaledb", "key": "superuser"}
    }
    assert database["BEAM_DATABASE_OWNER_PASSWORD"] == {
        "secretKeyRef": {"name": "beam-timescaledb", "key": "password"}
    }


# --- 12. the password never enters a URL ----------------------------------------------------


def test_database_urls_carry_no_credentials(helm: Helm) -> None:
    docs = render(helm, "--set", "integrityCheck.enabled=true")
    for kind, name in (("Deployment", "beam-service"), ("Deployment", "beam-operator")):
        values = env(container(docs, kind, name))
        assert values["BEAM_DATABASE_URL"] == (
            "postgresql://beam-timescaledb.beam-test.svc.cluster.local:5432/beam?sslmode=disable"
        )
        assert values["PGUSER"] == "beam"
        assert values["PGPASSWORD"] == {
            "secretKeyRef": {"name": "beam-timescaledb-auth", "key": "password"}
        }
    assert "$(" not in str(find(docs, "Job", "beam-migrate"))
    assert "$(" not in str(find(docs, "CronJob", "beam-integrity"))


# --- 8. stateful pods ---------------------------------------------------------------------------


def test_stateful_pods_are_guaranteed_qos_and_own_volumes_without_a_walk(helm: Helm) -> None:
    docs = render(helm, "--set", "timescaledb.pdb.create=true")
    for kind, name in (
        ("StatefulSet", "beam-redis"),
        ("StatefulSet", "beam-redis-sentinel"),
        ("StatefulSet", "beam-timescaledb"),
    ):
        resources = container(docs, kind, name)["resources"]
        assert resources["requests"] == resources["limits"], name
        pod = find(docs, kind, name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", name
    assert container(docs, "StatefulSet", "beam-redis")["resources"]["limits"] == {
        "cpu": "500m",
        "memory": "1Gi",
    }
    pdb = find(docs, "PodDisruptionBudget", "beam-timescaledb")
    assert pdb["spec"] == {
        "maxUnavailable": 0,
        "selector": {
            "matchLabels": {
                "app.kubernetes.io/name": "beam",
                "app.kubernetes.io/instance": "beam",
                "app.kubernetes.io/component": "timescaledb",
            }
        },
    }
    assert not [
        d for d in render(helm) if d["kind"] == "PodDisruptionBudget" and "timescaledb" in str(d)
    ]


# --- 12. smaller ----------------------------------------------------------------------------


def test_database_liveness_survives_crash_recovery_and_readiness_does_not(helm: Helm) -> None:
    database = container(render(helm), "StatefulSet", "beam-timescaledb")
    alive = database["livenessProbe"]["exec"]["command"][-1]
    ready = database["readinessProbe"]["exec"]["command"][-1]
    assert alive == (
        'pg_isready -h 127.0.0.1 -p 5432 -U "$POSTGRES_USER" -d "$POSTGRES_DB"; [ $? -le 1 ]'
    )
    assert ready == 'exec pg_isready -h 127.0.0.1 -p 5432 -U "$POSTGRES_USER" -d "$POSTGRES_DB"'
    # pg_isready's exit codes: 0 accepting, 1 rejecting (recovery), 2 no answer, 3 bad call.
    for status, is_alive in ((0, True), (1, True), (2, False), (3, False)):
        script = alive.replace("pg_isready", f"sh -c 'exit {status}' --")
        assert (subprocess.run(["/bin/sh", "-c", script], check=False).returncode == 0) is is_alive


def test_the_integrity_check_skips_stale_runs_and_retries_a_lost_pod(helm: Helm) -> None:
    cronjob = find(render(helm), "CronJob", "beam-integrity")["spec"]
    assert cronjob["startingDeadlineSeconds"] == 600
    assert cronjob["jobTemplate"]["spec"]["backoffLimit"] == 2


def test_sentinel_quorum_zero_is_refused(helm: Helm) -> None:
    error = refused(helm, "--set", "redis.sentinel.quorum=0")
    assert "at '/redis/sentinel/quorum': minimum: got 0, want 1" in error


def test_the_stateful_pods_can_take_a_priority_class_the_chart_creates(helm: Helm) -> None:
    stateful = (
        ("StatefulSet", "beam-redis"),
        ("StatefulSet", "beam-redis-sentinel"),
        ("StatefulSet", "beam-timescaledb"),
    )
    default = render(helm)
    assert not [d for d in default if d["kind"] == "PriorityClass"]
    for kind, name in stateful:
        assert "priorityClassName" not in find(default, kind, name)["spec"]["template"]["spec"]
    docs = render(
        helm,
        "--set",
        "statefulPriorityClass.create=true",
        "--set",
        "redis.sentinel.priorityClassName=platform-critical",
    )
    priority = find(docs, "PriorityClass", "beam-beam-test-stateful")
    assert (priority["value"], priority["globalDefault"], priority["preemptionPolicy"]) == (
        1000000,
        False,
        "PreemptLowerPriority",
    )
    names = {name: find(docs, kind, name)["spec"]["template"]["spec"]["priorityClassName"]
             for kind, name in stateful}  # fmt: skip
    assert names == {
        "beam-redis": "beam-beam-test-stateful",
        "beam-redis-sentinel": "platform-critical",  # a component's own class wins
        "beam-timescaledb": "beam-beam-test-stateful",
    }
    for kind, name in (("Deployment", "beam-service"), ("Deployment", "beam-operator")):
        assert "priorityClassName" not in find(docs, kind, name)["spec"]["template"]["spec"]


def test_the_database_volume_has_a_usage_alert(helm: Helm) -> None:
    crd = ("--api-versions", "monitoring.coreos.com/v1/PrometheusRule")
    args = ("--set", "prometheusRule.enabled=true", *crd)
    docs = render(helm, *args, "--set", "prometheusRule.databaseVolumePercent=90")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    alerts = {a["alert"]: a for a in rule["spec"]["groups"][0]["rules"]}
    pvc = 'namespace="beam-test", persistentvolumeclaim="data-beam-timescaledb-0"'
    assert alerts["BeamDatabaseVolumeFull"]["expr"] == (
        "max by (namespace, persistentvolumeclaim) (\n"
        f"  1 - kubelet_volume_stats_available_bytes{{{pvc}}}\n"
        f"    / kubelet_volume_stats_capacity_bytes{{{pvc}}}\n"
        ") > 0.9000\n"
    )
    # No volume, no alert.
    ephemeral = render(helm, *args, "--set", "timescaledb.persistence.enabled=false")
    (rule,) = [d for d in ephemeral if d["kind"] == "PrometheusRule"]
    assert "BeamDatabaseVolumeFull" not in {a["alert"] for a in rule["spec"]["groups"][0]["rules"]}


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template the chart renders, by kind/name (a CronJob's is one level down)."""
    specs = {}
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            specs[f"{doc['kind']}/{doc['metadata']['name']}"] = spec["template"]["spec"]
    return specs


def test_no_pod_gets_service_environment_variables(helm: Helm) -> None:
    """With one worker the chart sets no BEAM_METRICS_PORT, and Kubernetes' service links
    gave every pod BEAM_METRICS_PORT=tcp://<ClusterIP of beam-metrics>:8080, which `beam
    serve` refuses: the service pods crash-looped on the first real cluster (issue 17).
    No pod of the chart takes service links."""
    docs = render(helm, "--set", "pgbouncer.enabled=true", "--set", "integrityCheck.enabled=true")
    specs = _pod_specs(docs)
    assert {name for name in specs} >= {
        "Deployment/beam-service", "Deployment/beam-operator", "StatefulSet/beam-redis",
        "StatefulSet/beam-redis-sentinel", "StatefulSet/beam-timescaledb",
    }  # fmt: skip
    assert {name: spec.get("enableServiceLinks") for name, spec in specs.items()} == {
        name: False for name in specs
    }

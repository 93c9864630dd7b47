"""What the chart renders, asserted on `helm template` output (no cluster needed).

tests/k8s/test_helm.py proves the API server accepts what the chart renders and that an
install, upgrade and uninstall behave; these tests pin down the contracts of single values:
GitOps mode, the connection budget, gRPC balancing, drains, probes, RBAC, alerts, dashboards.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from beam_operator.constants import FINALIZER
from tests.chart.conftest import CHART, Helm

pytestmark = pytest.mark.timeout(120)

EXISTING_SECRETS = (
    "--set",
    "secrets.existingSecret=beam-request-token",
    "--set",
    "redis.auth.existingSecret=beam-redis",
    "--set",
    "timescaledb.auth.existingSecret=beam-timescaledb",
)


def render(helm: Helm, *args: str) -> list[dict[str, Any]]:
    manifest = helm.template("--set", "fullnameOverride=beam", *args)
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def refused(helm: Helm, *args: str) -> str:
    result = helm.run("template", "beam", str(CHART), *args, check=False)
    assert result.returncode != 0, "the render should have failed"
    return result.stderr


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(
        f"no {kind} {name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    )


def container(docs: list[dict[str, Any]], kind: str, name: str, index: int = 0) -> dict[str, Any]:
    spec = find(docs, kind, name)["spec"]["template"]["spec"]
    result: dict[str, Any] = spec["containers"][index]
    return result


def env(item: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in item.get("env", [])}


# --- GitOps ----------------------------------------------------------------------------------


def test_gitops_refuses_to_render_without_every_existing_secret(helm: Helm) -> None:
    error = refused(helm, "--set", "gitops.enabled=true")
    assert "gitops.enabled=true" in error
    assert (
        "Set secrets.existingSecret, redis.auth.existingSecret, timescaledb.auth.existingSecret"
        in error
    )
    only_redis_missing = refused(
        helm,
        "--set",
        "gitops.enabled=true",
        "--set",
        "secrets.existingSecret=a",
        "--set",
        "timescaledb.auth.existingSecret=b",
    )
    assert "Set redis.auth.existingSecret" in only_redis_missing


def test_gitops_render_is_reproducible_without_lookup_secrets_or_hooks(helm: Helm) -> None:
    args = ("--set", "gitops.enabled=true", *EXISTING_SECRETS)
    first = helm.template("--set", "fullnameOverride=beam", *args)
    assert helm.template("--set", "fullnameOverride=beam", *args) == first  # nothing random
    docs = [doc for doc in yaml.safe_load_all(first) if doc]
    assert [d for d in docs if d["kind"] == "Secret"] == []
    hooks = [
        (d["kind"], d["metadata"]["name"])
        for d in docs
        if any(k.startswith("helm.sh/hook") for k in d["metadata"].get("annotations") or {})
    ]
    assert hooks == []  # Argo CD would run a pre-upgrade hook as PreSync, before the database
    # The schema comes from start-up migrations under the advisory lock.
    assert env(container(docs, "Deployment", "beam-service"))["BEAM_MIGRATE_ON_START"] == "true"
    assert env(container(docs, "Deployment", "beam-operator"))["BEAM_MIGRATE_ON_START"] == "true"
    service_env = env(container(docs, "Deployment", "beam-service"))
    assert service_env["BEAM_REQUEST_TOKEN_SECRET"]["secretKeyRef"]["name"] == "beam-request-token"
    assert service_env["BEAM_REDIS_PASSWORD"]["secretKeyRef"]["name"] == "beam-redis"
    assert service_env["PGPASSWORD"]["secretKeyRef"]["name"] == "beam-timescaledb"


def test_helm_mode_generates_secrets_and_migrates_in_a_pre_upgrade_hook(helm: Helm) -> None:
    docs = render(helm)
    assert sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Secret") == [
        "beam-redis-auth",
        "beam-request-token",
        "beam-timescaledb-auth",
    ]
    job = find(docs, "Job", "beam-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-upgrade"
    assert env(container(docs, "Deployment", "beam-service"))["BEAM_MIGRATE_ON_START"] == "false"


def test_service_migrates_on_start_when_no_operator_would(helm: Helm) -> None:
    docs = render(helm, "--set", "operator.enabled=false")
    assert env(container(docs, "Deployment", "beam-service"))["BEAM_MIGRATE_ON_START"] == "true"
    forced_off = render(
        helm, "--set", "operator.enabled=false", "--set", "service.migrateOnStart=false"
    )
    assert (
        env(container(forced_off, "Deployment", "beam-service"))["BEAM_MIGRATE_ON_START"] == "false"
    )


# --- connection budget and PgBouncer ---------------------------------------------------------


def test_pool_sizes_and_max_connections_come_from_values(helm: Helm) -> None:
    docs = render(helm, "--set", "timescaledb.maxConnections=300")
    service = env(container(docs, "Deployment", "beam-service"))
    operator = env(container(docs, "Deployment", "beam-operator"))
    assert (service["BEAM_DATABASE_POOL_MIN"], service["BEAM_DATABASE_POOL_MAX"]) == ("2", "10")
    assert (operator["BEAM_DATABASE_POOL_MIN"], operator["BEAM_DATABASE_POOL_MAX"]) == ("1", "4")
    migrate = find(docs, "Job", "beam-migrate")["spec"]["template"]["spec"]["containers"][0]
    assert env(migrate)["BEAM_DATABASE_POOL_MAX"] == "2"
    database = container(docs, "StatefulSet", "beam-timescaledb")
    assert database["args"][:3] == ["postgres", "-c", "max_connections=300"]
    assert env(database)["TS_TUNE_MAX_CONNS"] == "300"


def test_the_render_fails_when_the_connection_budget_exceeds_max_connections(helm: Helm) -> None:
    # 11 pods (10 + surge 1) x (10 + read 4) + operator 4 + 2 + jobs 2 x 3 + reserved 6 = 172
    # fits in 200.
    render(helm)
    error = refused(helm, "--set", "service.autoscaling.maxReplicas=30")
    assert "database connection budget exceeded: 452 connections > max_connections 200" in error
    assert (
        "Service 434 (31 processes x (service.database.poolMax 10 + "
        "service.database.readPoolMax 4))" in error
    )
    assert "operator 6, jobs 6 (migrations, integrity check), reserved 6" in error
    # A percentage surge rounds up: 10 pods + 25% = 13 pods.
    error = refused(
        helm,
        "--set",
        "service.updateStrategy.rollingUpdate.maxSurge=25%",
        "--set",
        "timescaledb.maxConnections=140",
    )
    assert "13 processes" in error
    # External databases are checked when their max_connections is given.
    external = ("-f", str(CHART / "ci" / "external-values.yaml"))
    render(helm, *external)
    error = refused(helm, *external, "--set", "externalDatabase.maxConnections=100")
    assert "(externalDatabase.maxConnections)" in error
    render(helm, *external, "--set", "externalDatabase.maxConnections=100",
           "--set", "connectionBudget.check=false")  # fmt: skip


def test_pgbouncer_pools_the_service_and_keeps_listen_direct(helm: Helm) -> None:
    docs = render(helm, "--set", "pgbouncer.enabled=true", "--set",
                  "service.autoscaling.maxReplicas=30")  # fmt: skip
    service = env(container(docs, "Deployment", "beam-service"))
    assert service["BEAM_DATABASE_URL"] == (
        "postgresql://beam-pgbouncer.beam-test.svc.cluster.local:6432/beam?sslmode=disable"
    )
    direct = "postgresql://beam-timescaledb.beam-test.svc.cluster.local:5432/beam?sslmode=disable"
    assert service["BEAM_DATABASE_LISTEN_URL"] == direct
    assert service["BEAM_MIGRATE_ON_START"] == "false"  # never through the pooler
    for name in ("beam-operator",):
        assert env(container(docs, "Deployment", name))["BEAM_DATABASE_URL"] == direct
    ini = find(docs, "ConfigMap", "beam-pgbouncer")["data"]["pgbouncer.ini"]
    for line in (
        "beam = host=beam-timescaledb.beam-test.svc.cluster.local port=5432 dbname=beam",
        "pool_mode = transaction",
        "default_pool_size = 20",
        "max_db_connections = 20",
        "max_prepared_statements = 200",
        "auth_file = /run/pgbouncer/userlist.txt",
    ):
        assert line in ini.splitlines(), ini
    pgbouncer = container(docs, "Deployment", "beam-pgbouncer")
    assert env(pgbouncer)["PGPASSWORD"] == {
        "secretKeyRef": {"name": "beam-timescaledb-auth", "key": "password"}
    }
    find(docs, "Service", "beam-pgbouncer")
    find(docs, "PodDisruptionBudget", "beam-pgbouncer")


def test_pgbouncer_refuses_what_transaction_pooling_breaks(helm: Helm) -> None:
    on = ("--set", "pgbouncer.enabled=true")
    assert "cannot go through PgBouncer" in refused(
        helm, *on, "--set", "service.migrateOnStart=true"
    )
    assert "needs the operator" in refused(helm, *on, "--set", "operator.enabled=false")
    assert "pgbouncer.maxClientConnections (50) is below" in refused(
        helm, *on, "--set", "pgbouncer.maxClientConnections=50"
    )


# --- gRPC balancing --------------------------------------------------------------------------


def test_grpc_connections_age_and_a_headless_service_lists_every_ready_pod(helm: Helm) -> None:
    docs = render(helm, "--set", "service.grpc.maxConnectionAgeSeconds=120")
    service = env(container(docs, "Deployment", "beam-service"))
    assert service["BEAM_GRPC_MAX_CONNECTION_AGE_SECONDS"] == "120"
    assert service["BEAM_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS"] == "30"
    headless = find(docs, "Service", "beam-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert "publishNotReadyAddresses" not in headless  # only ready pods get calls
    assert headless["selector"] == find(docs, "Service", "beam")["spec"]["selector"]
    assert [(p["name"], p["port"], p.get("appProtocol")) for p in headless["ports"]] == [
        ("grpc", 9090, "grpc"),
        ("http", 8080, "http"),
    ]
    off = render(helm, "--set", "service.headlessService.enabled=false")
    assert not [d for d in off if d["metadata"]["name"] == "beam-headless"]


# --- start-up and drains ---------------------------------------------------------------------


def test_drain_start_up_and_readiness_settings_reach_the_service(helm: Helm) -> None:
    service = env(container(render(helm), "Deployment", "beam-service"))
    assert service["BEAM_SHUTDOWN_DELAY_SECONDS"] == "5"
    assert service["BEAM_SHUTDOWN_GRACE_SECONDS"] == "20"
    assert service["BEAM_STARTUP_TIMEOUT_SECONDS"] == "600"
    assert service["BEAM_READY_STORES"] == "any"


def test_the_grace_period_must_cover_the_drain(helm: Helm) -> None:
    error = refused(helm, "--set", "service.shutdown.delaySeconds=15")
    assert "service.terminationGracePeriodSeconds (30) must cover" in error
    render(helm, "--set", "service.shutdown.delaySeconds=15",
           "--set", "service.terminationGracePeriodSeconds=40")  # fmt: skip


# --- stores: Redis memory, probes, database roles and hooks ---------------------------------


def test_redis_maxmemory_comes_from_the_memory_limit_and_snapshots_are_off(helm: Helm) -> None:
    docs = render(helm, "--set", "redis.maxmemoryPercent=60")
    redis = container(docs, "StatefulSet", "beam-redis")
    limit = next(e for e in redis["env"] if e["name"] == "REDIS_MEMORY_LIMIT")
    assert limit["valueFrom"]["resourceFieldRef"] == {
        "containerName": "redis",
        "resource": "limits.memory",
        "divisor": "1",
    }
    assert env(redis)["MAXMEMORY_PERCENT"] == "60"
    conf = find(docs, "ConfigMap", "beam-redis-config")["data"]["redis.conf"].splitlines()
    assert {'save ""', "maxmemory-policy noeviction", "repl-diskless-sync-delay 0"} <= set(conf)


def test_stores_have_startup_probes_that_outlast_loading_and_recovery(helm: Helm) -> None:
    docs = render(helm)
    redis = container(docs, "StatefulSet", "beam-redis")["startupProbe"]
    assert "ping" in redis["exec"]["command"][-1]
    assert redis["periodSeconds"] * redis["failureThreshold"] >= 600  # a large AOF loads
    database = container(docs, "StatefulSet", "beam-timescaledb")["startupProbe"]
    assert "pg_isready" in database["exec"]["command"][-1]
    assert database["periodSeconds"] * database["failureThreshold"] >= 1800  # crash recovery


def test_operator_reads_secrets_only_by_name(helm: Helm) -> None:
    docs = render(helm)
    role = find(docs, "ClusterRole", "beam-beam-test-operator-cluster")
    secrets = [r for r in role["rules"] if r.get("resources") == ["secrets"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"],
                        "verbs": ["get", "create", "patch", "delete"]}]  # fmt: skip


def test_only_the_service_gets_the_request_token_key(helm: Helm) -> None:
    """The key signs and verifies request tokens; only the service does either. Every other
    pod that reads the stores (operator, migration Job, integrity CronJob) goes without."""
    docs = render(helm, "--set", "integrityCheck.enabled=true")
    with_stores, with_key = set(), set()
    for doc in docs:
        pod = _pod_spec(doc)
        for item in [*(pod or {}).get("initContainers", []), *(pod or {}).get("containers", [])]:
            names = set(env(item))
            where = (doc["kind"], doc["metadata"]["name"], item["name"])
            if "BEAM_DATABASE_URL" in names:
                with_stores.add(where)
            if "BEAM_REQUEST_TOKEN_SECRET" in names:
                with_key.add(where)
    assert with_stores == {
        ("Deployment", "beam-service", "service"),
        ("Deployment", "beam-operator", "operator"),
        ("Job", "beam-migrate", "migrate"),
        ("CronJob", "beam-integrity", "verify-integrity"),
    }
    assert with_key == {("Deployment", "beam-service", "service")}
    key = env(container(docs, "Deployment", "beam-service"))["BEAM_REQUEST_TOKEN_SECRET"]
    assert key == {"secretKeyRef": {"name": "beam-request-token", "key": "request-token-secret"}}


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    spec = doc.get("spec") or {}
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod: dict[str, Any] | None = (spec.get("template") or {}).get("spec")
    return pod


def test_the_bundled_database_runs_beam_as_its_owner_not_the_superuser(helm: Helm) -> None:
    docs = render(helm)
    database = container(docs, "StatefulSet", "beam-timescaledb")
    values = env(database)
    assert values["POSTGRES_USER"] == "postgres"
    assert values["POSTGRES_PASSWORD"]["secretKeyRef"] == {
        "name": "beam-timescaledb-auth",
        "key": "postgres-password",
    }
    assert values["BEAM_DATABASE_OWNER"] == "beam"
    assert values["BEAM_DATABASE_OWNER_PASSWORD"]["secretKeyRef"]["key"] == "password"
    mount = next(m for m in database["volumeMounts"] if m["name"] == "init")
    assert mount == {
        "name": "init",
        "mountPath": "/docker-entrypoint-initdb.d/010-beam-owner.sh",
        "subPath": "010-beam-owner.sh",
    }
    assert env(container(docs, "Deployment", "beam-service"))["PGUSER"] == "beam"
    secret = find(docs, "Secret", "beam-timescaledb-auth")
    assert sorted(secret["data"]) == ["password", "postgres-password"]
    error = refused(helm, "--set", "timescaledb.auth.username=postgres")
    assert "timescaledb.auth.username cannot be" in error


def test_timescaledb_telemetry_is_off_and_extra_config_sidecars_and_volumes_fit_in(
    helm: Helm,
) -> None:
    docs = render(
        helm,
        "--set-string",
        "timescaledb.extraConfig.archive_mode=on",
        "--set",
        "timescaledb.extraConfig.archive_command=/walg/wal-g wal-push %p",
        "--set",
        "timescaledb.extraVolumes[0].name=walg",
        "--set",
        "timescaledb.extraVolumes[0].emptyDir.sizeLimit=64Mi",
        "--set",
        "timescaledb.extraVolumeMounts[0].name=walg",
        "--set",
        "timescaledb.extraVolumeMounts[0].mountPath=/walg",
        "--set",
        "timescaledb.initContainers[0].name=copy-walg",
        "--set",
        "timescaledb.initContainers[0].image=example/walg:1",
        "--set",
        "timescaledb.sidecars[0].name=exporter",
        "--set",
        "timescaledb.sidecars[0].image=example/exporter:1",
    )
    database = container(docs, "StatefulSet", "beam-timescaledb")
    assert database["args"] == [
        "postgres", "-c", "max_connections=200", "-c", "timescaledb.telemetry_level=off",
        "-c", "archive_command=/walg/wal-g wal-push %p", "-c", "archive_mode=on",
    ]  # fmt: skip
    assert env(database)["TIMESCALEDB_TELEMETRY"] == "off"
    assert {"name": "walg", "mountPath": "/walg"} in database["volumeMounts"]
    pod = find(docs, "StatefulSet", "beam-timescaledb")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["timescaledb", "exporter"]
    assert [c["name"] for c in pod["initContainers"]] == ["copy-walg"]
    assert {"name": "walg", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]


# --- smaller safety nets ---------------------------------------------------------------------


def test_service_monitors_need_the_prometheus_operator_crd(helm: Helm) -> None:
    enabled = ("--set", "serviceMonitor.enabled=true")
    assert not [d for d in render(helm, *enabled) if d["kind"] == "ServiceMonitor"]
    crd = ("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    assert len([d for d in render(helm, *enabled, *crd) if d["kind"] == "ServiceMonitor"]) == 2


def test_uninstall_cleanup_is_a_pre_delete_hook_removing_the_operators_finalizer(
    helm: Helm,
) -> None:
    docs = render(helm)
    job = find(docs, "Job", "beam-operator-cleanup")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    assert env(job["spec"]["template"]["spec"]["containers"][0])["FINALIZER"] == FINALIZER
    role = find(docs, "ClusterRole", "beam-operator-cleanup-beam-test")
    assert role["rules"] == [{"apiGroups": ["beam.dev"],
                              "resources": ["beamcustomers", "beamapikeys", "beampricelists"],
                              "verbs": ["list", "patch"]}]  # fmt: skip
    gitops = render(helm, "--set", "gitops.enabled=true", *EXISTING_SECRETS)
    assert not [d for d in gitops if d["metadata"]["name"].startswith("beam-operator-cleanup")]


# --- workers ---------------------------------------------------------------------------------


def test_workers_reach_the_service_the_budget_and_the_metrics_service(helm: Helm) -> None:
    one = render(helm)
    assert env(container(one, "Deployment", "beam-service"))["BEAM_WORKERS"] == "1"
    assert find(one, "Service", "beam-metrics")["spec"]["ports"][0]["targetPort"] == "metrics"

    docs = render(helm, "--set", "service.workers=4", "--set", "service.database.poolMax=3",
                  "--set", "service.database.readPoolMax=1")  # fmt: skip
    service = container(docs, "Deployment", "beam-service")
    assert env(service)["BEAM_WORKERS"] == "4"
    assert env(service)["BEAM_METRICS_PORT"] == "9464"
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in service["ports"]
    assert find(docs, "Service", "beam-metrics")["spec"]["ports"][0]["targetPort"] == "metrics"
    # 4 workers x (3 + 1 read) connections x 11 pods = 176, + 6 + 6 + 6 = 194 <= 200; 5 each
    # would not fit.
    error = refused(helm, "--set", "service.workers=4", "--set", "service.database.poolMax=4",
                    "--set", "service.database.readPoolMax=1")  # fmt: skip
    assert (
        "Service 220 (44 processes x (service.database.poolMax 4 + "
        "service.database.readPoolMax 1))" in error
    )


def test_operator_liveness_is_kopfs_endpoint_and_instances_are_separate(helm: Helm) -> None:
    docs = render(helm, "--set", "operator.instance=second")
    operator = container(docs, "Deployment", "beam-operator")
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports["health"] == 8081
    assert env(operator)["BEAM_HEALTH_PORT"] == "8081"
    assert env(operator)["BEAM_OPERATOR_INSTANCE"] == "second"
    assert (
        env(container(render(helm), "Deployment", "beam-operator"))["BEAM_OPERATOR_INSTANCE"] == ""
    )
    assert "/operator/instance" in refused(helm, "--set", "operator.instance=Not_A_Label")

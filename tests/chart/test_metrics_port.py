"""Metrics on a port of their own, for every worker count (issue 18 item 12).

With one worker the metrics were only at /metrics on the API's HTTP port, so a NetworkPolicy
that let Prometheus scrape them let it call the API too. Now:

- `beam serve` with BEAM_METRICS_PORT serves its Prometheus metrics on that port and the API
  port answers /metrics 404 (one process: its own registry; `--workers N`: the supervisor's
  sum, tests/chart/test_service_process.py). Without it (`beam dev`, the default outside the
  chart) /metrics stays on the HTTP port.
- The chart sets BEAM_METRICS_PORT for every worker count, and its container port, metrics
  Service, ServiceMonitor and NetworkPolicy use that port; with allowExternal false the
  metrics selectors are admitted to the metrics ports only, never to the API.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from beam_dev import servers as devservers
from tests.chart.conftest import Helm
from tests.support.stack import ServiceProcess, Stores, Tenant

pytestmark = pytest.mark.timeout(120)

CALLS = 3
SERVICE_MONITOR_CRD = ("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
RELEASE_PODS = {
    "podSelector": {
        "matchLabels": {"app.kubernetes.io/instance": "beam", "app.kubernetes.io/name": "beam"}
    }
}


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _rest_calls(text: str, call: str) -> float:
    """beam_call_duration_seconds_count of one REST call, from an exposition."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("beam_call_duration_seconds_count{")
        and f'call="{call}"' in line
        and 'transport="rest"' in line
    )


# --- the process -----------------------------------------------------------------------------


async def test_one_process_serves_metrics_on_the_metrics_port_and_none_on_the_api_port(
    stores: Stores, tenant: Tenant, tmp_path: Path
) -> None:
    metrics_port = devservers.free_port()
    service = ServiceProcess(
        stores, tmp_path, BEAM_WORKERS="1", BEAM_METRICS_PORT=str(metrics_port)
    ).start()
    assert service.process is not None
    try:
        assert _children(service.process.pid) == []  # one process: no supervisor, no workers
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(CALLS):
                response = await client.get(
                    f"{service.http_url}/v1/balance/nobody", headers=tenant.header("reader")
                )
                assert response.status_code == 404, response.text
            api = await client.get(f"{service.http_url}/metrics")
            scraped = await client.get(f"http://127.0.0.1:{metrics_port}/metrics")

        assert api.status_code == 404
        assert api.json()["error"]["reason"] == "ROUTE_NOT_FOUND"
        assert "beam_call_duration_seconds" not in api.text

        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        assert _rest_calls(scraped.text, "get_balance") == CALLS, scraped.text[:2000]
        assert "x-beam-worker" not in scraped.headers

        service.process.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, service.process.wait, 30)
        assert code == 0, service.log_tail()
        async with httpx.AsyncClient(timeout=2) as client:
            with pytest.raises(httpx.ConnectError):  # closed with the process
                await client.get(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        service.stop()


async def test_without_a_metrics_port_metrics_stay_on_the_http_port(
    stores: Stores, tenant: Tenant, tmp_path: Path
) -> None:
    """BEAM_METRICS_PORT unset or 0 (the default; `beam dev`): /metrics next to the API."""
    service = ServiceProcess(stores, tmp_path, BEAM_WORKERS="1", BEAM_METRICS_PORT="0").start()
    try:
        async with httpx.AsyncClient(base_url=service.http_url, timeout=5) as client:
            for _ in range(CALLS):
                response = await client.get("/v1/balance/nobody", headers=tenant.header("reader"))
                assert response.status_code == 404, response.text
            scraped = await client.get("/metrics")
        assert scraped.status_code == 200
        assert _rest_calls(scraped.text, "get_balance") == CALLS, scraped.text[:2000]
    finally:
        service.stop()


# --- the chart -------------------------------------------------------------------------------


def render(helm: Helm, *args: str) -> list[dict[str, Any]]:
    manifest = helm.template("--set", "fullnameOverride=beam", *args)
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("workers", [1, 4])
def test_every_worker_count_is_scraped_on_the_metrics_port(helm: Helm, workers: int) -> None:
    docs = render(
        helm,
        "--set", f"service.workers={workers}",
        "--set", "service.database.poolMax=3",  # 4 workers fit the connection budget
        "--set", "service.database.readPoolMax=1",
        "--set", "serviceMonitor.enabled=true",
        *SERVICE_MONITOR_CRD,
    )  # fmt: skip
    pod = find(docs, "Deployment", "beam-service")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BEAM_WORKERS"] == str(workers)
    assert env["BEAM_METRICS_PORT"] == "9464"
    assert container["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 9090, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9464, "protocol": "TCP"},
    ]

    metrics = find(docs, "Service", "beam-metrics")
    assert metrics["spec"]["ports"] == [
        {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP",
         "appProtocol": "http"},
    ]  # fmt: skip
    assert selects(metrics["spec"]["selector"], pod["metadata"]["labels"])
    for api in ("beam", "beam-headless"):  # the API Services carry no metrics port
        ports = find(docs, "Service", api)["spec"]["ports"]
        assert [p["targetPort"] for p in ports] == ["grpc", "http"]

    monitor = find(docs, "ServiceMonitor", "beam-service")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in docs if d["kind"] == "Service"]
    scraped = [
        s["metadata"]["name"] for s in services if selects(selector, s["metadata"]["labels"])
    ]
    assert scraped == ["beam-metrics"]


def test_network_policy_admits_scrapers_to_the_metrics_ports_only(helm: Helm) -> None:
    apps = {"namespaceSelector": {"matchLabels": {"team": "apps"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    docs = render(
        helm,
        "--set", "networkPolicy.enabled=true",
        "--set", "networkPolicy.allowExternal=false",
        "--set", "networkPolicy.ingressNamespaceSelector.matchLabels.team=apps",
        "--set", "networkPolicy.metricsNamespaceSelector.matchLabels.name=monitoring",
    )  # fmt: skip
    service = find(docs, "NetworkPolicy", "beam-service")["spec"]
    assert service["ingress"] == [
        {"ports": [{"port": 9090, "protocol": "TCP"}, {"port": 8080, "protocol": "TCP"}],
         "from": [RELEASE_PODS, apps]},
        {"ports": [{"port": 9464, "protocol": "TCP"}], "from": [RELEASE_PODS, monitoring]},
    ]  # fmt: skip
    operator = find(docs, "NetworkPolicy", "beam-operator")["spec"]
    assert operator["ingress"] == [
        {"ports": [{"port": 9100, "protocol": "TCP"}], "from": [RELEASE_PODS, monitoring]},
    ]

    # What a pod of the monitoring namespace may reach on a service pod: the metrics port.
    def admitted(rules: list[dict[str, Any]], peer: dict[str, Any]) -> set[int]:
        return {p["port"] for rule in rules if peer in rule["from"] for p in rule["ports"]}

    assert admitted(service["ingress"], monitoring) == {9464}
    assert admitted(service["ingress"], apps) == {9090, 8080}

    # allowExternal (the default): every port open, the metrics port included.
    open_docs = render(helm, "--set", "networkPolicy.enabled=true")
    assert find(open_docs, "NetworkPolicy", "beam-service")["spec"]["ingress"] == [
        {"ports": [{"port": 9090, "protocol": "TCP"}, {"port": 8080, "protocol": "TCP"},
                   {"port": 9464, "protocol": "TCP"}]},
    ]  # fmt: skip

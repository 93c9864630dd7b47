"""Helpers for the operator tests: the operator as a child process, its RBAC from the
chart, bounded polling, and direct reads of the ledger in PostgreSQL.

The operator runs exactly as in a cluster, minus the pod: `beam operator` in a child
process, authenticated with a ServiceAccount token from the TokenRequest API and bound to
the RBAC objects the Helm chart renders for it (never the admin kubeconfig), pointed at
the session's real PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import yaml

from beam_dev import servers as devservers

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "beam"
CRD_DIR = REPO_ROOT / "crds"
EXAMPLES_DIR = REPO_ROOT / "examples"
CRD_NAMES = ("beamcustomers.beam.dev", "beamapikeys.beam.dev", "beampricelists.beam.dev")
PEERING_CRD_NAMES = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
PEERING_KINDS = ("ClusterKopfPeering", "KopfPeering")
API_VERSION = "beam.dev/v1alpha1"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")

T = TypeVar("T")


class ControlPlane(Protocol):
    kubeconfig: Path

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]: ...

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]: ...

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path: ...


# --- waiting ---------------------------------------------------------------------------------


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.1,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe`` until it returns something other than None/False; bounded."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last is not None and last is not False:
            return last
        time.sleep(interval)
    detail = f"\n{describe()}" if describe is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})"
                         f"{detail}")  # fmt: skip


# --- kubectl ---------------------------------------------------------------------------------


def kubectl_ok(kube: ControlPlane, *args: str, input: str | None = None, timeout: float = 60,
               kubeconfig: Path | None = None) -> str:  # fmt: skip
    result = kube.kubectl(*args, input=input, check=False, timeout=timeout, kubeconfig=kubeconfig)
    assert result.returncode == 0, f"kubectl {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def get_json(kube: ControlPlane, namespace: str, resource: str) -> dict[str, Any] | None:
    result = kube.kubectl("get", resource, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def apply(kube: ControlPlane, *manifests: Mapping[str, Any]) -> None:
    kubectl_ok(kube, "apply", "-f", "-", input=yaml.safe_dump_all(list(manifests)))


def condition(obj: Mapping[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for entry in ((obj or {}).get("status") or {}).get("conditions") or []:
        if entry.get("type") == kind:
            return dict(entry)
    return None


def secret_data(kube: ControlPlane, namespace: str, name: str) -> dict[str, str] | None:
    secret = get_json(kube, namespace, f"secret/{name}")
    if secret is None:
        return None
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def events_for(kube: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    out = kubectl_ok(
        kube, "get", "events", "-n", namespace,
        "--field-selector", f"involvedObject.name={name}", "-o", "json",
    )  # fmt: skip
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def customer(namespace: str, name: str, customer_id: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "BeamCustomer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"customerId": customer_id, **spec},
    }


def api_key(namespace: str, name: str, role: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "BeamApiKey",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"role": role, **spec},
    }


# --- RBAC from the chart -----------------------------------------------------------------------


def chart_operator_rbac(kube: ControlPlane, release: str, namespace: str) -> list[dict[str, Any]]:
    """The operator's ServiceAccount and RBAC objects exactly as the chart renders them."""
    rendered = kube.helm("template", release, str(CHART), "--namespace", namespace).stdout
    wanted = []
    for document in yaml.safe_load_all(rendered):
        if not isinstance(document, dict) or document.get("kind") not in RBAC_KINDS:
            continue
        labels = document.get("metadata", {}).get("labels", {})
        if labels.get("app.kubernetes.io/component") == "operator":
            wanted.append(document)
    kinds = sorted(d["kind"] for d in wanted)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ServiceAccount"], kinds
    return wanted


def chart_operator_peering(
    kube: ControlPlane, release: str, namespace: str, *args: str
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The operator's Kopf peering objects as the chart renders them, and the peering
    settings its Deployment passes (BEAM_STANDALONE, BEAM_PEERING_*, BEAM_NAMESPACES)."""
    rendered = kube.helm("template", release, str(CHART), "--namespace", namespace, *args).stdout
    objects: list[dict[str, Any]] = []
    env: dict[str, str] = {}
    for document in yaml.safe_load_all(rendered):
        if not isinstance(document, dict):
            continue
        if document.get("kind") in PEERING_KINDS:
            objects.append(document)
        elif document.get("kind") == "Deployment" and document["metadata"]["name"].endswith(
            "-operator"
        ):
            container = document["spec"]["template"]["spec"]["containers"][0]
            env = {
                e["name"]: e["value"]
                for e in container["env"]
                if "value" in e
                and (e["name"].startswith("BEAM_PEERING_")
                     or e["name"] in ("BEAM_STANDALONE", "BEAM_NAMESPACES"))
            }  # fmt: skip
    assert objects, "the chart rendered no peering object"
    return objects, env


# --- the operator process ----------------------------------------------------------------------


class OperatorProcess:
    """`beam operator` as a child process; each start gets a fresh metrics port and log."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.env = dict(env)
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.metrics_port = 0
        self.health_port = 0
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        assert not self.running, "the operator is already running"
        self.starts += 1
        self.metrics_port = devservers.free_port()
        self.health_port = devservers.free_port()
        self.log_path = self.workdir / f"operator-{self.starts}.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "beam.cli.main", "operator"],
            env={
                **os.environ,
                **self.env,
                "BEAM_METRICS_PORT": str(self.metrics_port),
                "BEAM_HEALTH_PORT": str(self.health_port),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        # Ready once start-up (stores, migrations) is done and Kopf logged its first handling.
        wait_for(
            "the operator to connect its stores",
            lambda: self._check_alive() and "stores connected" in self.log_text(),
            timeout=timeout,
            describe=self.log_tail,
        )
        return self

    def _check_alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"beam operator exited early:\n{self.log_tail()}")
        return True

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finalizer bookkeeping (a crash)."""
        if self.running:
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or not self.running:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# --- PostgreSQL --------------------------------------------------------------------------------


def sql(dsn: str, query: str, *args: Any) -> list[dict[str, Any]]:
    """Run one query on its own connection (sync tests; no event loop is running)."""

    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return [dict(row) for row in await conn.fetch(query, *args, timeout=10)]
        finally:
            await conn.close()

    return asyncio.run(run())


def execute(dsn: str, statement: str) -> None:
    """A statement that cannot be prepared or run in a transaction (CREATE DATABASE)."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(statement, timeout=30)
        finally:
            await conn.close()

    asyncio.run(run())


def credit_rows(dsn: str, tenant: str, customer_id: str) -> list[dict[str, Any]]:
    """The ledger's CRD credits of one customer (transaction id ``crd:<customer>:<id>``)."""
    return sql(
        dsn,
        """SELECT transaction_id, amount_grains FROM transactions
           WHERE tenant = $1 AND customer_id = $2 AND transaction_id LIKE 'crd:%'
           ORDER BY id""",
        tenant,
        customer_id,
    )

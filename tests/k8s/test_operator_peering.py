"""Two operators at once: Kopf peering lets exactly one reconcile (issue 18 item 12).

Two `beam operator` processes run against the real API server with what the chart renders
for `operator.watchNamespaces=[<tenant>]`: its Role and RoleBinding, its KopfPeering in the
tenant namespace, and its Deployment's peering settings, each process with its own Kopf
identity (POD_ID, the pod name in a cluster). The one that started last reconciles (a
rollout's new pod, a replacement); the older one pauses and takes over when the newer one
exits or, cut off (SIGSTOP: alive but silent, as behind a partition), when its keep-alive
expires; when the newer one comes back it reclaims. Which operator handled an object is read
from each one's metrics (`beam_operator_reconciles_total`) and log; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.k8s.operator_support import (
    CHART,
    CRD_DIR,
    CRD_NAMES,
    PEERING_CRD_NAMES,
    RBAC_KINDS,
    ControlPlane,
    OperatorProcess,
    apply,
    chart_operator_peering,
    credit_rows,
    customer,
    get_json,
    kubectl_ok,
    wait_for,
)
from tests.support.stack import Stores

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]

RELEASE = "beampeer"
LIFETIME_SECONDS = 10  # operator.peering.lifetimeSeconds: a frozen operator's keep-alive
WAIT_SECONDS = 30.0
CREDIT_GRAINS = 5_000
RESUMING = "Resuming operations after the pause"  # Kopf's log line: this operator is active
PAUSING = "Pausing operations in favour of"  # Kopf's: it saw a live peer of higher priority


@dataclass
class Peers:
    kube: ControlPlane
    stores: Stores
    system: str
    tenant: str
    peering: str
    env: dict[str, str]
    workdir: Path
    processes: list[OperatorProcess] = field(default_factory=list)

    def operator(self, pod: str) -> OperatorProcess:
        """A new operator process, named ``pod`` in the peering; started by the caller."""
        process = OperatorProcess({**self.env, "POD_ID": pod}, self.workdir / pod)
        (self.workdir / pod).mkdir()
        self.processes.append(process)
        return process

    def status(self) -> dict[str, dict[str, Any]]:
        """The KopfPeering's status: each live operator's keep-alive, by identity."""
        obj = get_json(self.kube, self.tenant, f"kopfpeering/{self.peering}")
        assert obj is not None, "the chart's KopfPeering is gone"
        return dict(obj.get("status") or {})


@pytest.fixture(scope="module")
def kube(control_plane: ControlPlane) -> ControlPlane:
    kubectl_ok(control_plane, "apply", "-f", str(CRD_DIR))
    kubectl_ok(
        control_plane, "wait", "--for=condition=Established", "--timeout=60s",
        *(f"crd/{name}" for name in (*CRD_NAMES, *PEERING_CRD_NAMES)), timeout=90,
    )  # fmt: skip
    return control_plane


@pytest.fixture(scope="module")
def peers(
    kube: ControlPlane, stores: Stores, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Peers]:
    suffix = uuid.uuid4().hex[:6]
    system, tenant = f"beam-peer-system-{suffix}", f"beam-peer-{suffix}"
    for namespace in (system, tenant):
        kubectl_ok(kube, "create", "namespace", namespace)
    values = ("--set", f"operator.watchNamespaces={{{tenant}}}",
              "--set", f"operator.peering.lifetimeSeconds={LIFETIME_SECONDS}")  # fmt: skip
    rendered = kube.helm("template", RELEASE, str(CHART), "--namespace", system, *values).stdout
    rbac = [
        doc
        for doc in yaml.safe_load_all(rendered)
        if isinstance(doc, dict)
        and doc.get("kind") in RBAC_KINDS
        and doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "operator"
    ]
    assert sorted(d["kind"] for d in rbac) == [
        "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount",
    ]  # fmt: skip
    peering_objects, env = chart_operator_peering(kube, RELEASE, system, *values)
    assert [(o["kind"], o["metadata"]["namespace"]) for o in peering_objects] == [
        ("KopfPeering", tenant)
    ]
    assert env["BEAM_NAMESPACES"] == tenant
    assert env["BEAM_STANDALONE"] == "false"
    assert env["BEAM_PEERING_LIFETIME_SECONDS"] == str(LIFETIME_SECONDS)
    apply(kube, *rbac, *peering_objects)
    account = next(o for o in rbac if o["kind"] == "ServiceAccount")["metadata"]["name"]
    workdir = tmp_path_factory.mktemp("peering")
    kubeconfig = kube.service_account_kubeconfig(system, account, workdir / "kubeconfig")
    state = Peers(
        kube, stores, system, tenant, peering_objects[0]["metadata"]["name"],
        {**stores.env(), **env, "KUBECONFIG": str(kubeconfig),
         "BEAM_STATUS_INTERVAL_SECONDS": "1", "BEAM_LOG_LEVEL": "INFO"},
        workdir,
    )  # fmt: skip
    yield state
    # Delete the objects while an operator runs (its finalizers), then stop everything.
    for process in state.processes:
        if process.process is not None and process.running:
            os.killpg(process.process.pid, signal.SIGCONT)
    if not any(p.running for p in state.processes):
        state.operator(f"cleanup-{uuid.uuid4().hex[:4]}").start()
    kube.kubectl(
        "delete", "beamcustomers", "--all", "-n", tenant, "--wait=true", "--timeout=60s",
        check=False, timeout=90,
    )  # fmt: skip
    for process in state.processes:
        process.stop()
    for obj in rbac:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            kube.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], check=False)
    for namespace in (tenant, system):
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# --- helpers ---------------------------------------------------------------------------------


def reconciles(operator: OperatorProcess) -> int:
    """BeamCustomer reconciles this operator completed (create, update or resume)."""
    text = httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).text
    pattern = re.compile(
        r'^beam_operator_reconciles_total\{handler="reconcile",kind="BeamCustomer",'
        r'outcome="ok"\} (\S+)$', re.MULTILINE,
    )  # fmt: skip
    found = pattern.search(text)
    return int(float(found.group(1))) if found else 0


def handled(operator: OperatorProcess, name: str) -> bool:
    """Whether this operator's log shows a completed handler of the object ``name``."""
    for line in operator.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        ref = record.get("k8s_ref") or {}
        message = str(record.get("message", ""))
        if (
            ref.get("name") == name
            and message.startswith("Handler 'reconcile")
            and message.endswith("succeeded.")
        ):
            return True
    return False


def balance(peers: Peers, name: str) -> int | None:
    obj = get_json(peers.kube, peers.tenant, f"beamcustomer/{name}")
    status = (obj or {}).get("status") or {}
    value = status.get("balance")
    return value if isinstance(value, int) else None


def create_customer(peers: Peers, name: str) -> None:
    credits = [{"id": "grant", "amountGrains": CREDIT_GRAINS}]
    apply(peers.kube, customer(peers.tenant, name, f"cus_{name}", credits=credits))


def wait_credited(peers: Peers, name: str, *operators: OperatorProcess) -> None:
    wait_for(
        f"{name} to show its credit", lambda: balance(peers, name) == CREDIT_GRAINS,
        timeout=WAIT_SECONDS,
        describe=lambda: "\n---\n".join(o.log_tail(20) for o in operators),
    )  # fmt: skip
    assert [r["amount_grains"] for r in credit_rows(peers.stores.env()["BEAM_DATABASE_URL"],
                                                    peers.tenant, f"cus_{name}")] == [
        CREDIT_GRAINS
    ]  # fmt: skip


def resumed(operator: OperatorProcess) -> int:
    """How often Kopf resumed this operator: after its start-up pause, and after each pause."""
    return operator.log_text().count(RESUMING)


def last_turn(operator: OperatorProcess) -> str | None:
    """RESUMING or PAUSING, whichever Kopf logged last for this operator."""
    text = operator.log_text()
    turns = sorted((text.rfind(marker), marker) for marker in (RESUMING, PAUSING))
    return turns[-1][1] if turns[-1][0] >= 0 else None


def start_older_and_newer(peers: Peers, tag: str) -> tuple[OperatorProcess, OperatorProcess]:
    """The older operator, active; then the newer one, which takes over: the older pauses."""
    older = peers.operator(f"older-{tag}").start()
    wait_for("the older operator to leave the start-up pause", lambda: resumed(older) == 1,
             timeout=WAIT_SECONDS, describe=older.log_tail)  # fmt: skip
    newer = peers.operator(f"newer-{tag}").start()
    wait_for("the newer operator to leave the start-up pause", lambda: resumed(newer) == 1,
             timeout=WAIT_SECONDS, describe=newer.log_tail)  # fmt: skip
    wait_for("the older operator to pause for the newer", lambda: last_turn(older) == PAUSING,
             timeout=WAIT_SECONDS, describe=older.log_tail)  # fmt: skip
    status = peers.status()
    assert set(status) == {older.env["POD_ID"], newer.env["POD_ID"]}
    # The one that started last has the higher priority (its start in microseconds).
    assert status[newer.env["POD_ID"]]["priority"] > status[older.env["POD_ID"]]["priority"]
    assert status[newer.env["POD_ID"]]["lifetime"] == LIFETIME_SECONDS
    return older, newer


def metrics_text(operator: OperatorProcess) -> str:
    return httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).text


# --- tests -----------------------------------------------------------------------------------


def test_only_the_newest_operator_reconciles_and_the_other_takes_over_when_it_exits(
    peers: Peers,
) -> None:
    older, newer = start_older_and_newer(peers, "a")
    paused_with = reconciles(older)

    create_customer(peers, "one")
    wait_credited(peers, "one", older, newer)
    time.sleep(3)  # a few status intervals: the paused operator runs no handler, no timer
    assert reconciles(newer) == 1
    assert handled(newer, "one")
    assert not handled(older, "one")
    assert reconciles(older) == paused_with
    assert "beam_operator_status_refreshes_total{" in metrics_text(newer)
    refreshes = metrics_text(older).count("beam_operator_status_refreshes_total{")
    time.sleep(2)
    assert metrics_text(older).count("beam_operator_status_refreshes_total{") == refreshes

    # The active one exits cleanly: it removes its keep-alive, and the older resumes at once.
    stopped_at = time.monotonic()
    assert newer.stop() == 0
    wait_for("the older operator to take over", lambda: last_turn(older) == RESUMING,
             timeout=WAIT_SECONDS, describe=older.log_tail)  # fmt: skip
    assert time.monotonic() - stopped_at < LIFETIME_SECONDS  # handed over, not expired
    assert set(peers.status()) == {older.env["POD_ID"]}

    create_customer(peers, "two")
    wait_credited(peers, "two", older)
    assert handled(older, "two")
    assert not handled(newer, "two")
    # It also resumed "one" (Kopf's resume handler; idempotent: still one credit row).
    wait_for("the older operator to resume one", lambda: handled(older, "one"),
             timeout=WAIT_SECONDS, describe=older.log_tail)  # fmt: skip
    wait_credited(peers, "one", older)
    older.stop()


def test_a_cut_off_operator_is_replaced_when_its_keep_alive_expires_and_reclaims_on_return(
    peers: Peers,
) -> None:
    older, newer = start_older_and_newer(peers, "b")
    assert newer.process is not None

    # The active operator is cut off: alive, but no keep-alive and no handling.
    os.killpg(newer.process.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        wait_for("the older operator to take over", lambda: last_turn(older) == RESUMING,
                 timeout=LIFETIME_SECONDS + WAIT_SECONDS, describe=older.log_tail)  # fmt: skip
        took = time.monotonic() - frozen_at
        assert took <= LIFETIME_SECONDS + 5, took  # when the last keep-alive expired
        create_customer(peers, "three")
        wait_credited(peers, "three", older)
        assert handled(older, "three")
        assert not handled(newer, "three")
    finally:
        os.killpg(newer.process.pid, signal.SIGCONT)

    # Back, it is still the newer: the older pauses again once its keep-alive lands (Kopf may
    # drop that keep-alive once while the returning process works through what it missed,
    # until the next one: a few seconds at this lifetime).
    wait_for("the older operator to pause again", lambda: last_turn(older) == PAUSING,
             timeout=WAIT_SECONDS, describe=older.log_tail)  # fmt: skip
    time.sleep(LIFETIME_SECONDS)
    assert last_turn(older) == PAUSING, older.log_tail()
    assert set(peers.status()) == {older.env["POD_ID"], newer.env["POD_ID"]}
    paused_with = reconciles(older)
    create_customer(peers, "four")
    wait_credited(peers, "four", older, newer)
    assert handled(newer, "four")
    assert not handled(older, "four")
    assert reconciles(older) == paused_with
    newer.stop()
    older.stop()


def start_failing(peers: Peers, pod: str, expected: str, **env: str) -> None:
    """Start an operator whose start-up check must fail with ``expected``, then stop it."""
    operator = peers.operator(pod)
    operator.env.update(env)
    with pytest.raises(AssertionError, match="timed out"):
        operator.start(timeout=10)  # it never connects its stores: the check fails first
    try:
        wait_for("the start-up check's error", lambda: expected in operator.log_text(),
                 timeout=WAIT_SECONDS, describe=operator.log_tail)  # fmt: skip
        assert RESUMING not in operator.log_text()
        assert "stores connected" not in operator.log_text()
    finally:
        operator.stop()


def test_an_operator_without_its_peering_object_says_so_instead_of_waiting(
    peers: Peers,
) -> None:
    """Kopf would wait, paused and silent, for a peering object that does not exist."""
    peering = get_json(peers.kube, peers.tenant, f"kopfpeering/{peers.peering}")
    assert peering is not None
    kubectl_ok(peers.kube, "delete", "kopfpeering", peers.peering, "-n", peers.tenant)
    try:
        start_failing(
            peers, "lost",
            f"KopfPeering {peers.peering!r} in {peers.tenant!r} does not exist, and without it "
            "the operator would wait, paused, forever: apply crds/",
        )  # fmt: skip
    finally:
        peering["metadata"] = {k: peering["metadata"][k] for k in ("name", "namespace", "labels")}
        peering.pop("status", None)
        apply(peers.kube, peering)
    # Another name than the chart's: its RBAC covers the release's own object only.
    start_failing(
        peers, "misnamed",
        f"the operator may not read KopfPeering 'other-peering' in {peers.tenant!r}: its RBAC",
        BEAM_PEERING_NAME="other-peering",
    )  # fmt: skip

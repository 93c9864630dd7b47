"""The one-node cluster (hack/cluster) leaves the host exactly as it was.

A cluster is started with a pod that exercises what touches a host (an overlay root, an
emptyDir and a projected token mount, a veth on the bridge, kube-proxy's rules for its Service,
a pod cgroup with limits), the pod answers through its Service, the cluster is stopped, and
hack/cluster/host_state.py must find no difference: sysctls, mounts, links, addresses, routes,
iptables (nft and legacy), cgroups, the paths a bare kubelet/containerd/CNI would create, and
processes. While the cluster runs, only its processes and its pod cgroups may differ.

Needs root and the built binaries and images: `make e2e-cluster` (hack/cluster/e2e.sh) runs
it with BEAM_CONTROLPLANE_BIN_DIR, BEAM_NODE_BIN_DIR and BEAM_CLUSTER_IMAGES set; elsewhere it
skips with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HACK = ROOT / "hack" / "cluster"

pytestmark = pytest.mark.e2e

POD = """
apiVersion: v1
kind: Pod
metadata: {name: probe, labels: {app: probe}}
spec:
  containers:
    - name: redis
      image: localhost/beam-redis:bookworm
      imagePullPolicy: Never
      command: [redis-server, --port, "6379", --save, "", --dir, /data, --protected-mode, "no"]
      securityContext: {runAsNonRoot: true, runAsUser: 999, seccompProfile: {type: RuntimeDefault}}
      resources: {limits: {cpu: 200m, memory: 64Mi}}
      readinessProbe: {tcpSocket: {port: 6379}, periodSeconds: 1}
      volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: probe}
spec:
  selector: {app: probe}
  ports: [{port: 6379}]
"""


def snapshot(path: Path) -> dict[str, object]:
    subprocess.run(
        [sys.executable, str(HACK / "host_state.py"), "snapshot", str(path)], check=True, timeout=60
    )
    result: dict[str, object] = json.loads(path.read_text())
    return result


def differences(before: dict[str, object], after: dict[str, object]) -> list[str]:
    sys.path.insert(0, str(HACK))
    try:
        import host_state
    finally:
        sys.path.remove(str(HACK))
    return host_state.differences(before, after)


@pytest.fixture
def environment() -> dict[str, str]:
    missing = [
        name
        for name in ("BEAM_CONTROLPLANE_BIN_DIR", "BEAM_NODE_BIN_DIR", "BEAM_CLUSTER_IMAGES")
        if not os.environ.get(name)
    ]
    if os.geteuid() != 0 or missing:
        pytest.skip("runs through make e2e-cluster (root, built binaries and images)")
    return dict(os.environ)


@pytest.mark.timeout(300)  # start ~25 s, pod ~5 s, stop ~5 s on 2 busy cores
def test_cluster_leaves_the_host_as_it_was(environment: dict[str, str], tmp_path: Path) -> None:
    before = snapshot(tmp_path / "before.json")
    workdir = tmp_path / "cluster"
    images = environment["BEAM_CLUSTER_IMAGES"].split()
    try:
        subprocess.run(
            ["bash", str(HACK / "up.sh"), str(workdir), *images], check=True, timeout=240
        )
        env = dict(
            line.split("=", 1)
            for line in (workdir / "cluster.env").read_text().splitlines()
            if "=" in line
        )
        kubectl = [
            "nsenter", "--target", env["HOLDER_PID"], "--net", "--",
            f"{env['CONTROLPLANE_BIN_DIR']}/kubectl", "--kubeconfig", env["KUBECONFIG"],
        ]  # fmt: skip
        subprocess.run([*kubectl, "apply", "-f", "-"], input=POD, text=True, check=True)
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Ready", "pod/probe", "--timeout=120s"],
            check=True, timeout=150,
        )  # fmt: skip
        cluster_ip = subprocess.run(
            [*kubectl, "get", "service", "probe", "-o", "jsonpath={.spec.clusterIP}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        # Through the Service (kube-proxy's DNAT in the cluster's namespace), from a pod.
        ping = subprocess.run(
            [*kubectl, "exec", "probe", "--", "redis-cli", "-h", cluster_ip, "ping"],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        assert ping.stdout.strip() == "PONG"
        during = snapshot(tmp_path / "during.json")
        leaked = [
            line
            for line in differences(before, during)
            if not line.startswith(("processes: ", "cgroups: "))
        ]
        assert leaked == [], "the running cluster shows on the host"
    finally:
        subprocess.run(["bash", str(HACK / "down.sh"), str(workdir)], check=False, timeout=120)
    after = snapshot(tmp_path / "after.json")
    assert differences(before, after) == []
    # Passed: the logs are not needed, the unpacked images and etcd data (~400 MB) would stay
    # (pytest keeps its temporary directories).
    shutil.rmtree(workdir)

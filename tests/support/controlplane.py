"""A real Kubernetes control plane for tests, from hack/controlplane/.

Beam's Kubernetes tests talk to a real kube-apiserver (with etcd and kube-controller-manager),
because schema validation, RBAC, TokenRequest, garbage collection and namespace deletion are
all server-side behaviour that no fake reproduces. The binaries are built from source by
hack/controlplane/build.sh and cached by version; up.sh/down.sh run them on 127.0.0.1.

`BEAM_TEST_KUBECONFIG` points the same tests at an existing cluster instead
(`ControlPlane.external`); then nothing is started or stopped here, and tests must assume the
cluster is shared: they create their own namespaces and clean up after themselves.

This module depends on nothing but the standard library and the scripts, so pytest fixtures
and ad-hoc scripts can use it without importing `beam`.

The dangerous part: the processes outlive the Python objects. `stop()` must run (the pytest
fixture calls it in its finalizer); if the test process is killed outright, run
`bash hack/controlplane/down.sh WORKDIR` by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT_DIR = REPO_ROOT / "hack" / "controlplane"
VERSIONS_FILE = SCRIPT_DIR / "versions.env"

# A cold build is about ten minutes on 2 cores; the bound leaves room for a slow machine.
BUILD_TIMEOUT_SECONDS = 3600.0
# up.sh bounds its own waits (BEAM_CONTROLPLANE_START_TIMEOUT, 90 s); this is the backstop.
START_TIMEOUT_SECONDS = 180.0
STOP_TIMEOUT_SECONDS = 60.0
START_ATTEMPTS = 2
# ServiceAccount tokens minted for tests live this long (the API server's minimum is 10 min).
SERVICE_ACCOUNT_TOKEN_DURATION = "1h"


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or reached."""


def pinned_versions() -> dict[str, str]:
    """The KEY=VALUE pairs of hack/controlplane/versions.env."""
    versions: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, separator, value = line.partition("=")
        assert separator, f"{VERSIONS_FILE}: not KEY=VALUE: {line!r}"
        versions[key.strip()] = value.strip()
    return versions


def _run_script(
    name: str, *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run hack/controlplane/NAME; raise ControlPlaneError with its stderr on failure."""
    command = ["bash", str(SCRIPT_DIR / name), *args]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise ControlPlaneError(f"{name} did not finish within {timeout:.0f}s") from error
    if result.returncode != 0:
        raise ControlPlaneError(
            f"{' '.join([name, *args])} failed with exit code {result.returncode}:\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def find_or_build_binaries(timeout: float = BUILD_TIMEOUT_SECONDS) -> Path:
    """The directory with kube-apiserver, kube-controller-manager, kubectl, etcd and helm.

    Runs build.sh, which returns at once when the versioned cache is warm and otherwise
    builds from source (minutes).
    """
    result = _run_script("build.sh", timeout=timeout)
    lines = result.stdout.strip().splitlines()
    if not lines:
        raise ControlPlaneError("build.sh printed no bin dir")
    bin_dir = Path(lines[-1])
    for name in ("kube-apiserver", "kube-controller-manager", "kubectl", "etcd", "helm"):
        if not (bin_dir / name).is_file():
            raise ControlPlaneError(f"build.sh reported {bin_dir}, but {name} is not there")
    return bin_dir


def _tool_bin_dir_for_external() -> Path:
    """Where kubectl and helm come from when the cluster is someone else's."""
    explicit = os.environ.get("BEAM_CONTROLPLANE_BIN_DIR")
    if explicit:
        return Path(explicit)
    kubectl, helm = shutil.which("kubectl"), shutil.which("helm")
    if kubectl and helm and Path(kubectl).parent == Path(helm).parent:
        return Path(kubectl).parent
    return find_or_build_binaries()


@dataclass
class ControlPlane:
    """A reachable Kubernetes API server plus the kubectl and helm to drive it."""

    kubeconfig: Path
    bin_dir: Path
    workdir: Path | None = None
    is_external: bool = False

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def start(cls, workdir: Path, bin_dir: Path | None = None) -> ControlPlane:
        """Build if needed, then start etcd, kube-apiserver and kube-controller-manager.

        Returns once /readyz is ok and the `default` ServiceAccount exists. On failure up.sh
        has already stopped what it started.
        """
        bin_dir = bin_dir if bin_dir is not None else find_or_build_binaries()
        workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "BEAM_CONTROLPLANE_BIN_DIR": str(bin_dir)}
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                _run_script("up.sh", str(workdir), timeout=START_TIMEOUT_SECONDS, env=env)
                break
            except ControlPlaneError as error:
                # up.sh cleans up after itself, except when it was killed for taking too long.
                _run_script("down.sh", str(workdir), timeout=STOP_TIMEOUT_SECONDS)
                # Ports are checked free just before use, yet another process can take one in
                # between; that, and only that, is worth another try on fresh ports.
                if attempt == START_ATTEMPTS or "address already in use" not in str(error):
                    raise
        kubeconfig = workdir / "kubeconfig"
        if not kubeconfig.is_file():
            raise ControlPlaneError(f"up.sh succeeded but wrote no {kubeconfig}")
        return cls(kubeconfig=kubeconfig, bin_dir=bin_dir, workdir=workdir)

    @classmethod
    def external(cls, kubeconfig: Path, bin_dir: Path | None = None) -> ControlPlane:
        """Wrap an existing cluster; `stop()` leaves it alone."""
        if not kubeconfig.is_file():
            raise ControlPlaneError(f"kubeconfig {kubeconfig} does not exist")
        bin_dir = bin_dir if bin_dir is not None else _tool_bin_dir_for_external()
        return cls(kubeconfig=kubeconfig, bin_dir=bin_dir, is_external=True)

    def stop(self) -> None:
        """Stop the processes up.sh started (idempotent); no-op for an external cluster."""
        if self.is_external or self.workdir is None:
            return
        _run_script("down.sh", str(self.workdir), timeout=STOP_TIMEOUT_SECONDS)

    # --- tools -------------------------------------------------------------------------------

    def _tool(self, name: str) -> str:
        candidate = self.bin_dir / name
        if candidate.is_file():
            return str(candidate)
        found = shutil.which(name)
        if found is None:
            raise ControlPlaneError(f"{name} is neither in {self.bin_dir} nor on PATH")
        return found

    def _run(
        self,
        tool: str,
        args: tuple[str, ...],
        *,
        input: str | None,
        check: bool,
        timeout: float,
        kubeconfig: Path | None,
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}
        # helm keeps caches and repository config under HOME; keep tests off the user's.
        if tool == "helm" and self.workdir is not None:
            for variable, directory in (
                ("HELM_CACHE_HOME", "helm/cache"),
                ("HELM_CONFIG_HOME", "helm/config"),
                ("HELM_DATA_HOME", "helm/data"),
            ):
                env.setdefault(variable, str(self.workdir / directory))
        result = subprocess.run(
            [self._tool(tool), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, output=result.stdout, stderr=result.stderr
            )
        return result

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (as admin unless `kubeconfig` says otherwise).

        With check=True a non-zero exit raises CalledProcessError carrying stdout and stderr.
        """
        return self._run(
            "kubectl", args, input=input, check=check, timeout=timeout, kubeconfig=kubeconfig
        )

    def helm(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster; same contract as `kubectl`."""
        return self._run(
            "helm", args, input=input, check=check, timeout=timeout, kubeconfig=kubeconfig
        )

    # --- identities --------------------------------------------------------------------------

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """Write a kubeconfig at `path` that authenticates as ServiceAccount namespace/name.

        The token comes from the TokenRequest API (`kubectl create token`), so the account must
        exist; the token is bound to the account and expires after
        SERVICE_ACCOUNT_TOKEN_DURATION.
        """
        token = self.kubectl(
            "create",
            "token",
            name,
            "--namespace",
            namespace,
            "--duration",
            SERVICE_ACCOUNT_TOKEN_DURATION,
        ).stdout.strip()
        if not token:
            raise ControlPlaneError(f"kubectl create token {namespace}/{name} printed no token")
        # --flatten inlines a CA file, so the new kubeconfig stands alone.
        view = json.loads(
            self.kubectl(
                "config", "view", "--raw", "--minify", "--flatten", "--output", "json"
            ).stdout
        )
        cluster = view["clusters"][0]["cluster"]
        user = f"system:serviceaccount:{namespace}:{name}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": cluster}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {"name": user, "context": {"cluster": "cluster", "user": user}},
            ],
            "current-context": user,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        path.chmod(0o600)
        return path

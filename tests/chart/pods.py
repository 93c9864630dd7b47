"""Pods as real processes: one network, UTS and mount namespace per pod, on a private bridge.

What a Kubernetes pod gives a container, and how it is made here (root only):
- its own network stack and host name: `unshare --net --uts --mount`, held open by a
  `sleep` that lives as long as the pod (a pod's containers restart inside it);
- an address other pods reach: a veth pair from the pod to a bridge that lives in a
  namespace of its own (the "switch"), with an IPv6 unique-local address (fd00::/64). Nothing
  is attached to the host's network namespace, so no packet leaves the namespaces made here;
- the cluster DNS names of every pod: one hosts file, bind-mounted over /etc/hosts in each
  pod's mount namespace;
- its volumes at the paths the chart mounts them (/opt/beam-redis, /data, /run/...): the
  container runs chrooted in a directory that bind-mounts the host's /usr and /etc read-only,
  and /dev and /proc, next to plain directories for the volumes. A "PVC" directory is kept when
  the pod is deleted and re-created; an "emptyDir" is emptied.

Every process started here dies with the test process (PR_SET_PDEATHSIG), and the mounts live
only in the pods' mount namespaces, so nothing is left on the host when a run is killed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ULA_PREFIX = "fd00::"
_PR_SET_PDEATHSIG = 1
_STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class PodError(RuntimeError):
    pass


def missing_prerequisites() -> str | None:
    """Why pods cannot be made on this machine, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("unshare", "nsenter", "ip", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _popen(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[bytes] | int | None = subprocess.DEVNULL,
    stdin: int | None = subprocess.DEVNULL,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(command),
        env=dict(env) if env is not None else {"PATH": _STANDARD_PATH},
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout not in (None, subprocess.DEVNULL) else stdout,
        preexec_fn=_die_with_parent,
        cwd=cwd,
    )


def _run(command: Sequence[str], timeout: float = 20) -> str:
    result = subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": _STANDARD_PATH},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode != 0:
        raise PodError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def _holder(
    flags: Sequence[str], setup: str, *, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A process inside new namespaces that runs `setup`, says "ready" and sleeps."""
    process = _popen(
        ["unshare", *flags, "--", "/bin/sh", "-ec", f"{setup}\necho ready\nexec sleep infinity"],
        env={"PATH": _STANDARD_PATH, **(env or {})},
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    if line != "ready":
        rest = process.stdout.read(4000).decode() if process.poll() is not None else ""
        process.kill()
        raise PodError(f"namespace setup failed: {line} {rest}")
    return process


@dataclass
class Network:
    """A bridge in a namespace of its own; pods plug into it with veth pairs."""

    workdir: Path
    switch: subprocess.Popen[bytes] | None = None
    hosts_file: Path = field(init=False)
    _next_port: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts_file = self.workdir / "hosts"
        self.hosts_file.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")

    def start(self) -> Network:
        self.switch = _holder(
            ["--net"],
            "ip link add br0 type bridge\n"
            "ip link set br0 type bridge mcast_snooping 0\n"
            "ip link set br0 up",
        )
        return self

    def add_host(self, address: str, *names: str) -> None:
        with self.hosts_file.open("a") as hosts:
            hosts.write(f"{address} {' '.join(names)}\n")

    def plug(self, pod_pid: int, address: str) -> None:
        """Connect the pod's network namespace to the bridge as eth0 with `address`."""
        assert self.switch is not None
        port = f"p{self._next_port}"
        self._next_port += 1
        switch = ["nsenter", "-t", str(self.switch.pid), "-n"]
        _run(
            [
                *switch,
                "ip",
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                str(pod_pid),
            ]
        )
        _run([*switch, "ip", "link", "set", port, "master", "br0", "up"])
        _run(
            [
                "nsenter",
                "-t",
                str(pod_pid),
                "-n",
                "/bin/sh",
                "-ec",
                "echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad\n"
                "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad\n"
                f"ip -6 addr add {address}/64 dev eth0 nodad\n"
                "ip link set eth0 up",
            ]
        )

    def stop(self) -> None:
        if self.switch is not None:
            self.switch.kill()
            self.switch.wait(10)
            self.switch = None


@dataclass
class Pod:
    """One pod: namespaces that outlive its container, volumes, and the container process.

    `root` is None for a pod that runs a host program (the Beam client): it then sees the
    host's filesystem, except /etc/hosts."""

    name: str
    address: str
    network: Network
    workdir: Path
    chroot: bool = True
    pvc_dirs: tuple[str, ...] = ()
    empty_dirs: tuple[str, ...] = ()
    holder: subprocess.Popen[bytes] | None = None
    container: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"container-{self.restarts}.log"

    def create(self, files: Mapping[str, Mapping[str, str]] | None = None) -> Pod:
        """Make the namespaces and volumes; `files` maps a directory (e.g. /opt/beam-redis)
        to the files a ConfigMap projects into it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        setup = [f"hostname {self.name}", "ip link set lo up"]
        binds: list[str] = []
        if self.chroot:
            root = self.root
            for directory in ("usr", "etc", "dev", "proc", "tmp"):
                (root / directory).mkdir(parents=True, exist_ok=True)
            for link in _ROOT_LINKS:
                host = Path("/") / link
                if host.is_symlink() and not (root / link).is_symlink():
                    (root / link).symlink_to(os.readlink(host))
                elif host.is_dir() and not host.is_symlink():
                    (root / link).mkdir(exist_ok=True)
                    binds.append(link)
            for directory in (*self.pvc_dirs, *self.empty_dirs):
                (root / directory.lstrip("/")).mkdir(parents=True, exist_ok=True)
            for directory, content in (files or {}).items():
                target = root / directory.lstrip("/")
                target.mkdir(parents=True, exist_ok=True)
                for name, text in content.items():
                    (target / name).write_text(text)
            for directory in ("usr", "etc", *binds):
                setup.append(f"mount --bind /{directory} {root}/{directory}")
                setup.append(f"mount -o remount,bind,ro {root}/{directory}")
            setup.append(f"mount --rbind /dev {root}/dev")
            setup.append(f"mount --rbind /proc {root}/proc")
            setup.append(f"mount --bind {self.network.hosts_file} {root}/etc/hosts")
        else:
            setup.append(f"mount --bind {self.network.hosts_file} /etc/hosts")
        self.holder = _holder(
            ["--net", "--uts", "--mount", "--propagation", "private"], "\n".join(setup)
        )
        self.network.plug(self.holder.pid, self.address)
        return self

    def _enter(self) -> list[str]:
        assert self.holder is not None, f"pod {self.name} was not created"
        command = ["nsenter", "-t", str(self.holder.pid), "-n", "-u", "-m", "--"]
        if self.chroot:
            command += ["chroot", str(self.root)]
        return command

    def start(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        stdout: int | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start the container's process (one per pod)."""
        assert self.container is None or self.container.poll() is not None, "still running"
        full_env = {"PATH": _STANDARD_PATH, "HOME": "/tmp", **env}
        if stdout is None:
            log: IO[bytes] | int = self.log_path.open("ab")
        else:
            log = stdout
        try:
            self.container = _popen(
                [*self._enter(), *command],
                env=full_env,
                stdout=log,
                stdin=subprocess.PIPE if stdout is not None else subprocess.DEVNULL,
                cwd=cwd,
            )
        finally:
            if not isinstance(log, int):
                log.close()  # the container keeps its own descriptor
        return self.container

    def exec(
        self, command: Sequence[str], env: Mapping[str, str], timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the pod (a probe, a preStop hook, redis-cli)."""
        return subprocess.run(
            [*self._enter(), *command],
            env={"PATH": _STANDARD_PATH, "HOME": "/tmp", **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def send(self, signum: int) -> None:
        if self.container is not None and self.container.poll() is None:
            self.container.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Stop the container like the kubelet: `signum`, then SIGKILL after `timeout`."""
        if self.container is None:
            return None
        self.send(signum)
        try:
            code = self.container.wait(timeout)
        except subprocess.TimeoutExpired:
            self.container.kill()
            code = self.container.wait(10)
        self.restarts += 1
        return code

    def delete_volumes(self) -> None:
        """What deleting the pod does to its volumes: emptyDirs go, PVCs stay."""
        for directory in self.empty_dirs:
            path = self.root / directory.lstrip("/")
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()

    def log_text(self) -> str:
        return "".join(
            path.read_text(errors="replace")
            for path in sorted(self.workdir.glob("container-*.log"))
        )

    def destroy(self) -> None:
        if self.container is not None and self.container.poll() is None:
            self.container.kill()
            self.container.wait(10)
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(10)
            _close_pipes(self.holder)
            self.holder = None
        if self.container is not None:
            _close_pipes(self.container)


def _close_pipes(process: subprocess.Popen[bytes]) -> None:
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def wait_for(
    what: str, condition: Callable[[], object], timeout: float, interval: float = 0.2
) -> None:
    """Poll `condition()` until truthy; raise with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")

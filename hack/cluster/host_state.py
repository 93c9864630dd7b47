"""What a cluster run could change on the host, captured so that before == after can be asserted.

    python3 hack/cluster/host_state.py snapshot FILE          # write a snapshot (JSON)
    python3 hack/cluster/host_state.py compare BEFORE AFTER   # exit 1 and print what differs

Captured, all from the host's own namespaces (run it outside the cluster's):
- sysctls: every readable file under /proc/sys except counters that move on their own;
- mounts: mount point, filesystem type and source of each entry of /proc/self/mountinfo;
- network: links, addresses and routes (`ip -o ...`), iptables rules of every table in both
  the nft and (when the kernel has it loaded) the legacy backend;
- cgroups: the top level of every hierarchy, and pod/runtime-named ones below it;
- paths the node's components would create on a bare host (/run/containerd, /var/lib/cni, ...);
- processes running one of the node's binaries, and cluster holders (the control plane's
  processes are left out: other test suites run their own at the same time).

Used by hack/cluster/e2e.sh around a whole `make e2e-cluster` and by tests/e2e/test_cluster_host.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Counters and per-moment values that change without anyone configuring anything.
VOLATILE_SYSCTL_PREFIXES = (
    "fs/dentry-state",
    "fs/file-nr",
    "fs/inode-nr",
    "fs/inode-state",
    "fs/quota/",
    "kernel/ns_last_pid",
    "kernel/pty/nr",
    "kernel/random/",
    "kernel/sched_domain/",
    "kernel/tainted",
    "net/netfilter/nf_conntrack_count",
    "vm/stat_refresh",
    "fs/binfmt_misc/",
    "net/ipv4/tcp_mem",
    "net/ipv4/udp_mem",
    "kernel/perf_event_max_sample_rate",
)
WATCHED_PATHS = (
    "/run/containerd",
    "/run/netns",
    "/run/xtables.lock",
    "/var/run/netns",
    "/var/lib/cni",
    "/var/lib/containerd",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/etc/cni",
    "/opt/cni",
    "/etc/kubernetes",
    "/usr/libexec/kubernetes",
)
POD_CGROUP_PREFIXES = ("beam-node", "kubepods", "pod", "k8s.io", "besteffort", "burstable")
NODE_BINARIES = {
    "kubelet",
    "kube-scheduler",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "coredns",
}


def sysctls() -> dict[str, str]:
    values: dict[str, str] = {}
    root = Path("/proc/sys")
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if name.startswith(VOLATILE_SYSCTL_PREFIXES):
            continue
        try:
            if not path.is_file() or not os.access(path, os.R_OK):
                continue
            values[name] = path.read_text().strip()
        except OSError:
            continue
    return values


def mounts() -> list[str]:
    entries = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        entries.append(f"{fields[4]} {fields[separator + 1]} {fields[separator + 2]}")
    return sorted(entries)


def run(*command: str) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return f"<{command[0]} not installed>"
    return result.stdout if result.returncode == 0 else f"<exit {result.returncode}>"


def network() -> dict[str, object]:
    links = sorted(
        line.split("\\")[0].split(":")[1].strip() for line in run("ip", "-o", "link").splitlines()
    )
    state: dict[str, object] = {
        "links": links,
        "addresses": sorted(
            " ".join(line.split()[1:4]) for line in run("ip", "-o", "addr").splitlines()
        ),
        "routes": sorted(run("ip", "route", "show", "table", "all").splitlines()),
    }
    for tool in ("iptables-nft", "ip6tables-nft"):
        for table in ("filter", "nat", "mangle", "raw"):
            state[f"{tool} -t {table}"] = run(tool, "-w", "5", "-t", table, "-S").splitlines()
    # Listing legacy tables loads the legacy module when nothing had: read only what is loaded.
    legacy = Path("/proc/net/ip_tables_names")
    names = legacy.read_text().split() if legacy.exists() else []
    state["legacy tables"] = sorted(names)
    for table in names:
        state[f"iptables-legacy -t {table}"] = run(
            "iptables-legacy", "-w", "5", "-t", table, "-S"
        ).splitlines()
    return state


def cgroups() -> list[str]:
    """Top-level cgroups of every hierarchy (where the node's cgroup root would be), and any
    cgroup down to depth 4 named like a pod's or a runtime's. Deeper cgroups of other
    processes come and go on their own (a job runner's per-command cgroups)."""
    found = []
    root = Path("/sys/fs/cgroup")
    for hierarchy in sorted(root.iterdir()):
        if hierarchy.is_symlink() or not hierarchy.is_dir():
            continue
        for directory, subdirectories, _files in os.walk(hierarchy):
            relative = Path(directory).relative_to(hierarchy)
            depth = len(relative.parts)
            if depth >= 4:
                subdirectories.clear()
            if depth == 1 or (depth > 1 and relative.name.startswith(POD_CGROUP_PREFIXES)):
                found.append(str(Path(directory).relative_to(root)))
    return sorted(found)


def processes() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            exe = os.readlink(proc / "exe")
        except OSError:
            continue
        try:
            holder = b"beam-cluster-holder:" in (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if Path(exe).name in NODE_BINARIES or holder:
            found.append(f"{proc.name} {exe}")
    return sorted(found)


def snapshot() -> dict[str, object]:
    return {
        "sysctls": sysctls(),
        "mounts": mounts(),
        "network": network(),
        "cgroups": cgroups(),
        "paths": sorted(path for path in WATCHED_PATHS if os.path.lexists(path)),
        "processes": processes(),
    }


def differences(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """One line per difference, e.g. `sysctls: net/ipv4/ip_forward: '0' -> '1'`."""
    lines: list[str] = []

    def walk(prefix: str, old: object, new: object) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                walk(f"{prefix}{key}: ", old.get(key, "<absent>"), new.get(key, "<absent>"))
        elif isinstance(old, list) and isinstance(new, list):
            for item in sorted(set(map(str, old)) - set(map(str, new))):
                lines.append(f"{prefix}gone: {item}")
            for item in sorted(set(map(str, new)) - set(map(str, old))):
                lines.append(f"{prefix}new: {item}")
        elif old != new:
            lines.append(f"{prefix}{old!r} -> {new!r}")

    walk("", before, after)
    return lines


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "snapshot":
        Path(sys.argv[2]).write_text(json.dumps(snapshot(), indent=1, sort_keys=True))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        before = json.loads(Path(sys.argv[2]).read_text())
        after = json.loads(Path(sys.argv[3]).read_text())
        found = differences(before, after)
        for line in found:
            print(line)
        return 1 if found else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

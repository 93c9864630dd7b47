#!/usr/bin/env bash
# Stops the cluster hack/cluster/up.sh started in WORKDIR and leaves the host as it was.
#
#   bash hack/cluster/down.sh WORKDIR
#
# Idempotent. Only processes that are provably the cluster's are signalled:
#   1. the node daemons from WORKDIR/node/*.pid (while they still live in the holder's
#      network namespace);
#   2. every process in the pod cgroups under CGROUP_ROOT (the containers), SIGKILL;
#   3. the control plane (hack/controlplane/down.sh, which checks each command line);
#   4. whatever still lives in the holder's mount or network namespace (the containerd
#      shims), and the holder itself; the namespaces, and with them the bridge, the veths,
#      kube-proxy's iptables rules, the pods' mounts and the /run, /var/lib, /var/log bind
#      mounts, disappear with their last process;
#   5. the pod cgroups are removed, deepest first.
# The workdir is kept (logs).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[cluster/down %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

if (($# != 1)); then
    log "usage: $0 WORKDIR"
    exit 2
fi
if [[ ! -d $1 ]]; then
    log "nothing to stop: $1 does not exist"
    exit 0
fi
workdir="$(cd "$1" && pwd)"
node="$workdir/node"
status=0

wait_gone() {
    local pid="$1" tenths=$(($2 * 10)) state
    while ((tenths > 0)); do
        [[ -e /proc/$pid ]] || return 0
        state="$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null || true)"
        [[ $state == Z || -z $state ]] && return 0
        sleep 0.1
        tenths=$((tenths - 1))
    done
    return 1
}

# stop PID SECONDS: SIGTERM, then SIGKILL after SECONDS.
stop() {
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || return 0
    wait_gone "$pid" "$2" && return 0
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 5 || {
        log "ERROR: pid $pid survived SIGKILL"
        status=1
    }
}

holder=""
holder_net="" holder_mnt=""
if [[ -f $workdir/holder.pid ]]; then
    holder="$(cat "$workdir/holder.pid")"
    if [[ $holder =~ ^[0-9]+$ ]] && [[ -r /proc/$holder/cmdline ]] &&
        [[ "$(tr '\0' ' ' <"/proc/$holder/cmdline")" == *"beam-cluster-holder:$workdir"* ]]; then
        holder_net="$(readlink "/proc/$holder/ns/net")"
        holder_mnt="$(readlink "/proc/$holder/ns/mnt")"
    else
        holder=""
    fi
fi

# in_holder_ns PID: the process lives in the holder's network or mount namespace.
in_holder_ns() {
    [[ -n $holder_net ]] || return 1
    local net mnt
    net="$(readlink "/proc/$1/ns/net" 2>/dev/null)" || return 1
    mnt="$(readlink "/proc/$1/ns/mnt" 2>/dev/null)" || return 1
    [[ $net == "$holder_net" || $mnt == "$holder_mnt" ]]
}

# 1. Node daemons (kubelet first, so it does not restart what is being killed).
for name in kubelet kube-proxy kube-scheduler coredns apiserver-proxy; do
    pid_file="$node/$name.pid"
    [[ -f $pid_file ]] || continue
    pid="$(cat "$pid_file")"
    if [[ $pid =~ ^[0-9]+$ ]] && in_holder_ns "$pid"; then
        stop "$pid" 15
        log "stopped $name (pid $pid)"
    fi
    rm -f "$pid_file"
done

# 2. The containers: everything in the pod cgroups.
# up.sh names it after the workdir (so a start that failed half-way is cleaned up too).
cgroup_root="/beam-node-$(printf '%s' "$workdir" | sha256sum | cut -c1-8)"
cgroup_dirs() {
    [[ $cgroup_root == /beam-node-* ]] || return 0
    local hierarchy
    for hierarchy in /sys/fs/cgroup/*/; do
        [[ -L ${hierarchy%/} ]] && continue
        [[ -d $hierarchy${cgroup_root#/} ]] && printf '%s\n' "$hierarchy${cgroup_root#/}"
    done
    return 0
}
for _ in $(seq 20); do
    pids="$(cgroup_dirs | while read -r dir; do find "$dir" -name cgroup.procs -exec cat {} +; done |
        sort -u)"
    [[ -n $pids ]] || break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.5
done

# 3. containerd, then the control plane.
pid_file="$node/containerd.pid"
if [[ -f $pid_file ]]; then
    pid="$(cat "$pid_file")"
    if [[ $pid =~ ^[0-9]+$ ]] && in_holder_ns "$pid"; then
        stop "$pid" 15
        log "stopped containerd (pid $pid)"
    fi
    rm -f "$pid_file"
fi
if [[ -d $workdir/cp ]]; then
    bash "$here/../controlplane/down.sh" "$workdir/cp" || status=1
fi

# 4. Anything left in the namespaces (shims), then the holder.
if [[ -n $holder ]]; then
    for _ in $(seq 10); do
        left=()
        for proc in /proc/[0-9]*; do
            pid="${proc#/proc/}"
            [[ $pid == "$holder" ]] && continue
            in_holder_ns "$pid" && left+=("$pid")
        done
        ((${#left[@]} > 0)) || break
        log "stopping ${#left[@]} leftover process(es) of the cluster: ${left[*]}"
        kill -KILL "${left[@]}" 2>/dev/null || true
        sleep 0.5
    done
    stop "$holder" 10
    log "stopped the holder (pid $holder): the namespaces are gone"
fi
rm -f "$workdir/holder.pid"

# 5. Pod cgroups, deepest first (a cgroup can be removed once it has no process and no child).
for _ in $(seq 20); do
    dirs="$(cgroup_dirs)"
    [[ -n $dirs ]] || break
    while read -r dir; do
        find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done <<<"$dirs"
    sleep 0.2
done
if [[ -n "$(cgroup_dirs)" ]]; then
    log "ERROR: cgroups left under $cgroup_root: $(cgroup_dirs | tr '\n' ' ')"
    status=1
fi
exit "$status"

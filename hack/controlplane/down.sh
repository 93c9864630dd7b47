#!/usr/bin/env bash
# Stops the control plane that up.sh started in WORKDIR.
#
#   bash hack/controlplane/down.sh WORKDIR
#
# Idempotent: a missing workdir, missing pid files or processes that already exited are fine.
# Only the pids recorded in WORKDIR are signalled, and only while their command line still
# names WORKDIR, so a pid reused by an unrelated process after a reboot is never killed.
# Each process gets SIGTERM and BEAM_CONTROLPLANE_STOP_TIMEOUT seconds (default 15) to exit,
# then SIGKILL and 5 more seconds. The controller manager and apiserver stop before etcd so
# the apiserver can shut down cleanly against a live etcd. The workdir itself is kept (logs).
set -euo pipefail

log() { printf '[controlplane/down %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

if (($# != 1)); then
    log "usage: $0 WORKDIR"
    exit 2
fi
if [[ ! -d $1 ]]; then
    log "nothing to stop: $1 does not exist"
    exit 0
fi
workdir="$(cd "$1" && pwd)"
stop_timeout="${BEAM_CONTROLPLANE_STOP_TIMEOUT:-15}"
[[ $stop_timeout =~ ^[1-9][0-9]*$ ]] || stop_timeout=15

# ours PID: the process exists and its command line mentions the workdir.
ours() {
    local pid="$1" cmdline
    [[ -r /proc/$pid/cmdline ]] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ $cmdline == *"$workdir"* ]]
}

# wait_gone PID SECONDS: true once the process is gone (or a zombie), false on timeout.
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

status=0
for name in kube-controller-manager kube-apiserver etcd; do
    pid_file="$workdir/$name.pid"
    [[ -f $pid_file ]] || continue
    pid="$(cat "$pid_file")"
    if [[ ! $pid =~ ^[0-9]+$ ]]; then
        log "ignoring $pid_file: '$pid' is not a pid"
        rm -f "$pid_file"
        continue
    fi
    if ! ours "$pid"; then
        rm -f "$pid_file"
        continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    if wait_gone "$pid" "$stop_timeout"; then
        log "stopped $name (pid $pid)"
    else
        log "$name (pid $pid) ignored SIGTERM for ${stop_timeout}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        if ! wait_gone "$pid" 5; then
            log "ERROR: $name (pid $pid) is still running after SIGKILL"
            status=1
            continue
        fi
    fi
    rm -f "$pid_file"
done
exit "$status"

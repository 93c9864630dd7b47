#!/usr/bin/env bash
# `make e2e-cluster`: builds what is missing (cached), starts the one-node cluster with the
# local images, runs tests/e2e/test_cluster.py inside the cluster's network namespace, stops
# the cluster, runs tests/e2e/test_cluster_host.py (a second small cluster, the host compared
# before, during and after), and fails unless the host is exactly as it was before the whole
# run (host_state.py).
#
#   bash hack/cluster/e2e.sh [PYTEST_ARGS...]
#
# BEAM_E2E_CLUSTER_DIR picks the work directory (default: a fresh one under /tmp, removed on
# success, kept with its logs on failure). Needs root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

log() { printf '[cluster/e2e %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

[[ $(id -u) == 0 ]] || die "needs root (namespaces, mounts, cgroups, mmdebstrap)"
workdir="${BEAM_E2E_CLUSTER_DIR:-$(mktemp -d /tmp/beam-e2e-cluster.XXXXXX)}"
mkdir -p "$workdir"
python="$root/.venv/bin/python"
[[ -x $python ]] || die "no $python: run make test (or make dev) first"

# Debian packages the builds and the node need (.ci/run installs them).
missing=()
for package in containernetworking-plugins iptables mmdebstrap buildah libseccomp-dev pkg-config; do
    dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
        missing+=("$package")
done
((${#missing[@]} == 0)) ||
    die "missing packages: apt-get install --no-install-recommends ${missing[*]}"
command -v go >/dev/null || [[ -x /usr/local/go/bin/go ]] || [[ -n ${GO:-} ]] ||
    die "no Go toolchain (1.26) on PATH: the node and control plane are built from source"

started=$SECONDS
python3 "$here/host_state.py" snapshot "$workdir/host-before.json"

step_started=$SECONDS
cp_bin="$(bash "$root/hack/controlplane/build.sh")" || die "control plane build failed"
node_bin="$(bash "$here/build.sh")" || die "node build failed"
mapfile -t images < <(bash "$root/hack/images/build.sh") || die "image build failed"
((${#images[@]} > 0)) || die "hack/images/build.sh printed no image archive"
build_seconds=$((SECONDS - step_started))
log "binaries and images ready in ${build_seconds}s"

status=0
# An interrupted run still stops its cluster (down.sh is idempotent).
trap 'bash "$here/down.sh" "$workdir" >&2 || true; exit 130' INT TERM
step_started=$SECONDS
if BEAM_CONTROLPLANE_BIN_DIR="$cp_bin" BEAM_NODE_BIN_DIR="$node_bin" \
    bash "$here/up.sh" "$workdir" "${images[@]}"; then
    up_seconds=$((SECONDS - step_started))
    holder="$(sed -n 's/^HOLDER_PID=//p' "$workdir/cluster.env")"
    step_started=$SECONDS
    # The test runs in the cluster's network namespace (ClusterIPs and the API server on its
    # loopback), not its mount namespace: it sees the host's files.
    nsenter --target "$holder" --net -- \
        env BEAM_E2E_CLUSTER_DIR="$workdir" "$python" -m pytest -p no:cacheprovider \
        "$root/tests/e2e/test_cluster.py" -v -rP "$@" || status=$?
    test_seconds=$((SECONDS - step_started))
else
    status=1
    up_seconds=$((SECONDS - step_started))
    test_seconds=0
fi
step_started=$SECONDS
bash "$here/down.sh" "$workdir" || status=1
down_seconds=$((SECONDS - step_started))

# A second, small cluster: a pod behind a Service, and the host compared before, during and
# after (tests/e2e/test_cluster_host.py).
step_started=$SECONDS
pause_and_redis="$(printf '%s\n' "${images[@]}" | grep -E '/(pause|redis)\.oci\.tar$' | tr '\n' ' ')"
BEAM_CONTROLPLANE_BIN_DIR="$cp_bin" BEAM_NODE_BIN_DIR="$node_bin" \
    BEAM_CLUSTER_IMAGES="$pause_and_redis" "$python" -m pytest -p no:cacheprovider \
    "$root/tests/e2e/test_cluster_host.py" -v --basetemp "$workdir/host-test" || status=1
host_test_seconds=$((SECONDS - step_started))

python3 "$here/host_state.py" snapshot "$workdir/host-after.json"
if ! python3 "$here/host_state.py" compare "$workdir/host-before.json" \
    "$workdir/host-after.json" >"$workdir/host-diff.txt"; then
    log "ERROR: the host changed:"
    cat "$workdir/host-diff.txt" >&2
    status=1
else
    log "host unchanged (sysctls, mounts, links, routes, iptables, cgroups, paths, processes)"
fi
log "timings: build ${build_seconds}s, up ${up_seconds}s, scenario ${test_seconds}s," \
    "down ${down_seconds}s, host test ${host_test_seconds}s, total $((SECONDS - started))s"
if ((status == 0)) && [[ -z ${BEAM_E2E_CLUSTER_DIR:-} ]]; then
    rm -rf "$workdir"
else
    log "work directory kept: $workdir"
fi
exit "$status"

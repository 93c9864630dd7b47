#!/usr/bin/env bash
# Starts a one-node Kubernetes cluster that runs real pods, with no Docker engine and no image
# registry, and without changing the host: everything (control plane, containerd, kubelet,
# kube-scheduler, kube-proxy, CoreDNS, the pods) lives in a private network + mount namespace.
#
#   bash hack/cluster/up.sh WORKDIR [IMAGE.oci.tar ...]
#
# Needs root, the binaries of hack/controlplane/build.sh and hack/cluster/build.sh, and Debian's
# containernetworking-plugins and iptables. The image archives (hack/images/build.sh) are
# imported into containerd before the node registers. Writes WORKDIR/cluster.env:
#   KUBECONFIG, HOLDER_PID (enter the cluster's network with `nsenter --target $HOLDER_PID
#   --net`), CGROUP_ROOT, the bin dirs.
#
# How the host is left alone (each point is a change kubelet/containerd/kube-proxy would
# otherwise make on a bare host):
# - A holder process (`unshare --mount --net`) owns the namespaces; every daemon is started in
#   them with nsenter. Links (the bridge beam0, the pods' veths), routes, iptables rules
#   (kube-proxy's KUBE-* chains) and per-network sysctls (ip_forward, route_localnet) are the
#   namespace's own and vanish with it.
# - In the private mount namespace /run, /var/lib and /var/log are bind mounts of directories
#   in WORKDIR: hard-coded paths (/run/containerd/s shim sockets, /var/lib/cni caches,
#   /var/log/containers symlinks) land there, and every pod mount (overlay roots, tmpfs
#   volumes, netns pins) stays in that namespace.
# - kubelet checks vm.overcommit_memory, vm.panic_on_oom, kernel.panic, kernel.panic_on_oops and
#   kernel.keys.root_max{keys,bytes} and rewrites them unless protectKernelDefaults; here they
#   are regular files bind-mounted over /proc/sys/... with the values it wants, and
#   protectKernelDefaults is on, so kubelet can only read them.
# - The machine lacks CAP_SYS_RESOURCE: containerd restrict_oom_score_adj, kubelet oomScoreAdj 0.
# - Pod cgroups live under CGROUP_ROOT (/beam-node-<id>) in every v1 hierarchy; down.sh
#   kills what is in them and removes them.
# - kube-proxy leaves the (global) conntrack sysctls alone (maxPerCore 0, timeouts 0);
#   makeIPTablesUtilChains is off for kubelet.
#
# Pods reach the API server: kube-apiserver listens on the namespace's 127.0.0.1 (up.sh), a
# forwarder (tcp_proxy.py) listens on the bridge address 10.244.0.1:6443, and the `kubernetes`
# Service's EndpointSlice points there. CoreDNS runs as a process on 10.244.0.1:53 and kubelet
# gives pods that nameserver.
#
# On any failure what was started is stopped (down.sh) and the log tails are printed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[cluster/up %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

readonly bridge=beam0 node_ip=10.244.0.1 pod_subnet=10.244.0.0/24 service_subnet=10.96.0.0/16
readonly apiserver_proxy_port=6443 kubelet_port=10250

(($# >= 1)) || die "usage: $0 WORKDIR [IMAGE.oci.tar ...]"
[[ $(id -u) == 0 ]] || die "needs root (namespaces, mounts, cgroups)"
mkdir -p "$1"
workdir="$(cd "$1" && pwd)"
shift
images=("$@")
timeout_seconds="${BEAM_CLUSTER_START_TIMEOUT:-180}"
deadline=$((SECONDS + timeout_seconds))

if [[ -f $workdir/holder.pid ]] && kill -0 "$(cat "$workdir/holder.pid")" 2>/dev/null; then
    die "a cluster is already running from $workdir; run down.sh first"
fi
for tool in unshare nsenter ip openssl python3 iptables; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
cni_dir=/usr/lib/cni
for plugin in bridge host-local loopback; do
    [[ -x $cni_dir/$plugin ]] || die "missing $cni_dir/$plugin: apt-get install containernetworking-plugins"
done

cp_bin="${BEAM_CONTROLPLANE_BIN_DIR:-$(bash "$here/../controlplane/build.sh")}" ||
    die "hack/controlplane/build.sh failed"
node_bin="${BEAM_NODE_BIN_DIR:-$(bash "$here/build.sh")}" || die "hack/cluster/build.sh failed"
node_name="$(hostname)"
# kube-apiserver reaches the kubelet by the node's Hostname address first: it must resolve to
# 127.0.0.1 (the namespace's loopback, where kubelet listens), as it does on Debian.
getent hosts "$node_name" | grep -q '^127\.' ||
    die "the hostname '$node_name' does not resolve to a 127.x address (add it to /etc/hosts)"
cgroup_id="$(printf '%s' "$workdir" | sha256sum | cut -c1-8)"
cgroup_root="/beam-node-$cgroup_id"

rm -rf "$workdir/node" "$workdir/cp"
node="$workdir/node"
mkdir -p "$node"/{run,var-lib,var-log,sysctl,cni/net.d,cni/ipam,pki,logs}

# ---------------------------------------------------------------------------------------------
cleanup_on_failure() {
    local status=$?
    if ((status != 0)); then
        local file
        for file in "$node"/logs/*.log "$workdir"/cp/*.log; do
            [[ -f $file ]] || continue
            log "last lines of $file:"
            tail -n 15 "$file" >&2 || true
        done
        bash "$here/down.sh" "$workdir" || true
    fi
    exit "$status"
}
trap cleanup_on_failure EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The holder: owns the network and mount namespaces; its command line names the workdir so
# down.sh can recognise it. `unshare` execs python, so $! is the holder itself.
unshare --mount --net --propagation private -- \
    python3 -c 'import signal; signal.pause()' "beam-cluster-holder:$workdir" \
    </dev/null >/dev/null 2>&1 &
holder=$!
printf '%s\n' "$holder" >"$workdir/holder.pid"
for _ in $(seq 50); do
    [[ $(readlink "/proc/$holder/ns/net") != "$(readlink /proc/self/ns/net)" ]] && break
    sleep 0.1
done
[[ $(readlink "/proc/$holder/ns/net") != "$(readlink /proc/self/ns/net)" ]] ||
    die "the holder did not get its own network namespace"
log "holder pid $holder (private network + mount namespace)"

# in_ns COMMAND...: runs COMMAND inside the cluster's namespaces.
in_ns() { nsenter --target "$holder" --mount --net -- "$@"; }

# The namespace's own view: network, hidden host directories, kernel tunables.
cat >"$node/sysctl.sh" <<EOF
set -eu
ip link set lo up
ip link add $bridge type bridge
ip addr add $node_ip/24 dev $bridge
ip link set $bridge up
# The namespace's own side reaches ClusterIPs (kube-proxy's OUTPUT rules) through the bridge.
ip route add $service_subnet dev $bridge
mount --bind "$node/run" /run
mount --bind "$node/var-lib" /var/lib
mount --bind "$node/var-log" /var/log
for tunable in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
        kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
    path="\${tunable%=*}"
    file="$node/sysctl/\$(printf '%s' "\$path" | tr / .)"
    printf '%s\n' "\${tunable#*=}" >"\$file"
    mount --bind "\$file" "/proc/sys/\$path"
done
EOF
in_ns bash "$node/sysctl.sh" || die "could not set up the namespace"

# start NAME COMMAND...: a daemon inside the namespaces, with its own log and pid file.
# nsenter and env exec, so $! is the daemon.
start() {
    local name="$1"
    shift
    nsenter --target "$holder" --mount --net -- env PATH="$node_bin:$cp_bin:$PATH" "$@" \
        </dev/null >"$node/logs/$name.log" 2>&1 &
    printf '%s\n' "$!" >"$node/$name.pid"
    log "started $name (pid $!)"
}

# wait_for DESCRIPTION COMMAND...: polls COMMAND until it succeeds, a daemon started so far
# exits, or the overall deadline passes.
wait_for() {
    local description="$1" pid_file
    shift
    while ((SECONDS < deadline)); do
        if "$@" >/dev/null 2>&1; then
            log "ready: $description"
            return 0
        fi
        for pid_file in "$node"/*.pid; do
            [[ -f $pid_file ]] || continue
            kill -0 "$(cat "$pid_file")" 2>/dev/null ||
                die "$(basename "$pid_file" .pid) exited (see $node/logs)"
        done
        sleep 0.5
    done
    die "timed out after ${timeout_seconds}s waiting for $description"
}

# ---------------------------------------------------------------------------------------------
# Control plane, inside the namespace (127.0.0.1 there).
BEAM_CONTROLPLANE_BIN_DIR="$cp_bin" in_ns bash "$here/../controlplane/up.sh" "$workdir/cp" ||
    die "the control plane did not start"
# shellcheck disable=SC1091
source "$workdir/cp/controlplane.env"
kubectl=("$cp_bin/kubectl" --kubeconfig "$workdir/cp/kubeconfig" --request-timeout 20s)
k() { in_ns "${kubectl[@]}" "$@"; }

# Certificates for the node's components, signed by the control plane's CA.
pki="$workdir/cp/pki"
sign() {
    local name="$1" subject="$2"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$node/pki/$name.key" 2>/dev/null
    openssl req -new -key "$node/pki/$name.key" -subj "$subject" -out "$node/pki/$name.csr" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' \
        >"$node/pki/$name.ext"
    openssl x509 -req -in "$node/pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
        -CAcreateserial -days 30 -sha256 -extfile "$node/pki/$name.ext" \
        -out "$node/pki/$name.crt" 2>/dev/null || die "openssl could not sign $name"
    rm -f "$node/pki/$name.csr" "$node/pki/$name.ext"
    chmod 600 "$node/pki/$name.key"
    cat >"$node/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: beam-test
  cluster:
    server: $SERVER
    certificate-authority: $pki/ca.crt
users:
- name: $name
  user:
    client-certificate: $node/pki/$name.crt
    client-key: $node/pki/$name.key
contexts:
- name: beam-test
  context: {cluster: beam-test, user: $name}
current-context: beam-test
EOF
}
sign kubelet "/O=system:nodes/CN=system:node:$node_name"
sign kube-scheduler "/CN=system:kube-scheduler"
sign kube-proxy "/CN=system:kube-proxy"

# ---------------------------------------------------------------------------------------------
# Pods reach the API server at https://10.96.0.1:443 -> 10.244.0.1:6443 -> 127.0.0.1:<port>.
start apiserver-proxy python3 "$here/tcp_proxy.py" "$node_ip" "$apiserver_proxy_port" \
    127.0.0.1 "$APISERVER_PORT"
wait_for "the API server forwarder on $node_ip:$apiserver_proxy_port" \
    in_ns bash -c ": </dev/tcp/$node_ip/$apiserver_proxy_port"
k apply -f - >/dev/null <<EOF || die "could not publish the kubernetes Service's endpoints"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
    endpointslice.kubernetes.io/managed-by: beam-hack-cluster
addressType: IPv4
endpoints:
- addresses: [$node_ip]
  conditions: {ready: true}
ports:
- name: https
  port: $apiserver_proxy_port
  protocol: TCP
EOF

# ---------------------------------------------------------------------------------------------
# containerd: every path under the workdir; pods' sandbox image is the local pause image.
cat >"$node/containerd.toml" <<EOF
version = 3
# Inside the mount namespace /run, /var/lib and /var/log are bind mounts of $node/run,
# $node/var-lib and $node/var-log: the usual paths, under the workdir, and short (a unix socket
# path has at most 104 bytes; a workdir under pytest's tmp_path is already longer).
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[ttrpc]
  address = "/run/containerd/containerd.sock.ttrpc"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = 'localhost/pause:1'
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '$node_bin/runc'
        Root = '/run/containerd/runc'
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['$cni_dir']
    conf_dir = '$node/cni/net.d'
    max_conf_num = 1
EOF
# isGateway: the bridge is the pods' default gateway (ClusterIPs are DNATed on the way through
# the namespace). ip_forward is the namespace's own. No masquerade, no portmap.
cat >"$node/cni/net.d/10-beam.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "beam",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$node/cni/ipam",
        "ranges": [[{"subnet": "$pod_subnet", "gateway": "$node_ip", "rangeStart": "10.244.0.10"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
start containerd containerd --config "$node/containerd.toml"
ctr=("$node_bin/ctr" --address /run/containerd/containerd.sock --namespace k8s.io)
wait_for "containerd" in_ns "${ctr[@]}" version
for archive in "${images[@]}"; do
    [[ -f $archive ]] || die "no image archive $archive"
    in_ns "${ctr[@]}" images import --local "$archive" >&2 || die "ctr could not import $archive"
done
((${#images[@]} == 0)) || log "imported ${#images[@]} image archives"

# ---------------------------------------------------------------------------------------------
# Pod cgroups: kubelet wants its cgroup root to exist in every hierarchy.
for hierarchy in /sys/fs/cgroup/*/; do
    [[ -L ${hierarchy%/} ]] && continue
    mkdir -p "$hierarchy${cgroup_root#/}"
    if [[ -f ${hierarchy}cpuset.cpus ]]; then
        cat "${hierarchy}cpuset.cpus" >"$hierarchy${cgroup_root#/}/cpuset.cpus"
        cat "${hierarchy}cpuset.mems" >"$hierarchy${cgroup_root#/}/cpuset.mems"
    fi
done

printf 'nameserver %s\nsearch cluster.local\noptions ndots:5\n' "$node_ip" >"$node/resolv.conf"
cat >"$node/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# up.sh gives kube-apiserver no kubelet client certificate, so exec/logs/port-forward arrive
# anonymous; acceptable only because kubelet listens on the namespace's loopback.
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: $cgroup_root
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
protectKernelDefaults: true
makeIPTablesUtilChains: false
clusterDNS: [$node_ip]
clusterDomain: cluster.local
resolvConf: $node/resolv.conf
podLogsDir: /var/log/pods
volumePluginDir: /var/lib/kubelet/volume-plugins
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
serializeImagePulls: false
maxPods: 60
EOF
start kubelet kubelet --config "$node/kubelet.yaml" --kubeconfig "$node/kubelet.kubeconfig" \
    --root-dir /var/lib/kubelet --cert-dir /var/lib/kubelet/pki --node-ip "$node_ip" \
    --hostname-override "$node_name" --v 1
start kube-scheduler kube-scheduler --kubeconfig "$node/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$node/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$node/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false
cat >"$node/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $node/kube-proxy.kubeconfig}
hostnameOverride: $node_name
mode: iptables
clusterCIDR: $pod_subnet
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# 0 leaves the host's (global) nf_conntrack sysctls as they are.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
iptables:
  localhostNodePorts: false
EOF
start kube-proxy kube-proxy --config "$node/kube-proxy.yaml"
cat >"$node/Corefile" <<EOF
.:53 {
    bind $node_ip
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $workdir/cp/kubeconfig beam-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
}
EOF
start coredns coredns -conf "$node/Corefile"

wait_for "node $node_name Ready" \
    k wait --for=condition=Ready "node/$node_name" --timeout 5s
wait_for "the default ServiceAccount" k get serviceaccount default

cat >"$workdir/cluster.env" <<EOF
KUBECONFIG=$workdir/cp/kubeconfig
HOLDER_PID=$holder
NODE_NAME=$node_name
CGROUP_ROOT=$cgroup_root
CONTROLPLANE_BIN_DIR=$cp_bin
NODE_BIN_DIR=$node_bin
# containerd's socket, inside the cluster's mount namespace (nsenter --mount --net)
CONTAINERD_ADDRESS=/run/containerd/containerd.sock
SERVER=$SERVER
EOF
trap - EXIT INT TERM
log "cluster up in ${SECONDS}s: KUBECONFIG=$workdir/cp/kubeconfig; enter it with nsenter --target $holder --net"

#!/usr/bin/env bash
# Starts a real Kubernetes control plane for tests: etcd, kube-apiserver and
# kube-controller-manager, on 127.0.0.1 only, with everything under WORKDIR.
#
#   bash hack/controlplane/up.sh WORKDIR
#
# Writes into WORKDIR:
#   kubeconfig              admin (client certificate in group system:masters)
#   controlplane.env        KEY=VALUE lines: ports, server URL, bin dir, kubeconfig path
#   pki/                    CA, serving and client certificates, service-account key pair
#   *.pid, *.log            one per process; down.sh reads the pid files
#   etcd-data/
#
# What is real and what is not:
# - Authentication is X.509 client certificates plus ServiceAccount tokens (TokenRequest works:
#   `kubectl create token` mints tokens signed by pki/sa.key); authorization is Node,RBAC.
# - There are no nodes, no kubelet, no scheduler and no network plugin: pods stay Pending.
#   Controllers that need nodes run idle. Garbage collection, namespace deletion, service
#   accounts and the kube-root-ca.crt publisher work.
# - Ports are picked at random below the kernel's ephemeral range (so outgoing connections
#   cannot be holding them) and checked free just before use; there is still a small window in
#   which another process can take one, which shows up as a clear bind error in the logs.
#
# Every wait is bounded by BEAM_CONTROLPLANE_START_TIMEOUT seconds (default 90) in total.
# On failure the processes already started are stopped, the log tails are printed, and the
# script exits non-zero.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '[controlplane/up %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

(($# == 1)) || die "usage: $0 WORKDIR"
mkdir -p "$1"
workdir="$(cd "$1" && pwd)"
timeout_seconds="${BEAM_CONTROLPLANE_START_TIMEOUT:-90}"
[[ $timeout_seconds =~ ^[1-9][0-9]*$ ]] ||
    die "BEAM_CONTROLPLANE_START_TIMEOUT='$timeout_seconds' is not a positive integer"
deadline=$((SECONDS + timeout_seconds))

for name in etcd kube-apiserver kube-controller-manager; do
    if [[ -f $workdir/$name.pid ]] && kill -0 "$(cat "$workdir/$name.pid")" 2>/dev/null; then
        die "$name is already running from $workdir (pid $(cat "$workdir/$name.pid")); run down.sh first"
    fi
done

command -v openssl >/dev/null || die "openssl is required"
command -v python3 >/dev/null || die "python3 is required (free-port picking)"

if [[ -n ${BEAM_CONTROLPLANE_BIN_DIR:-} ]]; then
    bin_dir="$BEAM_CONTROLPLANE_BIN_DIR"
else
    bin_dir="$(bash "$here/build.sh")" || die "build.sh failed"
fi
for name in etcd kube-apiserver kube-controller-manager kubectl; do
    [[ -x $bin_dir/$name ]] || die "missing $bin_dir/$name (run hack/controlplane/build.sh)"
done
kubectl="$bin_dir/kubectl"

# ---------------------------------------------------------------------------------------------
# Ports: four distinct free TCP ports on 127.0.0.1.
ports="$(
    python3 - <<'EOF'
import random
import socket

low, high = 20000, 32000  # below Linux's default ephemeral range (32768-60999)
held: list[socket.socket] = []
ports: list[int] = []
for _attempt in range(500):
    if len(ports) == 4:
        break
    port = random.randrange(low, high)
    if port in ports:
        continue
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        continue
    held.append(sock)
    ports.append(port)
if len(ports) != 4:
    raise SystemExit("no four free ports found in 500 attempts")
print(*ports)
EOF
)" || die "could not pick free ports"
read -r etcd_client_port etcd_peer_port apiserver_port controller_manager_port <<<"$ports"
server="https://127.0.0.1:$apiserver_port"

# ---------------------------------------------------------------------------------------------
# Certificates: a throwaway CA, the apiserver serving certificate, client certificates for the
# admin user (group system:masters) and kube-controller-manager, the front-proxy CA and client
# of the aggregation layer, and the service-account key pair. ECDSA P-256 keys are quick to
# make; the service-account key is RSA, like kubeadm's.
pki="$workdir/pki"
rm -rf "$pki"
mkdir -p "$pki"
chmod 700 "$pki"

openssl_quiet() {
    local output
    output="$(openssl "$@" 2>&1)" || die "openssl $1 failed: $output"
}

new_key() { openssl_quiet genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

# new_ca NAME: a self-signed CA certificate pki/NAME.crt with key pki/NAME.key.
new_ca() {
    new_key "$pki/$1.key"
    openssl_quiet req -x509 -new -key "$pki/$1.key" -subj "/CN=beam-test-$1" -days 30 \
        -sha256 -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out "$pki/$1.crt"
}

# sign NAME SUBJECT EXTENSIONS [CA]: a certificate for pki/NAME.key signed by pki/CA (ca).
sign() {
    local name="$1" subject="$2" extensions="$3" ca="${4:-ca}"
    new_key "$pki/$name.key"
    openssl_quiet req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr"
    printf '%s\n' "$extensions" >"$pki/$name.ext"
    openssl_quiet x509 -req -in "$pki/$name.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" \
        -CAcreateserial -days 30 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt"
    rm -f "$pki/$name.csr" "$pki/$name.ext"
}

new_ca ca
# The aggregation layer's own CA and client: the apiserver publishes the front-proxy CA in
# kube-system/extension-apiserver-authentication, which kube-controller-manager (and any
# aggregated API server) reads; without it the controller manager logs errors forever.
new_ca front-proxy-ca
client_extensions="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
sign apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1"
sign admin "/O=system:masters/CN=beam-admin" "$client_extensions"
sign controller-manager "/CN=system:kube-controller-manager" "$client_extensions"
sign front-proxy-client "/CN=front-proxy-client" "$client_extensions" front-proxy-ca
openssl_quiet genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key"
openssl_quiet pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
chmod 600 "$pki"/*.key

# write_kubeconfig PATH USER: a kubeconfig with the CA and USER's client certificate inlined.
write_kubeconfig() {
    local path="$1" user="$2"
    cat >"$path" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: beam-test
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$pki/$user.crt")
    client-key-data: $(base64 -w0 "$pki/$user.key")
contexts:
- name: beam-test
  context:
    cluster: beam-test
    user: $user
current-context: beam-test
EOF
    chmod 600 "$path"
}
write_kubeconfig "$workdir/kubeconfig" admin
write_kubeconfig "$workdir/controller-manager.kubeconfig" controller-manager

# ---------------------------------------------------------------------------------------------
# Processes. From here on, any failure or interruption stops what was started.
fail() {
    log "ERROR: $*"
    local name
    for name in etcd kube-apiserver kube-controller-manager; do
        if [[ -f $workdir/$name.log ]]; then
            log "last lines of $workdir/$name.log:"
            tail -n 25 "$workdir/$name.log" >&2 || true
        fi
    done
    exit 1
}
cleanup_on_failure() {
    local status=$?
    if ((status != 0)); then
        bash "$here/down.sh" "$workdir" || true
    fi
    exit "$status"
}
trap cleanup_on_failure EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME ARGS...: runs bin_dir/NAME in the background with its own log and pid file.
# Standard input is closed and output goes to the log so callers that capture this script's
# output (subprocess.run) do not wait on the daemons.
start() {
    local name="$1"
    shift
    "$bin_dir/$name" "$@" </dev/null >"$workdir/$name.log" 2>&1 &
    printf '%s\n' "$!" >"$workdir/$name.pid"
    log "started $name (pid $!)"
}

# wait_for DESCRIPTION PROCESS COMMAND...: polls COMMAND until it succeeds, PROCESS dies, or
# the overall deadline passes.
wait_for() {
    local description="$1" process="$2"
    shift 2
    while ((SECONDS < deadline)); do
        if "$@" >/dev/null 2>&1; then
            log "ready: $description"
            return 0
        fi
        kill -0 "$(cat "$workdir/$process.pid")" 2>/dev/null || fail "$process exited"
        sleep 0.5
    done
    fail "timed out after ${timeout_seconds}s waiting for $description"
}

rm -rf "$workdir/etcd-data"
# --unsafe-no-fsync: test data is disposable, and fsync dominates etcd latency on shared disks.
start etcd \
    --name beam-test \
    --data-dir "$workdir/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_client_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_client_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "beam-test=http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster-state new \
    --unsafe-no-fsync \
    --log-level warn
# etcd's /health needs curl; a TCP connect to the client port is enough before the apiserver,
# which retries etcd itself and is only reported ready once its storage works.
wait_for "etcd on 127.0.0.1:$etcd_client_port" etcd \
    bash -c ": </dev/tcp/127.0.0.1/$etcd_client_port"

# --endpoint-reconciler-type=none: Endpoints may not hold loopback addresses, so the reconciler
# would fail forever writing 127.0.0.1 into default/kubernetes.
start kube-apiserver \
    --etcd-servers "http://127.0.0.1:$etcd_client_port" \
    --bind-address 127.0.0.1 \
    --advertise-address 127.0.0.1 \
    --secure-port "$apiserver_port" \
    --tls-cert-file "$pki/apiserver.crt" \
    --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --endpoint-reconciler-type none \
    --requestheader-client-ca-file "$pki/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User \
    --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$pki/front-proxy-client.crt" \
    --proxy-client-key-file "$pki/front-proxy-client.key" \
    --profiling=false
wait_for "kube-apiserver /readyz on $server" kube-apiserver \
    "$kubectl" --kubeconfig "$workdir/kubeconfig" --request-timeout 5s get --raw /readyz

start kube-controller-manager \
    --kubeconfig "$workdir/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$workdir/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$workdir/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 \
    --secure-port "$controller_manager_port" \
    --leader-elect=false \
    --use-service-account-credentials \
    --service-account-private-key-file "$pki/sa.key" \
    --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" \
    --cluster-signing-key-file "$pki/ca.key" \
    --controllers '*' \
    --profiling=false
wait_for "the default ServiceAccount (created by kube-controller-manager)" \
    kube-controller-manager \
    "$kubectl" --kubeconfig "$workdir/kubeconfig" --request-timeout 5s \
    get serviceaccount default --namespace default

cat >"$workdir/controlplane.env" <<EOF
KUBECONFIG=$workdir/kubeconfig
SERVER=$server
BIN_DIR=$bin_dir
ETCD_CLIENT_PORT=$etcd_client_port
ETCD_PEER_PORT=$etcd_peer_port
APISERVER_PORT=$apiserver_port
CONTROLLER_MANAGER_PORT=$controller_manager_port
EOF
trap - EXIT INT TERM
log "control plane up at $server in ${SECONDS}s; KUBECONFIG=$workdir/kubeconfig"

#!/usr/bin/env bash
# Builds the node of Beam's one-node test cluster from source, through the Go module proxy:
# kubelet, kube-scheduler and kube-proxy (the control plane's Kubernetes release), containerd +
# its runc shim + ctr, runc, and CoreDNS, at the versions pinned in versions.env and
# ../controlplane/versions.env.
#
# Output: the binaries land in
#   ${BEAM_CACHE_DIR:-$HOME/.cache/beam}/node/<k8s>-containerd<v>-runc<v>-coredns<v>/bin
# and that directory is the only thing printed on stdout (progress goes to stderr). A warm
# cache (every binary plus the stamp file) returns at once without touching Go. The layout,
# stamp, lock and Go caches are the control plane's (hack/controlplane/build.sh): the Go module
# and build caches are shared with it, so kubelet & co. compile only the ~150 packages the
# control plane's binaries do not already have.
#
# The dangerous parts:
# - kubelet/kube-scheduler/kube-proxy are built in a wrapper module written exactly like
#   hack/controlplane/build.sh's (same requires, replaces, go and godebug lines, same flags), so
#   they resolve the same dependency versions as kube-apiserver and hit the same build cache.
# - runc needs cgo (libcontainer/nsenter is C) and libseccomp (pods ask for RuntimeDefault
#   seccomp); everything else is CGO_ENABLED=0. runc's `libpathrs` tag needs a Rust library and
#   is left out (runc then uses its pure-Go path resolution).
# - Everything runs from main(), which bash parses whole before running.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly binaries=(kubelet kube-scheduler kube-proxy containerd containerd-shim-runc-v2 ctr runc
    coredns)

log() { printf '[cluster/build %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

load_versions() {
    # shellcheck source=../controlplane/versions.env
    source "$here/../controlplane/versions.env"
    # shellcheck source=versions.env
    source "$here/versions.env"
    [[ ${KUBERNETES_VERSION:-} =~ ^v1\.[0-9]+\.[0-9]+$ ]] ||
        die "KUBERNETES_VERSION='${KUBERNETES_VERSION:-}' is not v1.MINOR.PATCH"
    local name
    for name in CONTAINERD_VERSION RUNC_VERSION COREDNS_VERSION; do
        [[ ${!name:-} =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]] ||
            die "versions.env: $name='${!name:-}' is not vMAJOR.MINOR.PATCH"
    done
    cache_dir="${BEAM_CACHE_DIR:-$HOME/.cache/beam}"
    go_cache_root="$cache_dir/controlplane/go"
    cache_root="$cache_dir/node"
    dest="$cache_root/${KUBERNETES_VERSION}-containerd${CONTAINERD_VERSION#v}-runc${RUNC_VERSION#v}-coredns${COREDNS_VERSION#v}"
    bin_dir="$dest/bin"
    stamp="$dest/stamp"
    stamp_line="kubernetes=$KUBERNETES_VERSION containerd=$CONTAINERD_VERSION runc=$RUNC_VERSION coredns=$COREDNS_VERSION"
}

is_warm() {
    [[ -f $stamp ]] && [[ "$(head -n 1 "$stamp")" == "$stamp_line" ]] || return 1
    local name
    for name in "${binaries[@]}"; do
        [[ -x $bin_dir/$name ]] || return 1
    done
}

setup_go() {
    go_bin="${GO:-$(command -v go || true)}"
    [[ -n $go_bin ]] || go_bin=/usr/local/go/bin/go
    [[ -x $go_bin ]] || die "no Go toolchain: set GO=/path/to/go or put go on PATH"
    export GOMODCACHE="$go_cache_root/mod"
    export GOCACHE="$go_cache_root/build"
    export GOFLAGS="-mod=mod -modcacherw -buildvcs=false"
    export GOWORK=off
    export CGO_ENABLED=0
    export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
    jobs="${BEAM_GO_BUILD_JOBS:-2}"
    [[ $jobs =~ ^[1-9][0-9]*$ ]] || die "BEAM_GO_BUILD_JOBS='$jobs' is not a positive integer"
}

timed() {
    local name="$1" started=$SECONDS
    shift
    log "start: $name"
    "$@" || die "step failed: $name (exit $?)"
    local took=$((SECONDS - started))
    timings+=("$name=${took}s")
    log "done:  $name (${took}s)"
}

mod_field() {
    local json
    json="$(cd "$work" && "$go_bin" mod download -json "$1")" || die "go mod download $1 failed"
    sed -n "s/^[[:space:]]*\"$2\": \"\(.*\)\",\{0,1\}$/\1/p" <<<"$json"
}

mod_time() {
    local info
    info="$(mod_field "$1" Info)"
    sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info"
}

# write_wrapper DIR GOMOD_OF_RELEASE REQUIRE_LINE [REPLACE_LINE...]: as in controlplane/build.sh
# (module path included: it is part of nothing the compiler caches, but keep them alike).
write_wrapper() {
    local dir="$1" release_gomod="$2" require="$3"
    shift 3
    mkdir -p "$dir"
    {
        printf 'module beam.invalid/controlplane/%s\n\n' "$(basename "$dir")"
        awk '$1 == "go" { print; exit }' "$release_gomod"
        awk '$1 == "godebug" { print; if ($2 == "(") inblock = 1; next }
             inblock { print; if ($1 == ")") inblock = 0 }' "$release_gomod"
        printf '\nrequire %s\n' "$require"
        if (($# > 0)); then
            printf '\nreplace (\n'
            printf '\t%s\n' "$@"
            printf ')\n'
        fi
    } >"$dir/go.mod"
}

# shellcheck disable=SC2317
in_dir() (
    cd "$1"
    shift
    "$@" >&2
)

# shellcheck disable=SC2317
discard_stdout() { "$@" >/dev/null; }

# go_build WRAPPER_DIR TAGS LDFLAGS OUTPUT PACKAGE...
go_build() {
    local dir="$1" tags="$2" ldflags="$3" output="$4" name
    shift 4
    name="$(basename "$dir")"
    timed "$name: resolve and download modules" \
        in_dir "$dir" discard_stdout "$go_bin" list -tags "$tags" -deps "$@"
    timed "$name: compile and link $*" \
        in_dir "$dir" "$go_bin" build -p "$jobs" -trimpath -tags "$tags" -ldflags "$ldflags" \
        -o "$output" "$@"
    mkdir -p "$dest/modules/$name"
    cp "$dir/go.mod" "$dir/go.sum" "$dest/modules/$name/"
}

build_kubernetes() {
    local release="k8s.io/kubernetes@$KUBERNETES_VERSION" gomod
    gomod="$(mod_field "$release" GoMod)"
    [[ -f $gomod ]] || die "no go.mod for $release"
    local staging_version="v0.${KUBERNETES_VERSION#v1.}" module replaces=()
    while read -r module; do
        replaces+=("$module => $module $staging_version")
    done < <(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }' "$gomod" | sort -u)
    ((${#replaces[@]} >= 10)) ||
        die "found only ${#replaces[@]} staging modules in $gomod; the go.mod layout changed"
    write_wrapper "$work/kubernetes" "$gomod" "k8s.io/kubernetes $KUBERNETES_VERSION" \
        "${replaces[@]}"
    local minor="${KUBERNETES_VERSION#v1.}"
    minor="${minor%%.*}"
    local build_date flags=(-s -w) pkg
    build_date="$(mod_time "$release")"
    [[ $build_date =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T ]] ||
        die "no release time for $release from the module proxy (got '$build_date')"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=(
            -X "$pkg.gitVersion=$KUBERNETES_VERSION"
            -X "$pkg.gitMajor=1"
            -X "$pkg.gitMinor=$minor"
            -X "$pkg.gitTreeState=clean"
            -X "$pkg.buildDate=$build_date"
            -X "$pkg.gitCommit="
        )
    done
    go_build "$work/kubernetes" "" "${flags[*]}" "$stage/" \
        k8s.io/kubernetes/cmd/kubelet \
        k8s.io/kubernetes/cmd/kube-scheduler \
        k8s.io/kubernetes/cmd/kube-proxy
}

build_containerd() {
    local module=github.com/containerd/containerd/v2 gomod
    gomod="$(mod_field "$module@$CONTAINERD_VERSION" GoMod)"
    [[ -f $gomod ]] || die "no go.mod for $module@$CONTAINERD_VERSION"
    write_wrapper "$work/containerd" "$gomod" "$module $CONTAINERD_VERSION"
    # The graph drivers the node does not use (overlayfs is the snapshotter) need cgo or
    # kernel headers; containerd's own Makefile offers these tags to leave them out.
    go_build "$work/containerd" "no_btrfs no_devmapper no_zfs no_aufs" \
        "-s -w -X $module/version.Version=$CONTAINERD_VERSION -X $module/version.Revision=" \
        "$stage/" "$module/cmd/containerd" "$module/cmd/containerd-shim-runc-v2" "$module/cmd/ctr"
}

build_runc() {
    local module=github.com/opencontainers/runc gomod
    gomod="$(mod_field "$module@$RUNC_VERSION" GoMod)"
    [[ -f $gomod ]] || die "no go.mod for $module@$RUNC_VERSION"
    command -v pkg-config >/dev/null && pkg-config --exists libseccomp ||
        die "runc needs libseccomp's headers: apt-get install libseccomp-dev pkg-config"
    write_wrapper "$work/runc" "$gomod" "$module $RUNC_VERSION"
    # runc's version comes from its embedded VERSION file; only the commit is an ldflag.
    CGO_ENABLED=1 go_build "$work/runc" "seccomp urfave_cli_no_docs" \
        "-s -w -X main.gitCommit=" "$stage/runc" "$module"
}

# CoreDNS with only the plugins the node's Corefile uses, the way CoreDNS documents custom
# builds (its own main imports core/plugin, i.e. every plugin: the AWS, Azure and Google SDKs,
# etcd, tracing; that took 473 s of a cold build on 2 busy cores). Directives keep CoreDNS's
# own order for these plugins (core/dnsserver/zdirectives.go).
build_coredns() {
    local module=github.com/coredns/coredns gomod
    gomod="$(mod_field "$module@$COREDNS_VERSION" GoMod)"
    [[ -f $gomod ]] || die "no go.mod for $module@$COREDNS_VERSION"
    write_wrapper "$work/coredns" "$gomod" "$module $COREDNS_VERSION"
    printf '%b\n' \
        'package main' '' 'import (' \
        '\t"github.com/coredns/coredns/core/dnsserver"' \
        '\t"github.com/coredns/coredns/coremain"' \
        '\t_ "github.com/coredns/coredns/plugin/bind"' \
        '\t_ "github.com/coredns/coredns/plugin/errors"' \
        '\t_ "github.com/coredns/coredns/plugin/kubernetes"' \
        ')' '' \
        'func init() { dnsserver.Directives = []string{"bind", "errors", "kubernetes"} }' '' \
        'func main() { coremain.Run() }' >"$work/coredns/main.go"
    go_build "$work/coredns" "" "-s -w -X $module/coremain.GitCommit=" "$stage/coredns" .
}

verify() {
    local name="$1" expected="$2" output
    shift 2
    output="$("$@" 2>&1)" || die "$name: '$*' failed: $output"
    [[ $output == *"$expected"* ]] || die "$name reports '$output', expected '$expected'"
    log "verified: $name -> $expected"
}

verify_all() {
    verify kubelet "Kubernetes $KUBERNETES_VERSION" "$stage/kubelet" --version
    verify kube-scheduler "Kubernetes $KUBERNETES_VERSION" "$stage/kube-scheduler" --version
    verify kube-proxy "Kubernetes $KUBERNETES_VERSION" "$stage/kube-proxy" --version
    verify containerd "$CONTAINERD_VERSION" "$stage/containerd" --version
    verify ctr "$CONTAINERD_VERSION" "$stage/ctr" --version
    verify containerd-shim-runc-v2 "$CONTAINERD_VERSION" "$stage/containerd-shim-runc-v2" -v
    verify runc "runc version ${RUNC_VERSION#v}" "$stage/runc" --version
    verify "runc seccomp" '"enabled": true' "$stage/runc" features
    verify coredns "CoreDNS-${COREDNS_VERSION#v}" "$stage/coredns" -version
    verify "coredns plugins" "kubernetes" "$stage/coredns" -plugins
}

install_and_stamp() {
    rm -rf "$bin_dir"
    mv "$stage" "$bin_dir"
    total=$((SECONDS - build_started))
    {
        printf '%s\n' "$stamp_line"
        printf 'built=%s go=%s total=%ss\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
            "$("$go_bin" env GOVERSION)" "$total"
        printf '%s\n' "${timings[@]}"
    } >"$stamp.partial"
    mv "$stamp.partial" "$stamp"
    log "build finished in ${total}s: $bin_dir"
}

main() {
    load_versions
    if is_warm; then
        log "warm cache: $bin_dir"
        printf '%s\n' "$bin_dir"
        return 0
    fi
    command -v flock >/dev/null || die "flock (util-linux) is required"
    mkdir -p "$cache_root"
    exec 9>"$cache_root/.build.lock"
    flock -w 5400 9 || die "timed out waiting for another build holding $cache_root/.build.lock"
    if is_warm; then
        log "warm cache (built by a concurrent run): $bin_dir"
        printf '%s\n' "$bin_dir"
        return 0
    fi
    setup_go
    work="$(mktemp -d "${TMPDIR:-/tmp}/beam-node-build.XXXXXX")"
    stage="$dest/bin.partial"
    trap 'rm -rf "$work" "$stage"' EXIT
    rm -rf "$stage"
    mkdir -p "$stage" "$dest/modules"
    build_started=$SECONDS
    timings=()
    log "building $stamp_line"
    log "go: $("$go_bin" version); GOMODCACHE=$GOMODCACHE GOCACHE=$GOCACHE -p $jobs"
    build_runc
    build_containerd
    build_kubernetes
    build_coredns
    verify_all
    install_and_stamp
    printf '%s\n' "$bin_dir"
}

main "$@"; exit

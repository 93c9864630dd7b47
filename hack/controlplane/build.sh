#!/usr/bin/env bash
# Builds the Kubernetes control plane that Beam's k8s tests run against, from source, through
# the Go module proxy: kube-apiserver, kube-controller-manager, kubectl, etcd and helm, at the
# versions pinned in versions.env.
#
# Why from source: the test machines reach package registries only (no Docker engine, no image
# registry, no release download sites), and the Go module proxy serves every module we need.
#
# Output: the binaries land in
#   ${BEAM_CACHE_DIR:-$HOME/.cache/beam}/controlplane/<k8s>-etcd<v>-helm<v>/bin
# and that directory is the only thing printed on stdout (progress goes to stderr), so callers
# can do `bin_dir="$(bash hack/controlplane/build.sh)"`. A warm cache (all binaries present
# plus the stamp file) returns at once without touching Go.
#
# The dangerous parts:
# - k8s.io/kubernetes is not `go install`able: its go.mod replaces every staging module
#   (k8s.io/api, k8s.io/client-go, ...) with ./staging/src/..., and replace directives of a
#   dependency are ignored. So each component is built inside a throwaway wrapper module whose
#   go.mod requires the release and pins every staging module to the matching v0.X.Y with its own
#   replace lines. The staging list is read from the release's go.mod, never hard-coded.
# - Each component gets its own wrapper so it is linked against exactly the dependency versions
#   its release pins; one shared wrapper would let MVS upgrade, for example, the etcd client or
#   gRPC inside kube-apiserver.
# - The wrapper copies the release's `go` and `godebug` lines: they set the GODEBUG defaults the
#   binary runs with, and a wrapper without them would silently change runtime behaviour.
# - The Go module and build caches live under the cache dir, so a rebuild after a version bump is
#   incremental. -modcacherw keeps the module cache deletable with plain `rm -rf`.
# - A flock serialises concurrent builds into the same cache dir (bounded wait).
# - Everything runs from main(), which bash parses whole before running: a script edited (or
#   checked out anew) during a ten-minute build would otherwise be read from a shifted offset.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly binaries=(kube-apiserver kube-controller-manager kubectl etcd helm)

log() { printf '[controlplane/build %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

load_versions() {
    # shellcheck source-path=SCRIPTDIR source=versions.env
    source "$here/versions.env"
    [[ ${KUBERNETES_VERSION:-} =~ ^v1\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] ||
        die "versions.env: KUBERNETES_VERSION='${KUBERNETES_VERSION:-}' is not v1.MINOR.PATCH"
    [[ ${ETCD_VERSION:-} =~ ^v3\.[0-9]+\.[0-9]+$ ]] ||
        die "versions.env: ETCD_VERSION='${ETCD_VERSION:-}' is not v3.MINOR.PATCH"
    [[ ${HELM_VERSION:-} =~ ^v3\.[0-9]+\.[0-9]+$ ]] ||
        die "versions.env: HELM_VERSION='${HELM_VERSION:-}' is not v3.MINOR.PATCH"

    cache_root="${BEAM_CACHE_DIR:-$HOME/.cache/beam}/controlplane"
    dest="$cache_root/${KUBERNETES_VERSION}-etcd${ETCD_VERSION#v}-helm${HELM_VERSION#v}"
    bin_dir="$dest/bin"
    stamp="$dest/stamp"
    stamp_line="kubernetes=$KUBERNETES_VERSION etcd=$ETCD_VERSION helm=$HELM_VERSION"
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
    export GOMODCACHE="$cache_root/go/mod"
    export GOCACHE="$cache_root/go/build"
    export GOFLAGS="-mod=mod -modcacherw -buildvcs=false"
    export GOWORK=off
    export CGO_ENABLED=0
    # The machine's Go (1.26.x) builds every pinned version; an explicit GOTOOLCHAIN from the
    # caller (e.g. go1.27.3 for a newer Kubernetes) is honoured.
    export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
    jobs="${BEAM_GO_BUILD_JOBS:-2}"
    [[ $jobs =~ ^[1-9][0-9]*$ ]] || die "BEAM_GO_BUILD_JOBS='$jobs' is not a positive integer"
}

# timed NAME COMMAND...: runs COMMAND, logs and records how long it took.
timed() {
    local name="$1" started=$SECONDS
    shift
    log "start: $name"
    "$@" || die "step failed: $name (exit $?)"
    local took=$((SECONDS - started))
    timings+=("$name=${took}s")
    log "done:  $name (${took}s)"
}

# mod_field MODULE@VERSION FIELD: one field of `go mod download -json` (GoMod, Dir, Info, ...).
mod_field() {
    local json
    json="$(cd "$work" && "$go_bin" mod download -json "$1")" || die "go mod download $1 failed"
    sed -n "s/^[[:space:]]*\"$2\": \"\(.*\)\",\{0,1\}$/\1/p" <<<"$json"
}

# The release time of a module version (from the proxy's .info), used as the build date so the
# same versions always produce the same binaries.
mod_time() {
    local info
    info="$(mod_field "$1" Info)"
    sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info"
}

# write_wrapper DIR GOMOD_OF_RELEASE REQUIRE_LINE [REPLACE_LINE...]
# Creates a module that only requires the release, with the release's go/godebug lines.
write_wrapper() {
    local dir="$1" release_gomod="$2" require="$3"
    shift 3
    mkdir -p "$dir"
    {
        printf 'module beam.invalid/controlplane/%s\n\n' "$(basename "$dir")"
        awk '$1 == "go" { print; exit }' "$release_gomod"
        # godebug may be a single line or a parenthesised block.
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

# in_dir DIR COMMAND...: runs COMMAND in DIR without changing this shell's directory. Its
# stdout goes to stderr: this script's stdout carries only the bin dir.
# shellcheck disable=SC2317  # in_dir and discard_stdout are only called through timed
in_dir() (
    cd "$1"
    shift
    "$@" >&2
)

# shellcheck disable=SC2317
discard_stdout() { "$@" >/dev/null; }

# go_build WRAPPER_DIR LDFLAGS OUTPUT PACKAGE...: resolve + download, then compile and link.
go_build() {
    local dir="$1" ldflags="$2" output="$3" name
    shift 3
    name="$(basename "$dir")"
    # `go list -deps` downloads exactly the modules the packages need and records their sums;
    # its package list is not wanted.
    timed "$name: resolve and download modules" \
        in_dir "$dir" discard_stdout "$go_bin" list -deps "$@"
    timed "$name: compile and link $*" \
        in_dir "$dir" "$go_bin" build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$output" "$@"
    # Keep the resolved wrapper go.mod/go.sum next to the binaries: they say exactly what the
    # binaries were built from.
    mkdir -p "$dest/modules/$name"
    cp "$dir/go.mod" "$dir/go.sum" "$dest/modules/$name/"
}

build_kubernetes() {
    local release="k8s.io/kubernetes@$KUBERNETES_VERSION" gomod
    gomod="$(mod_field "$release" GoMod)"
    [[ -f $gomod ]] || die "no go.mod for $release"
    # Staging modules are the k8s.io requirements at the placeholder version v0.0.0.
    local staging_version="v0.${KUBERNETES_VERSION#v1.}" module replaces=()
    while read -r module; do
        replaces+=("$module => $module $staging_version")
    done < <(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }' "$gomod" | sort -u)
    ((${#replaces[@]} >= 10)) ||
        die "found only ${#replaces[@]} staging modules in $gomod; the go.mod layout changed"
    log "kubernetes: pinning ${#replaces[@]} staging modules to $staging_version"
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
            # The proxy does not say which commit a tag is; leave it empty, not a placeholder.
            -X "$pkg.gitCommit="
        )
    done
    # One go build for the three binaries: they share most packages and the scheduler can
    # overlap one binary's link with another's compilation.
    go_build "$work/kubernetes" "${flags[*]}" "$stage/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kubectl
}

build_etcd() {
    local release="go.etcd.io/etcd/server/v3@$ETCD_VERSION" gomod
    gomod="$(mod_field "$release" GoMod)"
    [[ -f $gomod ]] || die "no go.mod for $release"
    write_wrapper "$work/etcd" "$gomod" "go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    # The server module root is etcd's main package (a wrapper around etcdmain). Its version
    # string is a constant; only the git SHA is an ldflag, and the proxy does not know it.
    go_build "$work/etcd" "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
        "$stage/etcd" go.etcd.io/etcd/server/v3
}

build_helm() {
    local release="helm.sh/helm/v3@$HELM_VERSION" gomod
    gomod="$(mod_field "$release" GoMod)"
    [[ -f $gomod ]] || die "no go.mod for $release"
    write_wrapper "$work/helm" "$gomod" "helm.sh/helm/v3 $HELM_VERSION"
    # helm's Makefile also stamps the Kubernetes version its client libraries are from; it
    # becomes the default kubeVersion for `helm template` and lint.
    local client_go major minor
    client_go="$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$gomod")"
    [[ $client_go =~ ^v0\.([0-9]+)\. ]] || die "cannot read k8s.io/client-go from $gomod"
    major=1
    minor="${BASH_REMATCH[1]}"
    local flags=(
        -s -w
        -X "helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
        -X "helm.sh/helm/v3/internal/version.metadata="
        -X "helm.sh/helm/v3/internal/version.gitCommit="
        -X "helm.sh/helm/v3/internal/version.gitTreeState=clean"
        -X "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$major"
        -X "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
        -X "helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$major"
        -X "helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
    )
    go_build "$work/helm" "${flags[*]}" "$stage/helm" helm.sh/helm/v3/cmd/helm
}

# verify NAME EXPECTED COMMAND...: the built binary reports the pinned version.
verify() {
    local name="$1" expected="$2" output
    shift 2
    output="$("$@" 2>&1)" || die "$name: '$*' failed: $output"
    [[ $output == *"$expected"* ]] || die "$name reports '$output', expected '$expected'"
    log "verified: $name -> $expected"
}

verify_all() {
    verify kube-apiserver "Kubernetes $KUBERNETES_VERSION" "$stage/kube-apiserver" --version
    verify kube-controller-manager "Kubernetes $KUBERNETES_VERSION" \
        "$stage/kube-controller-manager" --version
    verify kubectl "\"gitVersion\": \"$KUBERNETES_VERSION\"" \
        "$stage/kubectl" version --client -o json
    verify etcd "etcd Version: ${ETCD_VERSION#v}" "$stage/etcd" --version
    verify helm "Version:\"$HELM_VERSION\"" \
        "$stage/helm" version --template '{{printf "Version:%q" .Version}}'
}

install_and_stamp() {
    rm -rf "$bin_dir"
    mv "$stage" "$bin_dir"
    total=$((SECONDS - build_started))
    {
        # The first line is what is_warm compares; the rest is for people.
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
    # A cold build takes about ten minutes; wait at most 90 minutes for another one to finish.
    exec 9>"$cache_root/.build.lock"
    flock -w 5400 9 || die "timed out waiting for another build holding $cache_root/.build.lock"
    if is_warm; then
        log "warm cache (built by a concurrent run): $bin_dir"
        printf '%s\n' "$bin_dir"
        return 0
    fi

    setup_go
    work="$(mktemp -d "${TMPDIR:-/tmp}/beam-controlplane-build.XXXXXX")"
    stage="$dest/bin.partial"
    trap 'rm -rf "$work" "$stage"' EXIT
    rm -rf "$stage"
    mkdir -p "$stage" "$dest/modules"
    build_started=$SECONDS
    timings=()

    log "building $stamp_line (Go caches make a rebuild incremental)"
    log "go: $("$go_bin" version); GOMODCACHE=$GOMODCACHE GOCACHE=$GOCACHE -p $jobs"
    build_kubernetes
    build_etcd
    build_helm
    verify_all
    install_and_stamp
    printf '%s\n' "$bin_dir"
}

# On one line so that bash, which reads a script as it runs it, never reads past this point.
main "$@"; exit

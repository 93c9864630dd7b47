#!/usr/bin/env bash
# Builds the load generators `make bench` drives, ghz (gRPC) and hey (HTTP), at the versions
# pinned in versions.env, from the Go module proxy, like hack/controlplane/build.sh.
#
# Output: the binaries land in
#   ${BEAM_CACHE_DIR:-$HOME/.cache/beam}/bench/ghz<v>-hey<v>/bin
# and that directory is the only thing printed on stdout (progress goes to stderr), so callers
# can do `bin_dir="$(bash hack/bench/build.sh)"`. A warm cache (both binaries present plus the
# stamp file) returns at once without touching Go.
#
# Notes:
# - Both are plain `go install module/cmd@version`: neither go.mod has replace or exclude
#   directives, so each binary is linked against exactly the dependency versions its release
#   pins (its own go.mod and go.sum, checked against the checksum database).
# - ghz's version string is an ldflag (-X main.version, as its goreleaser sets it); hey has none.
#   Both are verified afterwards with `go version -m`, which reads the main module's path and
#   version from the binary itself.
# - The Go module and build caches live under the cache dir; -modcacherw keeps the module cache
#   deletable with plain `rm -rf`.
# - A flock serialises concurrent builds into the same cache dir (bounded wait).
# - Everything runs from main(), which bash parses whole before running.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly binaries=(ghz hey)

log() { printf '[bench/build %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

load_versions() {
    # shellcheck source-path=SCRIPTDIR source=versions.env
    source "$here/versions.env"
    [[ ${GHZ_VERSION:-} =~ ^v0\.[0-9]+\.[0-9]+$ ]] ||
        die "versions.env: GHZ_VERSION='${GHZ_VERSION:-}' is not v0.MINOR.PATCH"
    [[ ${HEY_VERSION:-} =~ ^v0\.[0-9]+\.[0-9]+$ ]] ||
        die "versions.env: HEY_VERSION='${HEY_VERSION:-}' is not v0.MINOR.PATCH"

    cache_root="${BEAM_CACHE_DIR:-$HOME/.cache/beam}/bench"
    dest="$cache_root/ghz${GHZ_VERSION#v}-hey${HEY_VERSION#v}"
    bin_dir="$dest/bin"
    stamp="$dest/stamp"
    stamp_line="ghz=$GHZ_VERSION hey=$HEY_VERSION"
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
    # No -mod=...: `go install pkg@version` ignores any enclosing module and refuses -mod.
    export GOFLAGS="-modcacherw -buildvcs=false"
    export GOWORK=off
    export CGO_ENABLED=0
    export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
    jobs="${BEAM_GO_BUILD_JOBS:-2}"
    [[ $jobs =~ ^[1-9][0-9]*$ ]] || die "BEAM_GO_BUILD_JOBS='$jobs' is not a positive integer"
}

# timed NAME COMMAND...: runs COMMAND (its stdout to stderr), logs how long it took.
timed() {
    local name="$1" started=$SECONDS
    shift
    log "start: $name"
    "$@" >&2 || die "step failed: $name (exit $?)"
    local took=$((SECONDS - started))
    timings+=("$name=${took}s")
    log "done:  $name (${took}s)"
}

# in_dir DIR COMMAND...: runs COMMAND in DIR without changing this shell's directory.
# shellcheck disable=SC2317  # only called through timed
in_dir() (
    cd "$1"
    shift
    "$@"
)

# install_tool PACKAGE@VERSION LDFLAGS: `go install` into the staging dir ($GOBIN), from the
# empty work dir so that no go.mod or go.work around the caller is consulted.
install_tool() {
    local package="$1" ldflags="$2"
    timed "go install $package" \
        in_dir "$work" "$go_bin" install -p "$jobs" -trimpath -ldflags "$ldflags" "$package"
}

# verify NAME MODULE VERSION: the binary was built from MODULE at VERSION.
verify() {
    local name="$1" module="$2" version="$3" info
    info="$("$go_bin" version -m "$stage/$name")" || die "$name: go version -m failed"
    grep -Eq "^[[:space:]]+mod[[:space:]]+$module[[:space:]]+$version([[:space:]]|$)" <<<"$info" ||
        die "$name: built from something other than $module $version:"$'\n'"$info"
    log "verified: $name -> $module $version"
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
    # A cold build takes a few minutes; wait at most 30 minutes for another one to finish.
    exec 9>"$cache_root/.build.lock"
    flock -w 1800 9 || die "timed out waiting for another build holding $cache_root/.build.lock"
    if is_warm; then
        log "warm cache (built by a concurrent run): $bin_dir"
        printf '%s\n' "$bin_dir"
        return 0
    fi

    setup_go
    work="$(mktemp -d "${TMPDIR:-/tmp}/beam-bench-build.XXXXXX")"
    stage="$dest/bin.partial"
    trap 'rm -rf "$work" "$stage"' EXIT
    rm -rf "$stage"
    mkdir -p "$stage"
    export GOBIN="$stage"
    local started=$SECONDS
    timings=()

    log "building $stamp_line"
    log "go: $("$go_bin" version); GOMODCACHE=$GOMODCACHE GOCACHE=$GOCACHE -p $jobs"
    install_tool "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION" "-s -w -X main.version=$GHZ_VERSION"
    install_tool "github.com/rakyll/hey@$HEY_VERSION" "-s -w"
    verify ghz github.com/bojand/ghz "$GHZ_VERSION"
    verify hey github.com/rakyll/hey "$HEY_VERSION"
    "$stage/ghz" --version >&2 || die "ghz --version failed"

    rm -rf "$bin_dir"
    mv "$stage" "$bin_dir"
    {
        # The first line is what is_warm compares; the rest is for people.
        printf '%s\n' "$stamp_line"
        printf 'built=%s go=%s total=%ss\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
            "$("$go_bin" env GOVERSION)" "$((SECONDS - started))"
        printf '%s\n' "${timings[@]}"
    } >"$stamp.partial"
    mv "$stamp.partial" "$stamp"
    log "build finished in $((SECONDS - started))s: $bin_dir"
    printf '%s\n' "$bin_dir"
}

# On one line so that bash, which reads a script as it runs it, never reads past this point.
main "$@"; exit

#!/usr/bin/env bash
# Builds Prometheus's promtool from source through the Go module proxy, at the pinned version,
# into a versioned cache; prints the binary's path on stdout (progress goes to stderr).
#
# Why: the chart's PrometheusRule is checked with Prometheus's own parser and rule evaluator
# (`promtool check rules`, `promtool test rules`), and the test machines reach package
# registries only. Prometheus publishes its Go module as v0.<major*100+minor>.<patch>
# (v0.305.0 is Prometheus 3.5.0). Its go.mod has a replace directive (fsnotify), which
# `go install module@version` refuses, so promtool is built inside a throwaway wrapper module
# that requires the release and copies its single-line replace directives: MVS then selects
# exactly the versions the release pins.
#
#   ${BEAM_CACHE_DIR:-$HOME/.cache/beam}/promtool/<version>/bin/promtool
#
# A warm cache returns at once. The Go module and build caches are shared with
# hack/controlplane/build.sh (same directories), and a flock serialises concurrent builds.
set -euo pipefail

main() {
    local version="${BEAM_PROMETHEUS_MODULE_VERSION:-v0.305.0}"
    local cache_root="${BEAM_CACHE_DIR:-$HOME/.cache/beam}"
    local target="$cache_root/promtool/$version"
    if [ -x "$target/bin/promtool" ] && [ -f "$target/stamp" ]; then
        echo "$target/bin/promtool"
        return 0
    fi
    mkdir -p "$target"
    exec 9>"$target/.build.lock"
    flock -w 3600 9 || { echo "timed out waiting for $target/.build.lock" >&2; exit 1; }
    if [ ! -f "$target/stamp" ]; then
        local started=$SECONDS module="github.com/prometheus/prometheus"
        export GOMODCACHE="$cache_root/controlplane/go/mod"
        export GOCACHE="$cache_root/controlplane/go/build"
        export GOFLAGS="-mod=mod -modcacherw -buildvcs=false" CGO_ENABLED=0
        local wrapper="$target/wrapper"
        rm -rf "$wrapper" "$target/bin.partial"
        mkdir -p "$wrapper"
        local release_mod
        release_mod="$(cd "$wrapper" && go mod download -json "$module@$version" |
            sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
        [ -f "$release_mod" ] || { echo "no go.mod for $module@$version" >&2; exit 1; }
        {
            echo "module beam.local/promtool"
            grep -E '^go [0-9.]+$' "$release_mod"
            echo "require $module $version"
            grep -E '^replace [^(]' "$release_mod" || true
        } >"$wrapper/go.mod"
        # No `go mod tidy`: with nothing importing the release it would drop the require and
        # resolve the newest version instead; -mod=mod adds only what the build needs.
        (cd "$wrapper" && go build -p "${BEAM_GO_BUILD_JOBS:-2}" -trimpath \
                -ldflags "-s -w -X github.com/prometheus/common/version.Version=${version}" \
                -o "$target/bin.partial/promtool" "$module/cmd/promtool") >&2
        rm -rf "$target/bin"
        mv "$target/bin.partial" "$target/bin"
        "$target/bin/promtool" --version >&2
        echo "built $version in $((SECONDS - started)) s" >"$target/stamp"
    fi
    echo "$target/bin/promtool"
}

main "$@"

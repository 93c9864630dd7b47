#!/usr/bin/env bash
# Builds the test cluster's container images from Debian packages only (no image registry):
#
#   localhost/pause:1                 the pod sandbox: pause.c, compiled static
#   localhost/debian:bookworm         mmdebstrap minbase + busybox + ca-certificates
#   localhost/beam-python:3.11        FROM debian: Python 3.11 (python.Dockerfile)
#   localhost/beam-redis:bookworm     FROM debian: redis-server + redis-sentinel
#   localhost/beam-postgresql:15      FROM debian: PostgreSQL 15 with a docker-library-style
#                                     entrypoint (stands in for TimescaleDB)
#   localhost/beam:e2e                Beam's own Dockerfile, --build-arg PYTHON_IMAGE=beam-python
#
# Output: one oci-archive path per image on stdout (progress on stderr); `ctr images import`
# names each image from its annotations. Archives are cached under
#   ${BEAM_CACHE_DIR:-$HOME/.cache/beam}/images/base-<key>/   (key: this directory's files)
#   ${BEAM_CACHE_DIR:-$HOME/.cache/beam}/images/beam-<key>/   (key: base key + Beam's build inputs)
# so a warm run returns at once and an edit to Beam's code rebuilds only the Beam image.
#
# Needs root and Debian's mmdebstrap and buildah (apt-get install mmdebstrap buildah), gcc with
# a static libc (libc6-dev), and the Debian mirror and PyPI (the Dockerfiles run apt-get and
# pip). buildah runs with chroot isolation and its storage in a temporary directory, inside a
# private mount namespace: its overlay mounts vanish with it, nothing is left on the host.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
readonly suite=bookworm
readonly mirrors=(
    "deb http://deb.debian.org/debian $suite main"
    "deb http://deb.debian.org/debian $suite-updates main"
    "deb http://deb.debian.org/debian-security $suite-security main"
)
# Beam's build context, as the Dockerfile COPYs it (.dockerignore keeps the rest out).
readonly beam_inputs=(Dockerfile .dockerignore pyproject.toml hatch_build.py README.md proto lua
    migrations service operator)

log() { printf '[images/build %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# hash_files DIR PATH...: one digest over the names and contents of every file under PATHs.
hash_files() {
    local dir="$1"
    shift
    (
        cd "$dir"
        find "$@" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
            ! -path 'service/beam/balance/*' ! -path 'service/beam/admin/*' -print0 |
            LC_ALL=C sort -z | xargs -0 sha256sum
    ) | sha256sum | cut -c1-16
}

# ---------------------------------------------------------------------------------------------
# Run inside `unshare --mount`: every buildah step of one build.
# shellcheck disable=SC2317
buildah_steps() {
    local work="$1" out="$2" what="$3"
    local storage=(--root "$work/storage" --runroot "$work/run" --storage-driver overlay)
    local bud=(buildah "${storage[@]}" bud --isolation chroot --pull-never --layers=false)
    push() { buildah "${storage[@]}" push --quiet --disable-compression "$1" "oci-archive:$2:$1" >&2; }
    if [[ $what == base ]]; then
        buildah "${storage[@]}" pull --quiet "oci-archive:$out/debian.oci.tar" >/dev/null
        "${bud[@]}" -t localhost/beam-python:3.11 -f "$here/python.Dockerfile" "$here" >&2
        push localhost/beam-python:3.11 "$out/python.oci.tar"
        "${bud[@]}" -t localhost/beam-redis:bookworm -f "$here/redis.Dockerfile" "$here" >&2
        push localhost/beam-redis:bookworm "$out/redis.oci.tar"
        "${bud[@]}" -t localhost/beam-postgresql:15 -f "$here/postgresql.Dockerfile" "$here" >&2
        push localhost/beam-postgresql:15 "$out/postgresql.oci.tar"
    else
        local base_dir="$4"
        buildah "${storage[@]}" pull --quiet "oci-archive:$base_dir/python.oci.tar" >/dev/null
        # pip in the builder stage trusts what this machine trusts (a TLS-intercepting egress
        # proxy's CA, for one): the host's CA bundle is mounted into the RUN steps only, never
        # committed into the image.
        local ca_bundle="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" trust=()
        [[ -f $ca_bundle ]] && trust=(--volume "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
        "${bud[@]}" "${trust[@]}" -t localhost/beam:e2e \
            --build-arg PYTHON_IMAGE=localhost/beam-python:3.11 -f "$root/Dockerfile" "$root" >&2
        push localhost/beam:e2e "$out/beam.oci.tar"
    fi
}

build_base() {
    local out="$1" work="$2"
    command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: apt-get install mmdebstrap"
    command -v buildah >/dev/null || die "buildah is missing: apt-get install buildah"
    local started=$SECONDS
    log "pause: cc -Os -static"
    mkdir -p "$work/pause/rootfs"
    cc -Os -static -o "$work/pause/rootfs/pause" "$here/pause.c" || die "cannot compile pause.c"
    tar --numeric-owner --owner 0 --group 0 --mtime @0 -C "$work/pause/rootfs" -cf \
        "$work/pause.tar" pause
    python3 "$here/mkimage.py" --name localhost/pause:1 --layer "$work/pause.tar" \
        --entrypoint /pause --output "$out/pause.oci.tar" >&2
    log "debian: mmdebstrap $suite minbase (a few minutes)"
    # In a private mount namespace: the chroot's /proc, /sys and /dev mounts cannot outlive
    # an interrupted run.
    unshare --mount --propagation private mmdebstrap --quiet --mode=root --variant=minbase --include=busybox,ca-certificates \
        --format=tar "$suite" "$work/debian.tar" "${mirrors[@]}" >&2 ||
        die "mmdebstrap failed"
    python3 "$here/mkimage.py" --name localhost/debian:bookworm --layer "$work/debian.tar" \
        --cmd /bin/bash --output "$out/debian.oci.tar" >&2
    rm -f "$work/debian.tar"
    log "python, redis, postgresql: buildah bud"
    unshare --mount --propagation private bash "$here/build.sh" __buildah "$work" "$out" base ||
        die "buildah failed"
    log "base images built in $((SECONDS - started))s"
}

build_beam() {
    local out="$1" work="$2" base_dir="$3" started=$SECONDS
    log "beam: buildah bud of the Dockerfile (pip downloads Beam's dependencies)"
    unshare --mount --propagation private bash "$here/build.sh" __buildah "$work" "$out" beam "$base_dir" ||
        die "buildah failed"
    log "beam image built in $((SECONDS - started))s"
}

# cached NAME KEY_DIR BUILD_FUNCTION ARGS...: runs the build into KEY_DIR unless its stamp exists.
cached() {
    local name="$1" dir="$2"
    shift 2
    if [[ -f $dir/stamp ]]; then
        log "warm cache: $name ($dir)"
        return 0
    fi
    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/beam-images.XXXXXX")"
    rm -rf "$dir.partial"
    mkdir -p "$dir.partial"
    "$@" "$dir.partial" "$work"
    rm -rf "$work"
    date -u +%Y-%m-%dT%H:%M:%SZ >"$dir.partial/stamp"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
}

main() {
    if [[ ${1:-} == __buildah ]]; then
        shift
        buildah_steps "$@"
        return
    fi
    [[ $(id -u) == 0 ]] || die "needs root (mmdebstrap --mode=root, buildah storage)"
    local cache_root="${BEAM_CACHE_DIR:-$HOME/.cache/beam}/images" base_key beam_key
    # The base images depend on these files only (not on this script's Beam step).
    base_key="$(hash_files "$here" pause.c mkimage.py python.Dockerfile redis.Dockerfile \
        postgresql.Dockerfile docker-entrypoint.sh)"
    beam_key="$(printf '%s %s' "$base_key" "$(hash_files "$root" "${beam_inputs[@]}")" |
        sha256sum | cut -c1-16)"
    local base_dir="$cache_root/base-$base_key" beam_dir="$cache_root/beam-$beam_key"
    mkdir -p "$cache_root"
    exec 9>"$cache_root/.build.lock"
    flock -w 3600 9 || die "timed out waiting for another build holding $cache_root/.build.lock"
    cached base "$base_dir" build_base
    # build_beam's arguments are (out, work, base_dir); cached passes out and work last.
    beam_with_base() { build_beam "$1" "$2" "$base_dir"; }
    cached beam "$beam_dir" beam_with_base
    # Every edit to Beam's code makes a new Beam image (~150 MB): keep the current one only.
    local stale
    for stale in "$cache_root"/beam-*; do
        [[ $stale == "$beam_dir" ]] || rm -rf "$stale"
    done
    printf '%s\n' "$base_dir/pause.oci.tar" "$base_dir/redis.oci.tar" \
        "$base_dir/postgresql.oci.tar" "$beam_dir/beam.oci.tar"
}

main "$@"; exit

#!/usr/bin/env bash
# Build csi-driver-host-path's `hostpathplugin` (the peer of the benchmarks) with Go, from
# the Go module proxy, through a wrapper module generated here, and cache the binary.
#
#   bench/build-hostpath.sh            latest tag (falls back to HOSTPATH_FALLBACK_VERSION
#                                      when the proxy does not list versions)
#   HOSTPATH_VERSION=v1.18.0 bench/build-hostpath.sh
#
# The peer's go.mod pins k8s.io/* staging modules with `replace` directives, which only
# apply in the main module; so the wrapper requires the peer at its tag and repeats that
# replace block (read from the peer's own go.mod as the proxy serves it).
#
# Prints `version=TAG` and then `binary=PATH` on success, or `error=REASON` and exits 3.
# Cache: $FLOTILLA_BENCH_CACHE (default /var/cache/flotilla/bench), outside the tree.
set -uo pipefail

MODULE=${HOSTPATH_MODULE:-github.com/kubernetes-csi/csi-driver-host-path}
PACKAGE=${HOSTPATH_PACKAGE:-$MODULE/cmd/hostpathplugin}
FALLBACK=${HOSTPATH_FALLBACK_VERSION:-v1.18.0}
CACHE=${FLOTILLA_BENCH_CACHE:-/var/cache/flotilla/bench}
export GOFLAGS=-mod=mod

log() { printf '[build-hostpath] %s\n' "$*" >&2; }
# (registry addresses in Go's messages are replaced: results are committed)
scrub() { sed -E 's#https?://[^/[:space:]]+/#<module proxy>/#g'; }
fail() {
    local reason
    reason=$(printf '%s' "$*" | scrub)
    printf 'error=%s\n' "$reason"
    log "peer unavailable: $reason"
    exit 3
}

command -v go >/dev/null || { printf 'version=%s\n' "${HOSTPATH_VERSION:-$FALLBACK}"; fail "no go toolchain on PATH"; }
mkdir -p "$CACHE"

version=${HOSTPATH_VERSION:-}
if [[ -z $version ]]; then
    if listed=$(timeout 120 go list -m -versions "$MODULE" 2>"$CACHE/list.err"); then
        version=$(tr ' ' '\n' <<<"$listed" | grep -E '^v[0-9]+\.[0-9]+\.[0-9]+$' | sort -V | tail -1)
    fi
    if [[ -z $version ]]; then
        log "could not list $MODULE versions ($(tr '\n' ' ' <"$CACHE/list.err" | scrub | cut -c1-200)); using $FALLBACK"
        version=$FALLBACK
    fi
fi
printf 'version=%s\n' "$version"

binary=$CACHE/$(basename "$PACKAGE")-$version
if [[ -x $binary ]]; then
    log "cached: $binary"
    printf 'binary=%s\n' "$binary"
    exit 0
fi

wrapper=$CACHE/wrapper-$version
rm -rf "$wrapper"
mkdir -p "$wrapper"
cd "$wrapper" || fail "cannot enter $wrapper"

# The peer's go.mod, as the module proxy serves it: its replace directives and go version.
info=$(timeout 300 go mod download -json "$MODULE@$version" 2>&1)
gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$info")
if [[ -z $gomod || ! -f $gomod ]]; then
    fail "go mod download $MODULE@$version: $(grep -v '^[[:space:]]*[{}]' <<<"$info" | tr '\n' ' ' | cut -c1-400)"
fi
goversion=$(awk '$1 == "go" {print $2; exit}' "$gomod")
{
    printf 'module flotilla.local/bench/hostpath-wrapper\n\ngo %s\n\nrequire %s %s\n\n' \
        "${goversion:-1.22}" "$MODULE" "$version"
    # single-line `replace a => b v` and the block form `replace ( ... )`
    awk '
        /^replace[[:space:]]*\(/ {block = 1; print; next}
        block && /^\)/ {block = 0; print; next}
        block {print; next}
        /^replace[[:space:]]/ {print}
    ' "$gomod"
} >go.mod
log "wrapper module for $MODULE@$version with $(grep -c '=>' go.mod) replace directive(s)"

if ! out=$(timeout 1200 go get "$PACKAGE@$version" 2>&1); then
    fail "go get $PACKAGE@$version: $(tr '\n' ' ' <<<"$out" | cut -c1-400)"
fi
if ! out=$(timeout 1200 go build -trimpath -ldflags "-X main.version=$version" \
        -o "$binary.tmp" "$PACKAGE" 2>&1); then
    fail "go build $PACKAGE: $(tr '\n' ' ' <<<"$out" | cut -c1-400)"
fi
mv "$binary.tmp" "$binary"
log "built $binary"
printf 'binary=%s\n' "$binary"

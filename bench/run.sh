#!/usr/bin/env bash
# `make bench`: Flotilla side by side with csi-driver-host-path, in one run.
#   1. install the `bench` extras of pyproject.toml into .venv (plotting);
#   2. build the peer's hostpathplugin if it is not cached (bench/build-hostpath.sh);
#   3. run both drivers, each on its own socket and state dir, through the same workload
#      (python -m bench.main), and write bench/results/<date>.{json,md,png} and the
#      generated section of BENCHMARKS.md.
# Extra arguments go to bench.main (e.g. --quick for a smoke run that publishes nothing).
# Scratch space: $BENCH_WORKROOT (default /var/tmp/flotilla-bench), removed at the end;
# whatever a driver left mounted or attached there is cleaned up even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "make bench needs root (loop devices, mounts)" >&2
    exit 1
fi
log() { printf '[bench] %s\n' "$*" >&2; }
PY=.venv/bin/python
WORKROOT=${BENCH_WORKROOT:-/var/tmp/flotilla-bench}
start=$(date +%s)

# 1. the bench extras
stamp=.venv/.flotilla-bench-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    mapfile -t extras < <("$PY" -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))')
    log "installing bench extras into .venv: ${extras[*]}"
    .venv/bin/pip install -q "${extras[@]}"
    touch "$stamp"
fi

# 2. the peer
peer_args=()
build_out=$(bench/build-hostpath.sh) || true
version=$(sed -n 's/^version=//p' <<<"$build_out")
binary=$(sed -n 's/^binary=//p' <<<"$build_out")
if [[ -n $binary && -x $binary ]]; then
    peer_args=(--hostpath-binary "$binary" --hostpath-version "$version")
else
    reason=$(sed -n 's/^error=//p' <<<"$build_out")
    log "csi-driver-host-path $version is unavailable; Flotilla runs alone"
    peer_args=(--hostpath-version "$version" --hostpath-unavailable "${reason:-build failed}")
fi

# 3. the run; on any exit, kill leftover drivers by PID and clean mounts and loop devices
cleanup() {
    "$PY" -m bench.drivers --cleanup "$WORKROOT" || true
    rm -rf "$WORKROOT"
}
trap cleanup EXIT
cleanup
rc=0
"$PY" -m bench.main --workroot "$WORKROOT" --started-epoch "$start" "${peer_args[@]}" "$@" \
    || rc=$?
log "make bench wall time: $(( $(date +%s) - start )) s (exit $rc)"
exit "$rc"

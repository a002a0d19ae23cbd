#!/usr/bin/env bash
# Idempotent set-up for running and testing Flotilla on a Debian host (as root).
#   scripts/setup.sh            Debian packages + Python venv (.venv) with the driver
#   scripts/setup.sh --test     also the test tools (csi-sanity via go install)
# Everything is cached: apt only runs when a package is missing, pip uses its cache,
# Go binaries land in $(go env GOPATH)/bin and are rebuilt only when absent.
set -euo pipefail
cd "$(dirname "$0")/.."

CSI_SANITY_VERSION=v5.4.0
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

log() { printf '[setup] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    echo "setup.sh needs root (loop devices, mounts, apt-get)" >&2
    exit 1
fi

# Debian packages: filesystems, loop devices, and Python's venv.
packages=(xfsprogs btrfs-progs e2fsprogs util-linux mount python3-venv)
# the real node (tests/cluster, make cluster-up): runtime, kube-proxy, image building
((want_test)) && packages+=(containerd runc nftables conntrack debootstrap busybox-static)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python environment with the driver installed (stubs generated at build time).
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.flotilla-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || setup.py -nt $stamp || proto/csi.proto -nt $stamp ]]; then
    log "installing flotilla-csi and its development tools into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
# editable installs keep the generated stubs in the tree; make sure they exist
[[ -f csi/_proto/csi_pb2.py ]] || .venv/bin/python setup.py -q generate_proto

if ((want_test)); then
    GOBIN=$(go env GOPATH)/bin
    if [[ ! -x $GOBIN/csi-sanity ]] || ! "$GOBIN/csi-sanity" -h 2>&1 | grep -q csi.testvolumeaccesstype; then
        log "building csi-sanity $CSI_SANITY_VERSION"
        go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@${CSI_SANITY_VERSION}"
    fi
    scripts/e2e-tools.sh >/dev/null  # kine, kube-apiserver & co., CSI sidecars, helm (tests/e2e)
    scripts/s3-test-server.sh >/dev/null  # gofakes3: the S3 server of tests/backup
    scripts/vm-setup.sh  # qemu, busybox, lvm2, a cached Debian kernel (tests/vm)
fi
log "ready"

#!/usr/bin/env bash
# Idempotent set-up of the tests/vm tier (as root): qemu, busybox and LVM tools from
# Debian, and a Debian kernel package (apt-get download, unpacked, cached), because the
# host kernel may lack device-mapper or NFS. Cached under $FLOTILLA_VM_CACHE
# (default /var/cache/flotilla/vm):
#   <cache>/kernel/<version>/boot/vmlinuz-<version>, lib/modules/<version>/...
#   <cache>/kernel/current -> <version>
# tests/vm/guest.py builds the uncompressed vmlinux and the initramfs from it on demand.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${FLOTILLA_VM_CACHE:-/var/cache/flotilla/vm}
log() { printf '[vm-setup] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    echo "vm-setup.sh needs root (apt-get)" >&2
    exit 1
fi

# qemu (TCG), a static busybox for the initramfs, and what the guest tests run (the host's
# own binaries run inside the guest): LVM2 with the thin-pool tools, filesystems.
packages=(qemu-system-x86 busybox-static lvm2 thin-provisioning-tools e2fsprogs xfsprogs
          nfs-kernel-server nfs-common rpcbind)  # the guest runs the host's own nfsd tools
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
updated=0
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    updated=1
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The kernel: whatever linux-image-amd64 currently depends on, unpacked once.
mkdir -p "$CACHE/kernel"
image=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true)
if [[ -z $image ]]; then
    if ((!updated)); then apt-get update -qq; updated=1; fi
    image=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true)
fi
[[ -n $image ]] || { echo "vm-setup: cannot resolve linux-image-amd64" >&2; exit 1; }
version=${image#linux-image-}
dest="$CACHE/kernel/$version"
if [[ ! -f $dest/.complete ]]; then
    log "downloading and unpacking $image"
    tmp=$(mktemp -d "$CACHE/kernel/.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -q "$image" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    deb=$(ls "$tmp"/*.deb 2>/dev/null | head -n1 || true)
    if [[ -z $deb ]]; then
        # the index may be older than the archive: refresh it once and retry
        apt-get update -qq
        (cd "$tmp" && apt-get download -q "$image" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
        deb=$(ls "$tmp"/*.deb 2>/dev/null | head -n1 || true)
    fi
    [[ -n $deb ]] || { echo "vm-setup: apt-get download $image failed" >&2; exit 1; }
    dpkg-deb -x "$deb" "$tmp/root"
    rm -rf "$dest"
    mkdir -p "$dest"
    mv "$tmp/root/boot" "$tmp/root/lib" "$dest/"
    touch "$dest/.complete"
    rm -rf "$tmp"
    trap - EXIT
fi
ln -sfn "$version" "$CACHE/kernel/current"

# Build the uncompressed kernel and the base initramfs now, so the first test does not.
if [[ -x .venv/bin/python ]]; then
    .venv/bin/python -m tests.vm.guest prepare
fi
log "ready: kernel $version in $dest"

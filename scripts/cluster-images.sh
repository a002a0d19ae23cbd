#!/usr/bin/env bash
# Build the images of the real node (tests/cluster, make cluster-up) without a registry.
#
#   scripts/cluster-images.sh          build what is missing; print the image directory
#   scripts/cluster-images.sh --print  only print the image directory
#
# Every image is an OCI archive in $FLOTILLA_CLUSTER_CACHE/images (default
# /var/cache/flotilla/cluster/images), imported into containerd by the cluster rig, with a
# stamp naming what it was built from; an image is rebuilt only when its stamp differs.
# images.env there lists the image names for the chart's values.
#
# - flotilla: the Containerfile's contents, offline. A Debian bookworm root (debootstrap,
#   from the machine's own apt mirror) with the pool tools, and /opt/flotilla, a venv with
#   the project's wheel (built here) and its dependencies. Two layers: the Debian root
#   (cached by its package list) and the venv (rebuilt when the driver's sources change).
# - the sidecars: one static binary each, from scripts/e2e-tools.sh (built from their
#   tags) and ../shared/bin (node-driver-registrar, livenessprobe: the module proxy
#   refuses them).
# - pause (scripts/cluster/pause, built with Go) and busybox (Debian's busybox-static) for
#   workload pods.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${FLOTILLA_CLUSTER_CACHE:-/var/cache/flotilla/cluster}
OUT=$CACHE/images
if [[ "${1:-}" == "--print" ]]; then
    echo "$OUT"
    exit 0
fi
REGISTRY=flotilla.local   # a name only: nothing is pulled
SUITE=bookworm
PACKAGES=(python3 python3-venv util-linux mount e2fsprogs xfsprogs btrfs-progs lvm2
          thin-provisioning-tools nfs-common ca-certificates)
# prebuilt kubernetes-csi binaries (see their README), beside the checkout; a clone
# elsewhere (under /tmp) finds them beside the local checkout it was cloned from, or is
# told with FLOTILLA_SHARED_BIN, or uses what an earlier run unpacked
shared_bin() {
    [[ -n ${FLOTILLA_SHARED_BIN:-} ]] && { echo "$FLOTILLA_SHARED_BIN"; return; }
    [[ -d $REPO/../shared/bin ]] && { echo "$REPO/../shared/bin"; return; }
    local origin
    origin=$(git -C "$REPO" remote get-url origin 2>/dev/null || true)
    origin=${origin#file://}
    if [[ $origin == /* && -d $origin/../shared/bin ]]; then
        echo "$origin/../shared/bin"
        return
    fi
    echo "$REPO/../shared/bin"
}
SHARED=$(shared_bin)

log() { printf '[cluster-images] %s\n' "$*" >&2; }
[[ $(id -u) -eq 0 ]] || { echo "cluster-images.sh needs root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap go xz; do
    command -v $tool >/dev/null || { echo "cluster-images.sh needs $tool (scripts/setup.sh --test installs it)" >&2; exit 1; }
done
mkdir -p "$OUT" "$CACHE/build"
start=$SECONDS
E2E_BIN=$(scripts/e2e-tools.sh --print)
OCI="python3 $REPO/scripts/cluster/oci.py"

current() { [[ -f $OUT/$1.tar && "$(cat "$OUT/$1.stamp" 2>/dev/null)" == "$2" ]]; }
stamp() { echo "$2" >"$OUT/$1.stamp"; }
hash() { sha256sum | cut -c1-16; }

# layer_of DIR OUT.tar: a reproducible uncompressed layer of DIR's contents
layer_of() {
    tar --numeric-owner --xattrs --sort=name --mtime=@0 -C "$1" -cf "$2" .
}

# ---- single-binary images ---------------------------------------------------------------
# binary_image NAME TAG SOURCE: an image holding SOURCE as /NAME (and the libraries it
# links), entrypoint /NAME
binary_image() {
    local name=$1 tag=$2 src=$3 key dir
    # (ldd's load addresses change with every run: left out of the key)
    key=$( (cat "$src"; ldd "$src" 2>/dev/null | sed 's/ (0x[0-9a-f]*)//' || true) | hash)
    current "$name" "$tag $key" && return 0
    log "image $REGISTRY/$name:$tag"
    dir=$(mktemp -d "$CACHE/build/$name.XXXX")
    mkdir -p "$dir/root/tmp"
    chmod 1777 "$dir/root/tmp"
    install -m 0755 "$src" "$dir/root/$name"
    # a dynamically linked binary (some of ../shared/bin) brings the host's libraries
    for lib in $(ldd "$src" 2>/dev/null | grep -o '/[^ ]*' || true); do
        mkdir -p "$dir/root$(dirname "$lib")"
        cp -L "$lib" "$dir/root$lib"
    done
    layer_of "$dir/root" "$dir/layer.tar"
    $OCI "$OUT/$name.tar" "$REGISTRY/$name:$tag" --layer "$dir/layer.tar" \
        --entrypoint "[\"/$name\"]"
    rm -rf "$dir"
    stamp "$name" "$tag $key"
}

# the sidecars scripts/e2e-tools.sh built: its .version file is written after the binary
for name in csi-provisioner csi-snapshotter csi-resizer snapshot-controller; do
    if [[ ! -x $E2E_BIN/$name || ! -s $E2E_BIN/$name.version ]]; then
        echo "cluster-images: $E2E_BIN/$name (and its .version) missing: run scripts/e2e-tools.sh first" >&2
        exit 1
    fi
    binary_image "$name" "$(cat "$E2E_BIN/$name.version")" "$E2E_BIN/$name"
done

# the prebuilt ones: checked against SHA256SUMS, unpacked into the cache with their tag
# (the README's table: | file | upstream | tag | ...)
for name in csi-node-driver-registrar livenessprobe; do
    unpacked=$CACHE/build/$name
    if [[ -f $SHARED/$name.xz ]]; then
        if [[ ! -x $unpacked || ! -s $unpacked.tag || $SHARED/$name.xz -nt $unpacked ]]; then
            (cd "$SHARED" && grep " $name.xz\$" SHA256SUMS | sha256sum -c --quiet -)
            xz -dc "$SHARED/$name.xz" >"$unpacked.part"
            chmod +x "$unpacked.part"
            awk -F'|' -v f="$name.xz" '$2 ~ f {gsub(/ /,"",$4); print $4}' "$SHARED/README.md" \
                >"$unpacked.tag"
            [[ -s $unpacked.tag ]] || { echo "cluster-images: no tag for $name.xz in $SHARED/README.md" >&2; exit 1; }
            mv "$unpacked.part" "$unpacked"
        fi
    elif [[ -x $unpacked && -s $unpacked.tag ]]; then
        log "$name: $SHARED is not here; using the one unpacked before ($(cat "$unpacked.tag"))"
    else
        echo "cluster-images: $SHARED/$name.xz is missing (the module proxy refuses $name, so it comes prebuilt; looked beside this checkout and beside the one it was cloned from): set FLOTILLA_SHARED_BIN to the directory that holds it" >&2
        exit 1
    fi
    binary_image "$name" "$(cat "$unpacked.tag")" "$unpacked"
done

# ---- pause -----------------------------------------------------------------------------
PAUSE_TAG=3.10
(cd scripts/cluster/pause && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' \
    -o "$CACHE/build/pause" .)
binary_image pause "$PAUSE_TAG" "$CACHE/build/pause"

# ---- busybox (workload pods) -----------------------------------------------------------
BUSYBOX_TAG=$(dpkg-query -W -f='${Version}' busybox-static | sed 's/^1://; s/[-+].*//')
key="$BUSYBOX_TAG $(hash </bin/busybox)"
if ! current busybox "$key"; then
    log "image $REGISTRY/busybox:$BUSYBOX_TAG"
    dir=$(mktemp -d "$CACHE/build/busybox.XXXX")
    mkdir -p "$dir/root/bin" "$dir/root/tmp" "$dir/root/etc"
    chmod 1777 "$dir/root/tmp"
    install -m 0755 /bin/busybox "$dir/root/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [[ $applet == busybox ]] || ln -s busybox "$dir/root/bin/$applet"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$dir/root/etc/passwd"
    echo 'root:x:0:' >"$dir/root/etc/group"
    layer_of "$dir/root" "$dir/layer.tar"
    $OCI "$OUT/busybox.tar" "$REGISTRY/busybox:$BUSYBOX_TAG" --layer "$dir/layer.tar" \
        --cmd '["sh"]' --env PATH=/bin
    rm -rf "$dir"
    stamp busybox "$key"
fi

# ---- flotilla --------------------------------------------------------------------------
mirror() {  # the machine's own Debian mirror, from its apt sources
    local m
    m=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [[ -n $m ]] || m=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [[ -n $m ]] || { echo "no Debian mirror in /etc/apt/sources*" >&2; exit 1; }
    echo "$m"
}
# Layers have every mtime at 0 (reproducible), which makes timestamp-checked .pyc files
# stale: Python would compile every module again at each start (minutes on a slow node).
# So every .pyc in the images is made with --invalidation-mode unchecked-hash (PYC below:
# part of the cache key).
PYC="compileall -q -f --invalidation-mode unchecked-hash"
base_key=$(printf '%s\n' "$SUITE" "${PACKAGES[@]}" "$PYC" | hash)
BASE=$CACHE/base-$base_key
if [[ ! -f $BASE.tar ]]; then
    log "Debian $SUITE root with ${PACKAGES[*]} (debootstrap; a few minutes, once)"
    rm -rf "$BASE.root"
    debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        "$SUITE" "$BASE.root" "$(mirror)" >"$CACHE/build/debootstrap.log" 2>&1 ||
        { tail -20 "$CACHE/build/debootstrap.log" >&2; exit 1; }
    chroot "$BASE.root" apt-get clean
    chroot "$BASE.root" /usr/bin/python3 -m $PYC /usr/lib/python3 /usr/lib/python3.11
    rm -rf "$BASE.root"/var/lib/apt/lists/* "$BASE.root"/var/cache/apt/*.bin \
        "$BASE.root"/usr/share/doc "$BASE.root"/usr/share/man "$BASE.root"/usr/share/locale
    layer_of "$BASE.root" "$BASE.tar.part"
    mv "$BASE.tar.part" "$BASE.tar"
    for old in "$CACHE"/base-*; do  # roots of an older recipe
        [[ $old == "$BASE.tar" || $old == "$BASE.root" ]] || rm -rf "$old"
    done
fi

src_key=$( (echo "$base_key"; find csi proto pyproject.toml setup.py README.md -type f \
             -not -path 'csi/_proto/*' -not -name '*.pyc' -print0 | sort -z |
             xargs -0 sha256sum) | hash)
FLOTILLA_TAG=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("flotilla-csi"))')-$src_key
if ! current flotilla "$FLOTILLA_TAG"; then
    log "image $REGISTRY/flotilla:$FLOTILLA_TAG"
    dir=$(mktemp -d "$CACHE/build/flotilla.XXXX")
    # the project's wheel and its dependencies' wheels, built and fetched on the host
    .venv/bin/pip wheel -q --wheel-dir "$dir/wheels" "$REPO"
    [[ -d $BASE.root/usr ]] || { mkdir -p "$BASE.root" && tar -C "$BASE.root" -xf "$BASE.tar"; }
    rm -rf "$BASE.root/opt/flotilla" "$BASE.root/tmp/wheels"
    cp -r "$dir/wheels" "$BASE.root/tmp/wheels"
    chroot "$BASE.root" /usr/bin/python3 -m venv /opt/flotilla
    chroot "$BASE.root" /opt/flotilla/bin/pip install -q --no-cache-dir --no-index \
        --find-links /tmp/wheels flotilla-csi
    chroot "$BASE.root" /opt/flotilla/bin/python -m $PYC /opt/flotilla/lib
    chroot "$BASE.root" /opt/flotilla/bin/flotilla --version >/dev/null
    mkdir -p "$dir/app/opt"
    mv "$BASE.root/opt/flotilla" "$dir/app/opt/flotilla"
    rm -rf "$BASE.root/tmp/wheels"
    layer_of "$dir/app" "$dir/app.tar"
    $OCI "$OUT/flotilla.tar" "$REGISTRY/flotilla:$FLOTILLA_TAG" \
        --layer "$BASE.tar" --layer "$dir/app.tar" \
        --entrypoint '["/opt/flotilla/bin/flotilla"]' --cmd '["--help"]' \
        --env PATH=/opt/flotilla/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env PYTHONDONTWRITEBYTECODE=1 --env PYTHONUNBUFFERED=1
    rm -rf "$dir"
    stamp flotilla "$FLOTILLA_TAG"
fi

# ---- the names, for the rig and the chart's values -------------------------------------
# (written only when they change: a current cache may be read-only, as in the VM guest)
names=$(
    echo "FLOTILLA_IMAGE=$REGISTRY/flotilla:$(cat "$OUT/flotilla.stamp")"
    for name in csi-provisioner csi-snapshotter csi-resizer snapshot-controller \
                csi-node-driver-registrar livenessprobe pause; do
        var=$(tr 'a-z-' 'A-Z_' <<<"$name")_IMAGE
        echo "$var=$REGISTRY/$name:$(cut -d' ' -f1 "$OUT/$name.stamp")"
    done
    echo "BUSYBOX_IMAGE=$REGISTRY/busybox:$BUSYBOX_TAG"
)
[[ "$(cat "$OUT/images.env" 2>/dev/null)" == "$names" ]] || echo "$names" >"$OUT/images.env"
log "images ready in $OUT ($((SECONDS - start)) s)"
echo "$OUT"

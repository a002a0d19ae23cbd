#!/usr/bin/env bash
# Build the tools of the e2e tier (tests/e2e) with Go, from the Go module proxy.
#
#   scripts/e2e-tools.sh          build what is missing, print the bin directory
#   scripts/e2e-tools.sh --print  only print the bin directory
#
# Idempotent and cached: binaries land in $FLOTILLA_E2E_CACHE/bin (default
# /var/cache/flotilla/e2e/bin), each with a stamp naming the version it was built from;
# a tool is rebuilt only when its stamp differs. Go's module and build caches (GOPATH,
# GOCACHE) make a rebuild after a version bump cheap.
#
# kine, helm, the CNI plugins: `go install` at their tags (no replace directives).
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl
# (k8s.io/kubernetes; the last four serve the real node of tests/cluster), csi-provisioner,
# csi-snapshotter, snapshot-controller, csi-resizer have `replace` directives pointing at
# in-repo staging directories, which `go install pkg@version` refuses. They are built from
# a wrapper module generated here at run time: it requires each tool at its tag and
# repeats the tools' replace blocks, with the local staging paths mapped to the published
# k8s.io/* v0.X.Y modules (and external-snapshotter's ./client to its client/v8 module).
set -euo pipefail

K8S_VERSION=v1.36.1            # kube-apiserver, kube-controller-manager
PROVISIONER_VERSION=v6.3.0     # external-provisioner (built on k8s v1.36.1)
SNAPSHOTTER_VERSION=v8.6.0     # external-snapshotter: csi-snapshotter, snapshot-controller
# The tested set names resizer v2.2.1; that tag is not published as a Go module, so the
# e2e tier builds v2.2.0 (same k8s v0.36.1 libraries). The chart deploys the v2.2.1 image.
RESIZER_VERSION=v2.2.0
KINE_VERSION=v0.17.5
HELM_VERSION=v3.22.0
CNI_PLUGINS_VERSION=v1.9.1     # bridge, host-local, loopback, portmap (tests/cluster)
CNI_PLUGINS=(main/bridge main/loopback ipam/host-local meta/portmap)

CACHE=${FLOTILLA_E2E_CACHE:-/var/cache/flotilla/e2e}
BIN=$CACHE/bin
if [[ "${1:-}" == "--print" ]]; then
    echo "$BIN"
    exit 0
fi

log() { printf '[e2e-tools] %s\n' "$*" >&2; }
command -v go >/dev/null || { echo "e2e-tools.sh needs Go (go on PATH)" >&2; exit 1; }
mkdir -p "$BIN"

# up_to_date TOOL VERSION: the binary exists and was built from VERSION
up_to_date() { [[ -x $BIN/$1 && "$(cat "$BIN/$1.version" 2>/dev/null)" == "$2" ]]; }
stamp() { echo "$2" >"$BIN/$1.version"; }

k8s_ldflags() {  # version strings kube-apiserver & co. report (helm checks kubeVersion)
    local v=$1 minor
    minor=$(cut -d. -f2 <<<"$v")
    printf '%s ' -s -w \
        -X "k8s.io/component-base/version.gitVersion=$v" \
        -X "k8s.io/component-base/version.gitMajor=1" \
        -X "k8s.io/component-base/version.gitMinor=$minor" \
        -X "k8s.io/component-base/version.gitTreeState=clean"
}

start=$SECONDS

# ---- go install: kine (cgo: SQLite) and helm -------------------------------------------
if ! up_to_date kine "$KINE_VERSION"; then
    log "building kine $KINE_VERSION"
    GOBIN=$BIN go install -ldflags '-s -w' "github.com/k3s-io/kine@$KINE_VERSION"
    stamp kine "$KINE_VERSION"
fi
if ! up_to_date helm "$HELM_VERSION"; then
    log "building helm $HELM_VERSION"
    GOBIN=$BIN go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    stamp helm "$HELM_VERSION"
fi

for p in "${CNI_PLUGINS[@]}"; do
    name=${p#*/}
    if ! up_to_date "cni/$name" "$CNI_PLUGINS_VERSION"; then
        log "building CNI plugin $name $CNI_PLUGINS_VERSION"
        mkdir -p "$BIN/cni"
        CGO_ENABLED=0 GOBIN=$BIN/cni go install -ldflags '-s -w' \
            "github.com/containernetworking/plugins/plugins/$p@$CNI_PLUGINS_VERSION"
        stamp "cni/$name" "$CNI_PLUGINS_VERSION"
    fi
done

# ---- the wrapper module for tools with replace directives ------------------------------
declare -A WRAPPED=(
    [kube-apiserver]="k8s.io/kubernetes/cmd/kube-apiserver $K8S_VERSION"
    [kube-controller-manager]="k8s.io/kubernetes/cmd/kube-controller-manager $K8S_VERSION"
    [kube-scheduler]="k8s.io/kubernetes/cmd/kube-scheduler $K8S_VERSION"
    [kubelet]="k8s.io/kubernetes/cmd/kubelet $K8S_VERSION"
    [kube-proxy]="k8s.io/kubernetes/cmd/kube-proxy $K8S_VERSION"
    [kubectl]="k8s.io/kubernetes/cmd/kubectl $K8S_VERSION"
    [csi-provisioner]="github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner $PROVISIONER_VERSION"
    [csi-snapshotter]="github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter $SNAPSHOTTER_VERSION"
    [snapshot-controller]="github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller $SNAPSHOTTER_VERSION"
    [csi-resizer]="github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer $RESIZER_VERSION"
)
todo=()
for tool in "${!WRAPPED[@]}"; do
    read -r _ version <<<"${WRAPPED[$tool]}"
    up_to_date "$tool" "$version" || todo+=("$tool")
done

if ((${#todo[@]})); then
    key=$(printf '%s\n' "$K8S_VERSION" "$PROVISIONER_VERSION" "$SNAPSHOTTER_VERSION" \
          "$RESIZER_VERSION" "$(go env GOVERSION)" | sha256sum | cut -c1-12)
    wrapper=$CACHE/wrapper-$key
    if [[ ! -f $wrapper/.generated ]]; then
        log "generating wrapper module $wrapper"
        rm -rf "$wrapper"
        mkdir -p "$wrapper"
        requires=(
            "k8s.io/kubernetes $K8S_VERSION"
            "github.com/kubernetes-csi/external-provisioner/v6 $PROVISIONER_VERSION"
            "github.com/kubernetes-csi/external-snapshotter/v8 $SNAPSHOTTER_VERSION"
            "github.com/kubernetes-csi/external-snapshotter/client/v8 $SNAPSHOTTER_VERSION"
            "github.com/kubernetes-csi/external-resizer/v2 $RESIZER_VERSION"
        )
        modfiles=()
        for r in "${requires[@]}"; do
            # shellcheck disable=SC2086
            modfiles+=("$(go mod download -json $(tr ' ' '@' <<<"$r") |
                          python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')")
        done
        {
            echo "module flotilla.invalid/e2e-tools"
            echo
            echo "go $(go env GOVERSION | sed 's/^go//')"
            echo
            echo "require ("
            printf '\t%s\n' "${requires[@]}"
            echo ")"
            echo
            # the tools' replace blocks; local paths mapped to published modules
            for f in "${modfiles[@]}"; do go mod edit -json "$f"; done | python3 -c '
import json, sys
staging_version = "v0.%s" % sys.argv[1].split(".", 1)[1]
snap_client = sys.argv[2]
decoder, text, pos, out = json.JSONDecoder(), sys.stdin.read(), 0, {}
while pos < len(text.rstrip()):
    mod, pos = decoder.raw_decode(text, pos)
    while pos < len(text) and text[pos].isspace():
        pos += 1
    for r in mod.get("Replace") or []:
        old, new = r["Old"]["Path"], r["New"]
        if new["Path"].startswith("./staging/src/"):
            target = f"{old} {staging_version}"
        elif new["Path"] == "./client":
            target = f"{old} {snap_client}"
        elif new["Path"].startswith("."):
            sys.exit(f"unexpected local replace {old} => {new}")
        else:
            target = (new["Path"] + " " + new.get("Version", "")).strip()
        if out.setdefault(old, target) != target:
            sys.exit(f"conflicting replaces for {old}: {out[old]} / {target}")
print("replace (")
for old in sorted(out):
    print(f"\t{old} => {out[old]}")
print(")")
' "$K8S_VERSION" "$SNAPSHOTTER_VERSION"
        } >"$wrapper/go.mod"
        touch "$wrapper/.generated"
    fi
    pkgs=()
    for tool in "${todo[@]}"; do
        read -r pkg _ <<<"${WRAPPED[$tool]}"
        pkgs+=("$pkg")
    done
    log "building ${todo[*]} (wrapper module $wrapper)"
    (cd "$wrapper" && CGO_ENABLED=0 go build -mod=mod -ldflags "$(k8s_ldflags "$K8S_VERSION")" \
        -o "$BIN/" "${pkgs[@]}")
    for tool in "${todo[@]}"; do
        read -r _ version <<<"${WRAPPED[$tool]}"
        stamp "$tool" "$version"
    done
fi

log "tools ready in $BIN ($((SECONDS - start)) s)"
echo "$BIN"

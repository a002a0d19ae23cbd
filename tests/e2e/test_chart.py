"""The Helm chart: `helm lint` is clean (default values and every optional object on),
and the rendered manifests kept in deploy/ are current (regenerate: deploy/render.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.cluster import tools_dir
from tests.helpers import REPO

CHART = REPO / "charts" / "flotilla"


def helm(*args: str) -> str:
    binary = tools_dir() / "helm"
    assert os.access(binary, os.X_OK), ("helm is not built: run `scripts/e2e-tools.sh` "
                                        "(scripts/setup.sh --test does)")
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_helm_lint_clean() -> None:
    out = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out
    out = helm("lint", "--strict", str(CHART), "--set",
               "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,"
               "metrics.prometheusRule.enabled=true,controller.replicas=1")
    assert "[WARNING]" not in out and "[ERROR]" not in out


def test_values_schema_rejects_mistakes() -> None:
    binary = tools_dir() / "helm"
    proc = subprocess.run([str(binary), "template", "x", str(CHART), "--kube-version",
                           "1.36.1", "--set", "pools[0].name=Bad_Name,pools[0].type=filepool"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "pattern" in proc.stderr


def test_rendered_manifests_are_current(tmp_path: Path) -> None:
    env = {**os.environ, "HELM": str(tools_dir() / "helm")}
    subprocess.run(["bash", str(REPO / "deploy/render.sh"), str(tmp_path)], check=True,
                   env=env)
    for name in ("crds.yaml", "flotilla.yaml"):
        fresh = (tmp_path / name).read_text()
        kept = (REPO / "deploy" / name).read_text()
        assert fresh == kept, f"deploy/{name} is stale: run deploy/render.sh"


def test_rendered_objects() -> None:
    docs = [d for d in yaml.safe_load_all((REPO / "deploy/flotilla.yaml").read_text()) if d]
    kinds = sorted(d["kind"] for d in docs)
    for kind in ("CSIDriver", "DaemonSet", "Deployment", "StorageClass",
                 "VolumeSnapshotClass", "ClusterRole", "Role", "ConfigMap", "Service"):
        assert kind in kinds
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    containers = {c["name"]: c for c in deploy["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"flotilla", "csi-provisioner", "csi-snapshotter",
                               "csi-resizer", "liveness-probe"}
    prov = containers["csi-provisioner"]["args"]
    for flag in ("--enable-capacity", "--extra-create-metadata", "--strict-topology",
                 "--leader-election=true"):
        assert flag in prov
    assert containers["csi-provisioner"]["image"].endswith(":v6.3.0")
    assert containers["csi-snapshotter"]["image"].endswith(":v8.6.0")
    assert containers["csi-resizer"]["image"].endswith(":v2.2.1")
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    node = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
    assert node["flotilla"]["securityContext"]["privileged"] is True
    kubelet = next(m for m in node["flotilla"]["volumeMounts"] if m["name"] == "kubelet-dir")
    assert kubelet["mountPropagation"] == "Bidirectional"
    assert node["node-driver-registrar"]["image"].endswith(":v2.17.0")
    assert node["liveness-probe"]["image"].endswith(":v2.19.0")
    crds = [d for d in yaml.safe_load_all((REPO / "deploy/crds.yaml").read_text()) if d]
    assert {c["spec"]["names"]["kind"] for c in crds} == {
        "FlotillaVolume", "FlotillaSnapshot", "FlotillaNode"}
    for crd in crds:
        assert crd["spec"]["scope"] == "Cluster"


def render(values: dict[str, object], tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    out = helm("template", "x", str(CHART), "--kube-version", "1.36.1", "-f", str(path))
    return [d for d in yaml.safe_load_all(out) if d]


def pod_spec(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = next(d for d in docs if d["kind"] == kind)["spec"]["template"]["spec"]
    return spec


def test_each_pool_type_gets_what_it_needs(tmp_path: Path) -> None:
    """lvmthin: the host's lvm run, lock and config dirs (and a lock_dir of its own);
    nfs: the node on the host's network, the controller privileged root; filepool alone:
    neither, and a controller without capabilities."""
    plain = render({}, tmp_path)
    node, ctrl = pod_spec(plain, "DaemonSet"), pod_spec(plain, "Deployment")
    assert "hostNetwork" not in node
    assert not [v for v in node["volumes"] if v["name"].startswith("lvm-")]
    assert ctrl["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert ctrl["terminationGracePeriodSeconds"] > 60  # the driver's 60 s drain

    docs = render({"pools": [
        {"name": "thin", "type": "lvmthin", "volume_group": "vg", "thin_pool": "tp"},
        {"name": "thin2", "type": "lvmthin", "volume_group": "vg2", "thin_pool": "tp",
         "lock_dir": "/srv/locks/"},
        {"name": "thin3", "type": "lvmthin", "volume_group": "vg3", "thin_pool": "tp",
         "lock_dir": "/var/lib/flotilla/locks"},
        {"name": "shared", "type": "nfs", "server": "10.0.0.5", "share": "/export"}]},
        tmp_path)
    node, ctrl = pod_spec(docs, "DaemonSet"), pod_spec(docs, "Deployment")
    host = {v["name"]: v["hostPath"]["path"] for v in node["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in node["containers"][0]["volumeMounts"]}
    lvm = sorted(host[n] for n in host if n.startswith("lvm-"))
    assert lvm == ["/etc/lvm", "/run/lock/lvm", "/run/lvm", "/srv/locks"]
    assert all(mounts[n] == host[n] for n in host if n.startswith("lvm-"))
    assert (node["hostNetwork"], node["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")
    ports = {p["containerPort"] for c in node["containers"] for p in c.get("ports", [])}
    assert not ports & {9808, 9809}, ports  # other drivers' sidecar defaults on the host
    sec = ctrl["containers"][0]["securityContext"]
    assert (sec["privileged"], sec["runAsUser"], sec["runAsNonRoot"]) == (True, 0, False)
    # root's socket opens to the pod's group, the sidecars' (they are not root: found on
    # the real node, where every sidecar got "permission denied" on the socket)
    group = ctrl["securityContext"]["runAsGroup"]
    assert f"--socket-group={group}" in ctrl["containers"][0]["args"]
    assert all(c.get("securityContext", {}).get("runAsUser") is None
               for c in ctrl["containers"][1:])
    assert not [a for a in pod_spec(plain, "Deployment")["containers"][0]["args"]
                if a.startswith("--socket-group")]
    assert "hostNetwork" not in ctrl  # its export mount stays in its own namespaces
    for spec in (node, ctrl):
        probe = next(c for c in spec["containers"] if c["name"] == "liveness-probe")
        assert "--probe-timeout=3s" in probe["args"]
        kubelet_probe = spec["containers"][0]["livenessProbe"]
        assert kubelet_probe["timeoutSeconds"] > 3
        # a slow start (pools starting) is covered by a startup probe, not a restart loop
        for c in spec["containers"]:
            if "livenessProbe" in c:
                start = c["startupProbe"]
                assert start["periodSeconds"] * start["failureThreshold"] >= 300, c["name"]
                assert "initialDelaySeconds" not in c["livenessProbe"], c["name"]

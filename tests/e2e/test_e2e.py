"""End to end on a real control plane: the chart installed with helm, the driver's
controller and node agent as processes, the CSI sidecars pointed at their sockets.

Played by the test: the scheduler (annotating a claim with the selected node), the
kubelet (Node and CSINode objects, NodeStage/NodePublish/NodeExpand on the node
socket). Everything else is the real thing: kube-apiserver validating every rendered
object, the PV binder, external-provisioner with topology and capacity, the snapshot
controller and sidecar, the resizer, the chart's RBAC (the driver and the sidecars run
with tokens of the chart's ServiceAccounts).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi._proto import csi_pb2
from tests.conftest import require_root
from tests.e2e.cluster import ControlPlane, Kube, free_port, missing_tools, snapshot_crds
from tests.helpers import (
    REPO,
    CSIClient,
    GiB,
    loop_filesystem,
    loops_backed_by,
    mount_cap,
    mounts_under,
    run,
)

pytestmark = pytest.mark.root

NAMESPACE = "flotilla-system"
NODE = "e2e-node-1"
NODE2 = "e2e-node-2"  # a second node agent with its own pool: restores from backups
TOPOLOGY_KEY = "topology.flotilla.csi.io/node"
TOOLS = ["kine", "kube-apiserver", "kube-controller-manager", "csi-provisioner",
         "csi-snapshotter", "snapshot-controller", "csi-resizer", "helm"]
EXAMPLES = REPO / "deploy" / "examples"


def example(name: str, namespace: str) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    obj["metadata"]["namespace"] = namespace
    return obj


def replace_args(args: list[str], changes: dict[str, str | None]) -> list[str]:
    """Rewrite ``--flag=value`` args of a rendered container: value or drop (None)."""
    out = []
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in changes:
            if changes[flag] is not None:
                out.append(f"{flag}={changes[flag]}")
        else:
            out.append(arg)
    return out


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    for c in workload["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name}")


@dataclass
class Rig:
    cp: ControlPlane
    kube: Kube
    work: Path
    pool_dir: Path
    kubelet: Path
    node: CSIClient
    node_socket: Path
    node2: CSIClient
    pool_dir2: Path
    backup_dir: Path


def helm(cp: ControlPlane, *args: str) -> str:
    proc = subprocess.run([str(cp.bindir / "helm"), "--kubeconfig", str(cp.admin_kubeconfig),
                           *args], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@contextlib.contextmanager
def e2e_workdir() -> Iterator[Path]:
    base = Path("/var/tmp/flotilla-tests")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base, prefix="e2e-"))
    try:
        yield work
    finally:
        # whatever a failed step left mounted (kubelet paths) goes first, deepest first
        for m in sorted(mounts_under(str(work)), key=len, reverse=True):
            if "host-xfs" not in m or m.count("/") > str(work).count("/") + 1:
                run("umount", m, check=False)
        for dev in loops_backed_by(str(work / "host-xfs") + "/"):
            run("losetup", "--detach", f"/dev/{dev}", check=False)
        leaked = [m for m in mounts_under(str(work)) if not m.endswith("host-xfs")]
        if not leaked:
            shutil.rmtree(work, ignore_errors=True)
        assert not leaked, f"e2e leaked mounts: {leaked}"


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    require_root()
    missing = missing_tools(TOOLS)
    assert not missing, (f"e2e tools missing: {', '.join(missing)}; run "
                         "`scripts/e2e-tools.sh` (scripts/setup.sh --test does)")
    with e2e_workdir() as work, loop_filesystem(work, "xfs", size=8 * GiB,
                                                name="host-xfs") as mnt:
        cp = ControlPlane(work)
        try:
            yield setup(cp, work, mnt)
        finally:
            cp.stop()
            leftovers = loops_backed_by(str(mnt) + "/")
            for dev in leftovers:
                run("losetup", "--detach", f"/dev/{dev}", check=False)
            assert not leftovers, f"e2e left loop devices attached: {leftovers}"


def setup(cp: ControlPlane, work: Path, mnt: Path) -> Rig:
    t0 = time.monotonic()
    cp.start()
    kube = cp.kube
    for crd in snapshot_crds():
        kube.create(yaml.safe_load(crd.read_text()))
    kube.wait("snapshot CRDs established", lambda: all(
        any(c["type"] == "Established" and c["status"] == "True"
            for c in ((kube.get("CustomResourceDefinition", n) or {}).get("status") or {})
            .get("conditions") or [])
        for n in ("volumesnapshots.snapshot.storage.k8s.io",
                  "volumesnapshotclasses.snapshot.storage.k8s.io",
                  "volumesnapshotcontents.snapshot.storage.k8s.io")))

    kubelet = work / "kubelet"
    kubelet.mkdir()
    pool_dir = mnt / "pool"
    backup_dir = work / "backups"  # a dir backup target (an NFS mount on real nodes)
    values = {
        "kubeletDir": str(kubelet), "stateDir": str(work / "node-state"),
        "pools": [{"name": "default", "type": "filepool", "path": str(pool_dir),
                   "storageClass": {"fsType": "xfs"}}],
        "backupTargets": [{"name": "nas", "type": "dir", "path": str(backup_dir)}],
        "controller": {"kubeTimeout": 20, "sidecarTimeout": "30s"},
        "node": {"capacityInterval": 5},
    }
    values_file = work / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm(cp, "install", "flotilla", str(REPO / "charts/flotilla"), "--namespace", NAMESPACE,
         "--create-namespace", "--values", str(values_file))

    # the kubelet's part: a Node with the topology label, the driver in its CSINode
    for node in (NODE, NODE2):
        kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": node, "labels": {"kubernetes.io/hostname": node, TOPOLOGY_KEY: node}}})
        kube.create({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
                     "metadata": {"name": node},
                     "spec": {"drivers": [{"name": "flotilla.csi.io", "nodeID": node,
                                           "topologyKeys": [TOPOLOGY_KEY]}]}})

    # what the pods would mount: the ConfigMap, their ServiceAccount tokens
    config = kube.get("ConfigMap", "flotilla-config", NAMESPACE)["data"]["pools.yaml"]
    (work / "pools.yaml").write_text(config)
    # the second node: the same configuration, its own pool directory
    config2 = yaml.safe_load(config)
    assert config2["backup_targets"] == [{"name": "nas", "type": "dir",
                                          "path": str(backup_dir)}]
    pool_dir2 = mnt / "pool-2"
    config2["pools"][0]["path"] = str(pool_dir2)
    (work / "pools-2.yaml").write_text(yaml.safe_dump(config2))
    ctrl_kc = cp.service_account_kubeconfig(NAMESPACE, "flotilla-controller")
    node_kc = cp.service_account_kubeconfig(NAMESPACE, "flotilla-node")
    deploy = kube.request("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/"
                                 "flotilla-controller")
    daemonset = kube.request("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/"
                                    "flotilla-node")

    node_sock, ctrl_sock = work / "node.sock", work / "controller.sock"
    node2_sock = work / "node-2.sock"
    for name, workload, sock, kc, node_id, conf in (
            ("flotilla-node", daemonset, node_sock, node_kc, NODE, "pools.yaml"),
            ("flotilla-node-2", daemonset, node2_sock, node_kc, NODE2, "pools-2.yaml"),
            ("flotilla-controller", deploy, ctrl_sock, ctrl_kc, "e2e-controller",
             "pools.yaml")):
        args = replace_args(container(workload, "flotilla")["args"], {
            "--endpoint": f"unix://{sock}", "--node-id": node_id,
            "--pool-config": str(work / conf),
            "--state-dir": str(work / f"{name}-state"),
            "--metrics-address": f"127.0.0.1:{free_port()}", "--log-format": "text",
        })
        cp.spawn(name, [sys.executable, "-m", "csi.server", *args, f"--kubeconfig={kc}"])
        cp.kube.wait(f"{name} socket", lambda s=sock: (cp.check_alive(), s.exists())[1],
                     timeout=60)

    env = {"NAMESPACE": NAMESPACE}
    for sidecar, extra in (("csi-provisioner", ["--capacity-poll-interval=3s"]),
                           ("csi-snapshotter", []), ("csi-resizer", [])):
        args = replace_args(container(deploy, sidecar)["args"], {
            "--csi-address": str(ctrl_sock),
            "--http-endpoint": f"127.0.0.1:{free_port()}",
            # no pod owns the CSIStorageCapacity objects of a process
            "--capacity-ownerref-level": "-1",
        })
        cp.spawn(sidecar, [str(cp.bindir / sidecar), *args, *extra, f"--kubeconfig={ctrl_kc}",
                           "--v=3"], env)
    channel = grpc.insecure_channel(f"unix://{node_sock}")
    grpc.channel_ready_future(channel).result(timeout=30)
    channel2 = grpc.insecure_channel(f"unix://{node2_sock}")
    grpc.channel_ready_future(channel2).result(timeout=30)
    print(f"e2e control plane, chart and driver up in {time.monotonic() - t0:.1f}s")
    return Rig(cp=cp, kube=kube, work=work, pool_dir=pool_dir, kubelet=kubelet,
               node=CSIClient(channel), node_socket=node_sock, node2=CSIClient(channel2),
               pool_dir2=pool_dir2, backup_dir=backup_dir)


# ---- the kubelet's node calls -------------------------------------------------------------

def _paths(rig: Rig, pv: dict[str, Any]) -> tuple[str, str]:
    name = pv["metadata"]["name"]
    staging = rig.kubelet / "plugins/kubernetes.io/csi/flotilla.csi.io" / name / "globalmount"
    target = rig.kubelet / "pods/e2e-pod" / "volumes/kubernetes.io~csi" / name / "mount"
    return str(staging), str(target)


def stage_and_publish(rig: Rig, pv: dict[str, Any], client: CSIClient | None = None) -> str:
    node = client or rig.node
    csi = pv["spec"]["csi"]
    staging, target = _paths(rig, pv)
    cap = mount_cap(csi.get("fsType", ""))
    node.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=csi["volumeHandle"], staging_target_path=staging, volume_capability=cap,
        volume_context=csi.get("volumeAttributes", {})))
    node.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=csi["volumeHandle"], staging_target_path=staging, target_path=target,
        volume_capability=cap, volume_context=csi.get("volumeAttributes", {})))
    return target


def unpublish_and_unstage(rig: Rig, pv: dict[str, Any],
                          client: CSIClient | None = None) -> None:
    node = client or rig.node
    vid = pv["spec"]["csi"]["volumeHandle"]
    staging, target = _paths(rig, pv)
    node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=vid, target_path=target))
    node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vid, staging_target_path=staging))


def bound_pv(rig: Rig, claim: str, namespace: str) -> dict[str, Any]:
    def bound() -> Any:
        rig.cp.check_alive()
        pvc = rig.kube.get("PersistentVolumeClaim", claim, namespace)
        if pvc and pvc.get("status", {}).get("phase") == "Bound":
            return rig.kube.get("PersistentVolume", pvc["spec"]["volumeName"])
        return None
    pv: dict[str, Any] = rig.kube.wait(f"claim {claim} to be Bound", bound, timeout=120)
    return pv


def pv_node(pv: dict[str, Any]) -> str:
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    expr = terms[0]["matchExpressions"][0]
    assert expr["key"] == TOPOLOGY_KEY
    node: str = expr["values"][0]
    return node


# ---- the tests ----------------------------------------------------------------------------

def test_chart_objects_and_capacity(rig: Rig) -> None:
    kube = rig.kube
    driver = kube.get("CSIDriver", "flotilla.csi.io")
    assert driver["spec"]["storageCapacity"] is True
    assert driver["spec"]["attachRequired"] is False
    sc = kube.get("StorageClass", "flotilla-default")
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowVolumeExpansion"] is True
    assert kube.get("VolumeSnapshotClass", "flotilla")["driver"] == "flotilla.csi.io"
    for crd in ("flotillavolumes", "flotillasnapshots", "flotillanodes"):
        assert kube.get("CustomResourceDefinition", f"{crd}.flotilla.csi.io")

    fnode = kube.wait("the node agent's capacity report", lambda: (
        (n := kube.get("FlotillaNode", NODE)) and n.get("status", {}).get("pools") and n),
        timeout=60)
    pool = fnode["status"]["pools"][0]
    assert pool["name"] == "default" and pool["up"] is True and pool["available"] > 0

    def capacities() -> list[Any]:
        rig.cp.check_alive()
        return [c for c in kube.list("CSIStorageCapacity", NAMESPACE)
                if c["storageClassName"] == "flotilla-default"
                and c.get("capacity") not in (None, "0")]
    caps = kube.wait("CSIStorageCapacity for flotilla-default", capacities, timeout=90)
    assert {TOPOLOGY_KEY: NODE} in [c["nodeTopology"]["matchLabels"] for c in caps]


def test_volume_snapshot_restore_resize(rig: Rig) -> None:
    kube, ns = rig.kube, "e2e"
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

    # PVC (WaitForFirstConsumer): the scheduler's choice, then provisioning on that node
    kube.create(example("pvc.yaml", ns))
    kube.patch("PersistentVolumeClaim", "data", {"metadata": {"annotations": {
        "volume.kubernetes.io/selected-node": NODE}}}, ns)
    pv = bound_pv(rig, "data", ns)
    assert pv_node(pv) == NODE
    assert pv["spec"]["capacity"]["storage"] == "1Gi"
    vid = pv["spec"]["csi"]["volumeHandle"]
    fvol = kube.get("FlotillaVolume", pv["metadata"]["name"])
    assert fvol["status"]["phase"] == "Ready" and fvol["status"]["volumeId"] == vid
    assert fvol["spec"]["node"] == NODE

    target = stage_and_publish(rig, pv)
    payload = os.urandom(1 << 20)
    Path(target, "payload.bin").write_bytes(payload)
    os.sync()

    # snapshot -> readyToUse, held on the node
    kube.create(example("volumesnapshot.yaml", ns))
    snap = kube.wait("VolumeSnapshot readyToUse", lambda: (
        (s := kube.get("VolumeSnapshot", "data-snap", ns))
        and s.get("status", {}).get("readyToUse") and s), timeout=120)
    content = kube.get("VolumeSnapshotContent", snap["status"]["boundVolumeSnapshotContentName"])
    snap_id = content["status"]["snapshotHandle"]
    fsnaps = [s for s in kube.list("FlotillaSnapshot")
              if s.get("status", {}).get("snapshotId") == snap_id]
    assert len(fsnaps) == 1 and fsnaps[0]["spec"]["node"] == NODE

    # restore: a new claim from the snapshot holds the same data, on the snapshot's node
    kube.create(example("restore-pvc.yaml", ns))
    kube.patch("PersistentVolumeClaim", "data-restored", {"metadata": {"annotations": {
        "volume.kubernetes.io/selected-node": NODE}}}, ns)
    restored = bound_pv(rig, "data-restored", ns)
    assert pv_node(restored) == NODE
    assert restored["spec"]["csi"]["volumeHandle"] != vid
    restored_target = stage_and_publish(rig, restored)
    assert Path(restored_target, "payload.bin").read_bytes() == payload

    # resize: PV grows (resizer -> ControllerExpandVolume -> node agent), then the node
    # grows the filesystem (NodeExpandVolume, as kubelet would)
    kube.patch("PersistentVolumeClaim", "data", {"spec": {"resources": {"requests": {
        "storage": "2Gi"}}}}, ns)
    kube.wait("PV grown to 2Gi", lambda: (rig.cp.check_alive(), kube.get(
        "PersistentVolume", pv["metadata"]["name"])["spec"]["capacity"]["storage"]
        == "2Gi")[1], timeout=120)
    assert kube.get("FlotillaVolume", pv["metadata"]["name"])["status"]["size"] == 2 * GiB
    rig.node.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vid, volume_path=target, capacity_range=csi_pb2.CapacityRange(
            required_bytes=2 * GiB)))
    st = os.statvfs(target)
    assert st.f_blocks * st.f_frsize > int(1.8 * GiB), "filesystem did not grow"
    assert Path(target, "payload.bin").read_bytes() == payload

    # Events on the resources tell what the node agent did
    reasons = {e["reason"] for e in kube.list("Event", "default")
               if e["involvedObject"].get("kind") == "FlotillaVolume"}
    assert {"Provisioned", "Expanded"} <= reasons

    # delete everything as a user would: the pool ends empty
    unpublish_and_unstage(rig, restored)
    unpublish_and_unstage(rig, pv)
    kube.delete("PersistentVolumeClaim", "data-restored", ns)
    kube.delete("VolumeSnapshot", "data-snap", ns)
    kube.delete("PersistentVolumeClaim", "data", ns)

    def all_gone() -> bool:
        rig.cp.check_alive()
        return not (kube.list("PersistentVolume") or kube.list("FlotillaVolume")
                    or kube.list("FlotillaSnapshot") or kube.list("VolumeSnapshotContent"))
    kube.wait("PVs, contents and Flotilla resources to be deleted", all_gone, timeout=120)
    assert os.listdir(rig.pool_dir / "volumes") == []
    assert os.listdir(rig.pool_dir / "snapshots") == []


def test_backup_class_restores_on_the_other_node(rig: Rig) -> None:
    """A VolumeSnapshot of the backup class is uploaded to the target by the node that
    holds it; a PVC from it scheduled on the *other* node is restored there from the
    target, with the same data."""
    kube, ns = rig.kube, "e2e-backup"
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    assert kube.get("VolumeSnapshotClass", "flotilla-backup")["parameters"] == {
        "backupTarget": "nas"}
    pvc = example("pvc.yaml", ns)
    kube.create(pvc)
    kube.patch("PersistentVolumeClaim", "data", {"metadata": {"annotations": {
        "volume.kubernetes.io/selected-node": NODE}}}, ns)
    pv = bound_pv(rig, "data", ns)
    assert pv_node(pv) == NODE
    target = stage_and_publish(rig, pv)
    payload = os.urandom(3 << 20)
    Path(target, "payload.bin").write_bytes(payload)
    os.sync()

    snapshot = example("volumesnapshot.yaml", ns)
    snapshot["spec"]["volumeSnapshotClassName"] = "flotilla-backup"
    kube.create(snapshot)
    snap = kube.wait("VolumeSnapshot of the backup class readyToUse", lambda: (
        rig.cp.check_alive(), (s := kube.get("VolumeSnapshot", "data-snap", ns))
        and s.get("status", {}).get("readyToUse") and s)[1], timeout=180)
    content = kube.get("VolumeSnapshotContent", snap["status"]["boundVolumeSnapshotContentName"])
    snap_id = content["status"]["snapshotHandle"]
    assert (rig.backup_dir / "manifests" / f"{snap_id}.json").exists()
    fsnap = next(s for s in kube.list("FlotillaSnapshot")
                 if s.get("status", {}).get("snapshotId") == snap_id)
    assert fsnap["spec"]["node"] == NODE and fsnap["status"]["readyToUse"] is True
    assert list(rig.backup_dir.glob("chunks/*/*"))

    # the scheduler puts the restoring pod on the other node: restored from the target
    kube.create(example("restore-pvc.yaml", ns))
    kube.patch("PersistentVolumeClaim", "data-restored", {"metadata": {"annotations": {
        "volume.kubernetes.io/selected-node": NODE2}}}, ns)
    restored = bound_pv(rig, "data-restored", ns)
    assert pv_node(restored) == NODE2
    fvol = kube.get("FlotillaVolume", restored["metadata"]["name"])
    assert fvol["spec"]["node"] == NODE2 and fvol["status"]["phase"] == "Ready"
    assert os.listdir(rig.pool_dir2 / "snapshots") == []  # node 2 never had the snapshot
    restored_target = stage_and_publish(rig, restored, rig.node2)
    assert Path(restored_target, "payload.bin").read_bytes() == payload

    unpublish_and_unstage(rig, restored, rig.node2)
    unpublish_and_unstage(rig, pv)
    kube.delete("PersistentVolumeClaim", "data-restored", ns)
    kube.delete("VolumeSnapshot", "data-snap", ns)
    kube.delete("PersistentVolumeClaim", "data", ns)

    def all_gone() -> bool:
        rig.cp.check_alive()
        return not (kube.list("PersistentVolume") or kube.list("FlotillaVolume")
                    or kube.list("FlotillaSnapshot") or kube.list("VolumeSnapshotContent"))
    kube.wait("PVs, contents and Flotilla resources to be deleted", all_gone, timeout=120)
    # the snapshot's deletion removed its backup: manifest, then (in the background) chunks
    assert list(rig.backup_dir.glob("manifests/*")) == []
    kube.wait("unreferenced chunks collected",
              lambda: not list(rig.backup_dir.glob("chunks/*/*")), timeout=60)
    assert os.listdir(rig.pool_dir2 / "volumes") == []


def test_helm_upgrade_and_uninstall(rig: Rig) -> None:
    values = rig.work / "values.yaml"
    helm(rig.cp, "upgrade", "flotilla", str(REPO / "charts/flotilla"), "--namespace",
         NAMESPACE, "--values", str(values), "--set", "controller.replicas=1")
    assert rig.kube.request("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/"
                                   "flotilla-controller")["spec"]["replicas"] == 1
    helm(rig.cp, "uninstall", "flotilla", "--namespace", NAMESPACE)
    assert rig.kube.get("CSIDriver", "flotilla.csi.io") is None
    assert rig.kube.get("StorageClass", "flotilla-default") is None
    # CRDs stay (helm never deletes crds/): volumes outlive an uninstall
    assert rig.kube.get("CustomResourceDefinition", "flotillavolumes.flotilla.csi.io")

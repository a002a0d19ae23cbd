"""A user's flows on the real node: workloads on PVCs of each of the chart's pools (the
host's cluster has the default filepool; tests/vm's guest cluster the lvmthin and nfs ones).

Everything goes through the API server as a user would (kubectl-equivalent calls, real
pods, `kubectl exec`); the kubelet does the CSI calls, through the node-driver-registrar's
registration, to the chart's node plugin pod.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import SNAPSHOT_CLASS, Env, Pool, metrics
from tests.cluster.rig import NAMESPACE, configured_pools, storage_class

GI = 1 << 30


def pvc_volume(claim: str, read_only: bool = False) -> dict[str, Any]:
    src: dict[str, Any] = {"claimName": claim}
    if read_only:
        src["readOnly"] = True
    return {"name": "data", "persistentVolumeClaim": src}


DATA = [{"name": "data", "mountPath": "/data"}]


def df_bytes(env: Env, ns: str, pod: str, path: str = "/data") -> int:
    """Size of the filesystem at `path` as `df` in the pod shows it."""
    # -P: one line per filesystem (busybox wraps a long device name, such as a thin
    # LV's /dev/mapper name, onto a line of its own otherwise)
    out = env.sh(ns, pod, f"df -kP {path} 2>&1", check=False)
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    if not rows or rows[-1][-1] != path:
        seen = env.sh(ns, pod, f"cat /proc/self/mountinfo; stat -f {path}; ls -la /etc",
                      check=False)
        raise AssertionError(f"df -kP {path} in {pod} does not list it:\n{out}\n{seen}")
    return int(rows[-1][1]) * 1024


def test_the_chart_registers_serves_and_reports(env: Env) -> None:
    """CSINode lists the driver (via the real node-driver-registrar), the livenessprobe
    endpoints answer, CSIStorageCapacity objects exist, the pods' metrics ports serve."""
    csinode = env.wait("the driver in CSINode", lambda: next(
        d for d in env.kube.get("CSINode", env.node)["spec"]["drivers"]
        if d["name"] == "flotilla.csi.io"))
    assert csinode["nodeID"] == env.node
    assert csinode["topologyKeys"] == ["topology.flotilla.csi.io/node"]
    assert csinode["allocatable"]["count"] == 256

    node_pods, ctrl_pods = env.flotilla_pods("node"), env.flotilla_pods("controller")
    assert len(node_pods) == 1 and len(ctrl_pods) == 2
    # (pod, livenessprobe port, metrics port): the chart's defaults
    for pod, healthz, port in [(node_pods[0], 9838, 9830)] + [(p, 9808, 9820)
                                                              for p in ctrl_pods]:
        ip = pod["status"]["podIP"]
        status, body = env.http(f"http://{ip}:{healthz}/healthz")
        assert (status, body.strip()) == (200, "ok"), (pod["metadata"]["name"], status, body)
        status, text = env.http(f"http://{ip}:{port}/metrics")
        assert status == 200
        assert any(line.startswith("flotilla_") for line in text.splitlines()), text[:500]
    status, text = env.http(f"http://{node_pods[0]['status']['podIP']}:9830/metrics")
    sizes = metrics(text, "flotilla_pool_size_bytes")
    for pool in configured_pools():
        assert any(labels.get("pool") == pool["name"] and value > 0
                   for labels, value in sizes), (pool["name"], sizes)
        up = [v for labels, v in metrics(text, "flotilla_pool_up")
              if labels.get("pool") == pool["name"]]
        assert up == [1.0], (pool["name"], up)

    # one CSIStorageCapacity per node and node-local pool (a shared pool's has no node)
    for sc in (storage_class(p) for p in configured_pools() if p["type"] != "nfs"):
        capacities = env.wait(f"CSIStorageCapacity of {sc} for the node", lambda sc=sc: [
            c for c in env.kube.list("CSIStorageCapacity", NAMESPACE)
            if c["storageClassName"] == sc
            and c["nodeTopology"]["matchLabels"] == {"topology.flotilla.csi.io/node": env.node}
            and c.get("capacity")])
        assert len(capacities) == 1, (sc, capacities)


def test_statefulset_data_outlives_its_pod(env: Env, ns: str, pool: Pool) -> None:
    """A StatefulSet pod writes to its WaitForFirstConsumer PVC; its successor reads it."""
    sts = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
        "spec": {
            "serviceName": "db", "replicas": 1,
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}},
                         "spec": env.pod("x", [], DATA)["spec"]},
            "volumeClaimTemplates": [env.pvc("data", pool.storage_class, "1Gi")],
        }}
    env.kube.create(sts, ns)
    first = env.wait_pod(ns, "db-0")
    pvc = env.pvc_bound(ns, "data-db-0")
    assert pvc is not None
    size = df_bytes(env, ns, "db-0")
    assert 0.9 * GI <= size <= GI, size  # the requested size, less the filesystem's own
    env.sh(ns, "db-0", "echo kept-by-flotilla > /data/marker && sync")

    env.kube.delete("Pod", "db-0", ns)
    env.wait("the successor pod", lambda: (
        env.pod_ready(ns, "db-0") or {}).get("metadata", {}).get("uid") not in
        (None, first["metadata"]["uid"]))
    assert env.sh(ns, "db-0", "cat /data/marker").strip() == "kept-by-flotilla"
    assert env.pvc_bound(ns, "data-db-0")["spec"]["volumeName"] == pvc["spec"]["volumeName"]


@pytest.mark.pool_types("filepool", "lvmthin")  # an nfs pool serves filesystems only
def test_raw_block_volume(env: Env, ns: str, pool: Pool) -> None:
    env.kube.create(env.pvc("raw", pool.storage_class, "64Mi", mode="Block"), ns)
    pod = env.pod("raw", [{"name": "raw", "persistentVolumeClaim": {"claimName": "raw"}}],
                  [], devices=[{"name": "raw", "devicePath": "/dev/xvda"}])
    env.kube.create(pod, ns)
    env.wait_pod(ns, "raw")
    assert int(env.sh(ns, "raw", "blockdev --getsize64 /dev/xvda")) == 64 << 20
    env.sh(ns, "raw", "echo block-marker | dd of=/dev/xvda bs=512 seek=2048 conv=fsync "
                      "2>/dev/null")
    out = env.sh(ns, "raw", "dd if=/dev/xvda bs=512 skip=2048 count=1 2>/dev/null | head -1")
    assert out.strip().startswith("block-marker")


def snapshot_ready(env: Env, ns: str, name: str) -> bool:
    snap = env.kube.get("VolumeSnapshot", name, ns)
    return bool(snap and snap.get("status", {}).get("readyToUse"))


def test_snapshot_restore_and_clone_of_a_volume_in_use(env: Env, ns: str, pool: Pool) -> None:
    env.kube.create(env.pvc("src", pool.storage_class, "1Gi"), ns)
    env.kube.create(env.pod("writer", [pvc_volume("src")], DATA,
                            script="echo snap-data > /data/file; sync"), ns)
    env.wait_pod(ns, "writer")
    env.wait("the writer's file", lambda: env.sh(ns, "writer", "cat /data/file").strip()
             == "snap-data")
    env.kube.create({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                     "metadata": {"name": "snap"},
                     "spec": {"volumeSnapshotClassName": SNAPSHOT_CLASS,
                              "source": {"persistentVolumeClaimName": "src"}}}, ns)
    env.wait("the snapshot readyToUse", lambda: snapshot_ready(env, ns, "snap"))
    env.sh(ns, "writer", "echo after-snapshot > /data/file; sync")

    env.kube.create(env.pvc("restored", pool.storage_class, "2Gi", source={
        "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"}), ns)
    env.kube.create(env.pvc("clone", pool.storage_class, "1Gi", source={
        "kind": "PersistentVolumeClaim", "name": "src"}), ns)
    env.kube.create(env.pod("reader", [pvc_volume("restored"),
                                       {"name": "clone",
                                        "persistentVolumeClaim": {"claimName": "clone"}}],
                            [*DATA, {"name": "clone", "mountPath": "/clone"}]), ns)
    env.wait_pod(ns, "reader")
    assert env.sh(ns, "reader", "cat /data/file").strip() == "snap-data"
    assert env.sh(ns, "reader", "cat /clone/file").strip() == "after-snapshot"
    assert 1.8 * GI <= df_bytes(env, ns, "reader") <= 2 * GI  # restored larger


def test_online_expansion_seen_by_the_running_pod(env: Env, ns: str, pool: Pool) -> None:
    """The PVC grows while its pod runs; the pod sees the new size without a restart.
    XFS: ext4's online growth needs CAP_SYS_RESOURCE, which this host's root lacks (the
    driver then grows it at the next stage; tests/integration covers that)."""
    env.kube.create({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                     "metadata": {"name": f"{ns}-xfs"}, "provisioner": "flotilla.csi.io",
                     "parameters": {"pool": pool.name, "csi.storage.k8s.io/fstype": "xfs"},
                     "allowVolumeExpansion": True,
                     "volumeBindingMode": "WaitForFirstConsumer"})
    try:
        env.kube.create(env.pvc("grow", f"{ns}-xfs", "1Gi"), ns)
        env.kube.create(env.pod("app", [pvc_volume("grow")], DATA), ns)
        pod = env.wait_pod(ns, "app")
        before = df_bytes(env, ns, "app")
        assert before < 1.01 * GI
        env.kube.patch("PersistentVolumeClaim", "grow",
                       {"spec": {"resources": {"requests": {"storage": "3Gi"}}}}, ns)
        env.wait("the pod to see 3Gi", lambda: df_bytes(env, ns, "app") > 2.8 * GI,
                 timeout=120)
        after = env.kube.get("Pod", "app", ns)
        assert after["metadata"]["uid"] == pod["metadata"]["uid"]
        assert after["status"]["containerStatuses"][0]["restartCount"] == 0
        env.wait("the PVC's status capacity", lambda: env.kube.get(
            "PersistentVolumeClaim", "grow", ns)["status"]["capacity"]["storage"] == "3Gi")
    finally:
        env.kube.delete("StorageClass", f"{ns}-xfs")


def test_fsgroup_readwriteoncepod_and_read_only(env: Env, ns: str, pool: Pool) -> None:
    # fsGroup: the volume's root belongs to the group and a non-root user can write
    env.kube.create(env.pvc("shared", pool.storage_class, "256Mi",
                            access="ReadWriteOncePod"), ns)
    env.kube.create(env.pod("owner", [pvc_volume("shared")], DATA,
                            security={"runAsUser": 1000, "runAsGroup": 1000,
                                      "fsGroup": 2000}), ns)
    env.wait_pod(ns, "owner")
    assert env.sh(ns, "owner", "stat -c %g /data").strip() == "2000"
    env.sh(ns, "owner", "echo mine > /data/by-1000 && stat -c '%u %g' /data/by-1000 "
                        "> /data/ids")
    assert env.sh(ns, "owner", "cat /data/ids").strip() == "1000 2000"

    # ReadWriteOncePod: a second pod wanting the claim is not scheduled
    env.kube.create(env.pod("intruder", [pvc_volume("shared")], DATA), ns)

    def refused() -> str:
        pod = env.kube.get("Pod", "intruder", ns)
        cond = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
        return str(cond["status"] == "False" and cond.get("message", ""))
    message = env.wait("the scheduler to refuse the second pod", refused, timeout=60)
    assert "ReadWriteOncePod" in message, message
    time.sleep(3)
    assert env.kube.get("Pod", "intruder", ns)["status"]["phase"] == "Pending"

    # readOnly: both ways a pod can ask for it
    env.kube.create(env.pvc("ro", pool.storage_class, "256Mi"), ns)
    env.kube.create(env.pod("seed", [pvc_volume("ro")], DATA,
                            script="echo seeded > /data/f; sync"), ns)
    env.wait_pod(ns, "seed")
    env.wait("the seed", lambda: env.sh(ns, "seed", "cat /data/f").strip() == "seeded")
    env.kube.delete("Pod", "seed", ns)
    env.wait("the seed pod to go", lambda: env.kube.get("Pod", "seed", ns) is None)
    env.kube.create(env.pod("ro-claim", [pvc_volume("ro", read_only=True)], DATA), ns)
    env.kube.create(env.pod("ro-mount", [pvc_volume("ro")],
                            [{"name": "data", "mountPath": "/data", "readOnly": True}]), ns)
    for pod in ("ro-claim", "ro-mount"):
        env.wait_pod(ns, pod)
        assert env.sh(ns, pod, "cat /data/f").strip() == "seeded"
        out = env.sh(ns, pod, "{ echo x > /data/g; } 2>&1; echo rc=$?", check=False)
        assert "Read-only file system" in out and "rc=1" in out, out


def test_node_plugin_restart_does_not_stop_a_writing_workload(env: Env, ns: str,
                                                              pool: Pool) -> None:
    """The node plugin pod is deleted while a workload writes: the workload keeps writing;
    the new plugin pod serves unpublish and unstage afterwards."""
    env.kube.create(env.pvc("log", pool.storage_class, "256Mi"), ns)
    env.kube.create(env.pod("writer", [pvc_volume("log")], DATA, script=(
        "(while :; do date +%s >> /data/log; sync /data/log 2>/dev/null; sleep 0.2; done) &")),
        ns)
    pod = env.wait_pod(ns, "writer")
    old = env.flotilla_pods("node")[0]
    env.kube.delete("Pod", old["metadata"]["name"], NAMESPACE)
    deleted_at = time.time()
    new = env.wait("a new node plugin pod Ready", lambda: next(
        p for p in env.flotilla_pods("node")
        if p["metadata"]["uid"] != old["metadata"]["uid"]
        and env.pod_ready(NAMESPACE, p["metadata"]["name"])), timeout=180)
    lines = int(env.sh(ns, "writer", "wc -l < /data/log"))
    time.sleep(2)
    assert int(env.sh(ns, "writer", "wc -l < /data/log")) > lines  # still writing
    last = int(env.sh(ns, "writer", "tail -1 /data/log"))  # busybox date: seconds
    assert last >= int(deleted_at)

    # the new plugin serves unpublish/unstage: the pod goes, its mounts with it
    uid = pod["metadata"]["uid"]
    env.kube.delete("Pod", "writer", ns)
    env.wait("the writer to go", lambda: env.kube.get("Pod", "writer", ns) is None,
             timeout=120)
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f"/pods/{uid}/" not in mounts
    pv = env.pvc_bound(ns, "log")["spec"]["volumeName"]
    assert pv not in mounts, "the volume is still staged"
    env.kube.create(env.pod("reader", [pvc_volume("log")], DATA), ns)
    env.wait_pod(ns, "reader")
    assert int(env.sh(ns, "reader", "wc -l < /data/log")) > lines
    assert new["spec"]["nodeName"] == env.node


@pytest.mark.pool_types("nfs")
def test_two_deployments_share_a_readwritemany_claim(env: Env, ns: str, pool: Pool) -> None:
    """Pods of two Deployments write to one ReadWriteMany claim; each reads the other's."""
    env.kube.create(env.pvc("shared", pool.storage_class, "256Mi", access="ReadWriteMany"), ns)
    for app in ("a", "b"):
        spec = env.pod("x", [pvc_volume("shared")], DATA, script=(
            f"(i=0; while :; do i=$((i+1)); echo {app}-$i >> /data/{app}.log; sleep 0.5; "
            "done) &"))["spec"]
        env.kube.create({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": app},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": app}},
                     "template": {"metadata": {"labels": {"app": app}}, "spec": spec}}}, ns)

    def ready_pod(app: str) -> str:
        pods = [p["metadata"]["name"] for p in env.kube.list("Pod", ns, f"app={app}")
                if env.pod_ready(ns, p["metadata"]["name"])]
        return pods[0] if pods else ""
    pods = {app: env.wait(f"a Ready pod of Deployment {app}", lambda app=app: ready_pod(app))
            for app in ("a", "b")}
    for app, other in (("a", "b"), ("b", "a")):
        env.wait(f"{app} to read {other}'s writes", lambda app=app, other=other: int(
            env.sh(ns, pods[app], f"wc -l < /data/{other}.log").strip() or 0) >= 3)


def test_deleting_workloads_and_claims_empties_the_pool(env: Env, ns: str) -> None:
    """Runs last in this file: with every earlier namespace gone, no volume or snapshot is
    left in any pool, as the node plugin's and controllers' metrics report them."""
    env.wait("every FlotillaVolume to go", lambda: not env.kube.list("FlotillaVolume"),
             timeout=120)
    assert not env.kube.list("PersistentVolume")
    assert not env.kube.list("FlotillaSnapshot")
    names = {p["name"] for p in configured_pools()}
    for pod, port in ([(p, 9830) for p in env.flotilla_pods("node")]
                      + [(p, 9820) for p in env.flotilla_pods("controller")]):
        status, text = env.http(f"http://{pod['status']['podIP']}:{port}/metrics")
        assert status == 200
        for metric in ("flotilla_pool_volumes", "flotilla_pool_snapshots"):
            counts = {labels["pool"]: value for labels, value in metrics(text, metric)}
            assert all(counts.get(n, 0) == 0 for n in names), (pod["metadata"]["name"],
                                                               metric, counts)
    node = env.flotilla_pods("node")[0]
    out = env.kubectl("exec", "-n", NAMESPACE, node["metadata"]["name"], "-c", "flotilla",
                      "--", "flotillactl", "--endpoint", "unix:///csi/csi.sock", "pools")
    assert all(" serving " in line for line in out.splitlines()[1:]), out

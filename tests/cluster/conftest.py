"""The real-node tier: the chart's pods on kubelet + containerd, workloads as real pods.

The tier uses the cluster of `make cluster-up` when one runs (and leaves it up), else
brings one up itself and takes it down when the tier ends, asserting nothing is left
behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.cluster.rig import NAMESPACE, Cluster, configured_pools, images, storage_class
from tests.e2e.cluster import ApiError, Kube, tools_dir, wait_for

SNAPSHOT_CLASS = "flotilla"


@dataclass(frozen=True)
class Pool:
    """One pool of the chart's `pools` (the rig's FLOTILLA_CLUSTER_POOLS)."""

    name: str
    type: str
    storage_class: str


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests taking `pool` run once per configured pool; `@pytest.mark.pool_types(...)`
    limits a test to pools of those types."""
    if "pool" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("pool_types")
    types = marker.args if marker else None
    pools = [Pool(p["name"], p["type"], storage_class(p)) for p in configured_pools()]
    params = [pytest.param(p, id=p.name) for p in pools if types is None or p.type in types]
    if not params:
        params = [pytest.param(None, id="none", marks=pytest.mark.skip(
            reason=f"this cluster has no pool of type {'/'.join(types or ())}: the host "
                   "kernel lacks NFS and device-mapper (a Linux host with them runs it with "
                   "FLOTILLA_CLUSTER_POOLS; the guest cluster of tests/vm/cluster_guest.py "
                   "is not in CI yet)"))]
    metafunc.parametrize("pool", params)


@dataclass
class Env:
    cluster: Cluster
    kube: Kube
    busybox: str
    node: str

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        proc = subprocess.run([str(tools_dir() / "kubectl"), *args], env=env, text=True,
                              capture_output=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def sh(self, ns: str, pod: str, script: str, check: bool = True) -> str:
        """Run a shell script in a pod (kubectl exec through the kubelet)."""
        return self.kubectl("exec", "-n", ns, pod, "--", "sh", "-c", script, check=check)

    def wait(self, what: str, fn: Any, timeout: float = 180.0, interval: float = 1.0) -> Any:
        """Poll `fn` (an object not there yet counts as "not yet"); a timeout shows every
        pod's state."""
        return wait_for(what, fn, timeout, interval,
                        ignore=(ApiError, KeyError, TypeError, IndexError, StopIteration),
                        detail=self.cluster.describe_pods)

    def pod_ready(self, ns: str, name: str) -> dict[str, Any] | None:
        pod = self.kube.get("Pod", name, ns)
        if pod and any(c["type"] == "Ready" and c["status"] == "True"
                       for c in pod.get("status", {}).get("conditions", [])):
            return dict(pod)
        return None

    def wait_pod(self, ns: str, name: str, timeout: float = 180.0) -> dict[str, Any]:
        pod: dict[str, Any] = self.wait(f"pod {ns}/{name} Ready",
                                        lambda: self.pod_ready(ns, name), timeout)
        return pod

    def pod(self, name: str, volumes: list[dict[str, Any]], mounts: list[dict[str, Any]],
            devices: list[dict[str, Any]] | None = None, script: str = "",
            security: dict[str, Any] | None = None) -> dict[str, Any]:
        """A busybox pod that runs `script` then sleeps until told to stop."""
        container: dict[str, Any] = {
            "name": "app", "image": self.busybox, "imagePullPolicy": "Never",
            "command": ["sh", "-c", f"{script}\ntrap 'exit 0' TERM\n"
                                    "while :; do sleep 1; done"],
            "volumeMounts": mounts}
        if devices:
            container["volumeDevices"] = devices
        spec: dict[str, Any] = {"containers": [container], "volumes": volumes,
                                "terminationGracePeriodSeconds": 5}
        if security:
            spec["securityContext"] = security
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}

    def pvc(self, name: str, storage_class: str, size: str = "1Gi", mode: str = "Filesystem",
            access: str = "ReadWriteOnce", source: dict[str, Any] | None = None
            ) -> dict[str, Any]:
        spec: dict[str, Any] = {"accessModes": [access], "volumeMode": mode,
                                "storageClassName": storage_class,
                                "resources": {"requests": {"storage": size}}}
        if source:
            spec["dataSource"] = source
        return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name}, "spec": spec}

    def pvc_bound(self, ns: str, name: str) -> dict[str, Any] | None:
        pvc = self.kube.get("PersistentVolumeClaim", name, ns)
        return pvc if pvc and pvc["status"].get("phase") == "Bound" else None

    def flotilla_pods(self, component: str) -> list[dict[str, Any]]:
        return [p for p in self.kube.list("Pod", NAMESPACE,
                                          f"app.kubernetes.io/component={component}")
                if not p["metadata"].get("deletionTimestamp")]

    def http(self, url: str, timeout: float = 10) -> tuple[int, str]:
        """GET `url`: (status, body). A port nobody listens on yet is waited for (up to 30
        s): a pod is Ready before its sidecars without probes (livenessprobe) listen."""
        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as err:
                return err.code, err.read().decode()
        answer: tuple[int, str] = wait_for(f"{url} to answer", get, timeout=30,
                                           ignore=(ConnectionError, urllib.error.URLError))
        return answer


# package scope: the cluster goes when this tier is done, not at the end of the whole
# session (it held the node's pool and two cores' worth of processes through every later
# tier)
@pytest.fixture(scope="package")
def env() -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.skip("the real node needs root (kubelet, containerd, mounts); "
                    "an unprivileged user cannot run it")
    cluster = Cluster()
    ours = not cluster.running()
    if ours:
        t0 = time.monotonic()
        cluster.up()
        print(f"\ncluster up in {time.monotonic() - t0:.0f}s")
    imgs = images()
    data = cluster.record()
    try:
        yield Env(cluster=cluster, kube=cluster.kube(), busybox=imgs["BUSYBOX_IMAGE"],
                  node=data["node"])
    finally:
        if ours:
            t0 = time.monotonic()
            cluster.down()
            print(f"\ncluster down in {time.monotonic() - t0:.0f}s")
            left = cluster.leftovers(data)
            assert not left, f"cluster-down left: {left}"


@pytest.fixture
def ns(env: Env) -> Iterator[str]:
    """A namespace per test, deleted (with its pods and PVCs) afterwards; the PVs of its
    claims must be gone before the next test starts."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    env.kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        yield name
    finally:
        pvs = [pv["metadata"]["name"] for pv in env.kube.list("PersistentVolume")
               if pv["spec"].get("claimRef", {}).get("namespace") == name]
        env.kube.delete("Namespace", name)
        env.wait(f"namespace {name} to go", lambda: env.kube.get("Namespace", name) is None,
                 timeout=240)
        env.wait(f"the PVs of {name} to go", lambda: not any(
            env.kube.get("PersistentVolume", pv) for pv in pvs), timeout=120)


def metrics(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric in Prometheus text format."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            labels: dict[str, str] = {}
            if "{" in head:
                body = head[head.index("{") + 1:head.rindex("}")]
                for part in body.split('",'):
                    if "=" in part:
                        k, v = part.split("=", 1)
                        labels[k.strip()] = v.strip().strip('"')
            out.append((labels, float(value)))
    return out


def as_json(text: str) -> Any:
    return json.loads(text)

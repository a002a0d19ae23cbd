"""Distributed mode without an API server: KubePool (controller) and NodeAgent (node)
talking through an in-memory implementation of KubeApi, over an in-memory pool."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from csi._proto import csi_pb2
from csi.errors import Aborted, AlreadyExists, NotFound, ResourceExhausted
from csi.kube import FINALIZER, NODES, SNAPSHOTS, VOLUMES
from csi.kube import resources as res
from csi.kube.agent import NodeAgent
from csi.kube.api import Conflict, KubeApi, Obj
from csi.kube.controller import DistributedControllerService
from csi.kube.pool import InProgress, KubePool, KubeState
from csi.locks import KeyedTryLock
from csi.pools import PoolSet
from csi.pools.base import Placement, Volume, VolumeRequest, new_id
from tests.unit.fakes import GiB, MemoryPool


class MemoryKubeApi(KubeApi):
    """Cluster-scoped objects with resourceVersion, generation, status subresource,
    finalizers and watches, as the API server keeps them."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Obj]] = {VOLUMES: {}, SNAPSHOTS: {}, NODES: {}}
        self.rv = itertools.count(1)
        self.lock = threading.Lock()
        self.watchers: list[tuple[str, str, queue.Queue[tuple[str, Obj] | None]]] = []
        self.events: list[tuple[str, str, str]] = []

    def _notify(self, plural: str, kind: str, obj: Obj) -> None:
        for p, sel, q in self.watchers:
            if p == plural and _matches(obj, sel):
                q.put((kind, copy.deepcopy(obj)))

    def list(self, plural: str, label_selector: str = "") -> tuple[list[Obj], str]:
        with self.lock:
            items = [copy.deepcopy(o) for o in self.objects[plural].values()
                     if _matches(o, label_selector)]
            return items, str(next(self.rv))

    def watch(self, plural: str, label_selector: str, resource_version: str,
              timeout: int) -> Iterator[tuple[str, Obj]]:
        q: queue.Queue[tuple[str, Obj] | None] = queue.Queue()
        entry = (plural, label_selector, q)
        with self.lock:
            self.watchers.append(entry)
        try:
            deadline = time.monotonic() + min(timeout, 2)
            while time.monotonic() < deadline:
                try:
                    item = q.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is None:
                    return
                yield item
        finally:
            with self.lock:
                self.watchers.remove(entry)

    def close(self) -> None:
        with self.lock:
            for _, _, q in self.watchers:
                q.put(None)

    def get(self, plural: str, name: str) -> Obj | None:
        with self.lock:
            obj = self.objects[plural].get(name)
            return copy.deepcopy(obj) if obj else None

    def create(self, plural: str, body: Obj) -> Obj:
        with self.lock:
            name = body["metadata"]["name"]
            if name in self.objects[plural]:
                raise Conflict(name)
            obj = copy.deepcopy(body)
            obj.pop("status", None)
            obj["metadata"].update(uid=str(uuid.uuid4()), generation=1,
                                   resourceVersion=str(next(self.rv)))
            self.objects[plural][name] = obj
            self._notify(plural, "ADDED", obj)
            return copy.deepcopy(obj)

    def patch(self, plural: str, name: str, patch: Obj, status: bool = False) -> Obj | None:
        with self.lock:
            obj = self.objects[plural].get(name)
            if obj is None:
                return None
            patch = copy.deepcopy(patch)
            want_rv = patch.get("metadata", {}).pop("resourceVersion", None)
            if want_rv is not None and want_rv != obj["metadata"]["resourceVersion"]:
                raise Conflict(name)
            if status:
                obj["status"] = _merge(obj.get("status") or {}, patch.get("status", {}))
            else:
                old_spec = copy.deepcopy(obj.get("spec"))
                patch.pop("status", None)
                merged = _merge(obj, patch)
                obj.clear()
                obj.update(merged)
                if obj.get("spec") != old_spec:
                    obj["metadata"]["generation"] += 1
            obj["metadata"]["resourceVersion"] = str(next(self.rv))
            if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get(
                    "finalizers"):
                del self.objects[plural][name]
                self._notify(plural, "DELETED", obj)
            else:
                self._notify(plural, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def delete(self, plural: str, name: str) -> None:
        with self.lock:
            obj = self.objects[plural].get(name)
            if obj is None:
                return
            if obj["metadata"].get("finalizers"):
                if not obj["metadata"].get("deletionTimestamp"):
                    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
                    obj["metadata"]["resourceVersion"] = str(next(self.rv))
                    self._notify(plural, "MODIFIED", obj)
            else:
                del self.objects[plural][name]
                self._notify(plural, "DELETED", obj)

    def event(self, obj: Obj, reason: str, message: str, warning: bool = False) -> None:
        self.events.append((obj["metadata"]["name"], reason, message))


def _matches(obj: Obj, selector: str) -> bool:
    if not selector:
        return True
    key, _, value = selector.partition("=")
    return bool(obj.get("metadata", {}).get("labels", {}).get(key) == value)


def _merge(base: Any, patch: Any) -> Any:
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


class Cluster:
    def __init__(self, timeout: float = 5.0) -> None:
        self.api = MemoryKubeApi()
        self.state = KubeState(self.api, timeout=timeout, capacity_interval=1.0)
        self.kpool = KubePool(MemoryPool(), self.state)
        self.node_pools: dict[str, MemoryPool] = {}
        self.agents: dict[str, NodeAgent] = {}

    def add_node(self, node: str) -> MemoryPool:
        pool = self.node_pools.setdefault(node, MemoryPool())
        agent = NodeAgent(self.api, PoolSet([pool]), node, KeyedTryLock(),
                          capacity_interval=1.0, workers=2)
        agent.start(sync_timeout=5)
        self.agents[node] = agent
        return pool

    def stop_node(self, node: str) -> None:
        self.agents.pop(node).stop()

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.state.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    c.state.start(sync_timeout=5)
    yield c
    c.stop()


def request(name: str = "pvc-1", size: int = GiB, source: Any = None) -> VolumeRequest:
    return VolumeRequest(name=name, size=size, required=size, limit=0, fs_type="ext4",
                         block=False, source=source)


def on(node: str) -> Placement:
    return Placement(preferred=(node,), requisite=(node,))


def create_at(place: Placement, kpool: KubePool, req: VolumeRequest) -> Volume:
    """CreateVolume with the accessibility requirements ``place`` names."""
    return kpool.create_volume(dataclasses.replace(req, placement=place))


def test_names_and_labels() -> None:
    assert res.object_name("pvc-1234") == "pvc-1234"
    hashed = res.object_name("Weird Name/..")
    assert hashed.startswith("x-") and len(hashed) == 66
    assert res.object_name("x-looks-hashed") != "x-looks-hashed"
    assert res.label_value("node-1") == "node-1"
    assert len(res.label_value("n" * 100)) <= 63


def test_pool_kinds() -> None:
    assert MemoryPool().node_local
    assert KubePool(MemoryPool(), KubeState(MemoryKubeApi())).node_local

    class Shared(MemoryPool):
        node_local = False
    assert not KubePool(Shared(), KubeState(MemoryKubeApi())).node_local


def test_volume_lifecycle_through_resources(cluster: Cluster) -> None:
    pool = cluster.add_node("node-a")
    vol = create_at(on("node-a"), cluster.kpool, request())
    assert vol.id in pool.volumes and vol.size == GiB
    assert cluster.kpool.node_of(vol.id) == "node-a"
    obj = cluster.api.get(VOLUMES, "pvc-1")
    assert obj is not None and obj["status"]["phase"] == "Ready"
    assert FINALIZER in obj["metadata"]["finalizers"]
    # idempotent: same answer, one resource, one volume
    assert create_at(on("node-a"), cluster.kpool, request()).id == vol.id
    assert len(pool.volumes) == 1
    with pytest.raises(AlreadyExists):
        create_at(on("node-a"), cluster.kpool, request(size=5 * GiB))

    grown = cluster.kpool.expand_volume(vol.id, 3 * GiB)
    assert grown.size == 3 * GiB and pool.volumes[vol.id].size == 3 * GiB

    snap = cluster.kpool.create_snapshot("snap-1", vol.id, {})
    assert snap.id in pool.snapshots
    assert cluster.kpool.get_snapshot(snap.id) is not None
    # restore lands on the snapshot's node whatever the preference, within the requisite
    restored = create_at(Placement(preferred=("node-b",), requisite=("node-a", "node-b")),
                         cluster.kpool,
                         request("pvc-2", 3 * GiB, res.Source("snapshot", snap.id)))
    assert cluster.kpool.node_of(restored.id) == "node-a"
    with pytest.raises(ResourceExhausted, match="lives on node node-a"):
        create_at(Placement(preferred=("node-b",), requisite=("node-b",)), cluster.kpool,
                  request("pvc-3", 3 * GiB, res.Source("snapshot", snap.id)))

    for vid in (restored.id, vol.id):
        cluster.kpool.delete_volume(vid)
    cluster.kpool.delete_snapshot(snap.id)
    cluster.kpool.delete_volume(vol.id)  # gone already: fine
    assert pool.volumes == {} and pool.snapshots == {}
    assert cluster.api.objects[VOLUMES] == {} and cluster.api.objects[SNAPSHOTS] == {}
    reasons = {r for _, r, _ in cluster.api.events}
    assert {"Provisioned", "Expanded", "SnapshotTaken", "Deleted"} <= reasons


def test_timeout_is_retryable_and_never_duplicates() -> None:
    c = Cluster(timeout=0.5)
    c.state.start(sync_timeout=5)
    try:
        with pytest.raises(InProgress) as err:
            create_at(on("node-a"), c.kpool, request())
        assert isinstance(err.value, Aborted)
        pool = c.add_node("node-a")  # the agent comes up late, resyncs, creates
        c.state.timeout = 5.0
        vol = create_at(on("node-a"), c.kpool, request())
        assert create_at(on("node-a"), c.kpool, request()).id == vol.id
        assert len(pool.volumes) == 1 and len(c.api.objects[VOLUMES]) == 1
    finally:
        c.stop()


def test_node_failure_is_reported_and_cleared(cluster: Cluster) -> None:
    pool = cluster.add_node("node-a")
    pool.fail_create = ResourceExhausted("pool 'local' is full")
    with pytest.raises(ResourceExhausted, match="is full"):
        create_at(on("node-a"), cluster.kpool, request())
    # the failed attempt is removed, so a retry starts afresh
    deadline = time.monotonic() + 5
    while "pvc-1" in cluster.api.objects[VOLUMES] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "pvc-1" not in cluster.api.objects[VOLUMES]
    pool.fail_create = None
    assert create_at(on("node-a"), cluster.kpool, request()).id in pool.volumes


def test_node_required_and_missing_source(cluster: Cluster) -> None:
    with pytest.raises(Exception, match="WaitForFirstConsumer"):
        cluster.kpool.create_volume(request())
    with pytest.raises(NotFound):
        create_at(on("node-a"), cluster.kpool, request("pvc-9", GiB, res.Source("snapshot",
                                                                     new_id("local", "snap"))))


def test_capacity_per_segment(cluster: Cluster) -> None:
    cluster.add_node("node-a")
    cluster.add_node("node-b").size = 10 * GiB
    service = DistributedControllerService(PoolSet([cluster.kpool]), "controller",
                                           KeyedTryLock())

    def capacity(node: str) -> int:
        req = csi_pb2.GetCapacityRequest(
            accessible_topology=csi_pb2.Topology(
                segments={"topology.flotilla.csi.io/node": node}))
        return int(service.GetCapacity(req, None).available_capacity)  # type: ignore[arg-type]

    deadline = time.monotonic() + 5
    while capacity("node-b") != 10 * GiB and time.monotonic() < deadline:
        time.sleep(0.1)
    assert capacity("node-a") == 100 * GiB
    assert capacity("node-b") == 10 * GiB
    assert capacity("node-unknown") == 0


def test_volume_topology_in_replies(cluster: Cluster) -> None:
    cluster.add_node("node-a")
    service = DistributedControllerService(PoolSet([cluster.kpool]), "controller",
                                           KeyedTryLock())
    cap = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))  # type: ignore[arg-type]
    topo = csi_pb2.Topology(segments={"topology.flotilla.csi.io/node": "node-a"})
    reply = service.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="pvc-t", volume_capabilities=[cap],
        capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
        accessibility_requirements=csi_pb2.TopologyRequirement(
            requisite=[topo], preferred=[topo])), None)  # type: ignore[arg-type]
    assert [dict(t.segments) for t in reply.volume.accessible_topology] == [
        {"topology.flotilla.csi.io/node": "node-a"}]
    listed = service.ListVolumes(csi_pb2.ListVolumesRequest(), None)  # type: ignore[arg-type]
    assert [e.volume.volume_id for e in listed.entries] == [reply.volume.volume_id]


def test_agent_resyncs_after_restart(cluster: Cluster) -> None:
    pool = cluster.add_node("node-a")
    vol = create_at(on("node-a"), cluster.kpool, request())
    cluster.stop_node("node-a")
    # intent written while the agent is down is picked up when it comes back
    cluster.api.delete(VOLUMES, "pvc-1")
    cluster.add_node("node-a")
    deadline = time.monotonic() + 5
    while cluster.api.objects[VOLUMES] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.api.objects[VOLUMES] == {} and vol.id not in pool.volumes


def test_informer_relists_after_an_expired_watch() -> None:
    from csi.kube.api import Gone
    from csi.kube.informer import Informer

    class ExpiringApi(MemoryKubeApi):
        expired = 0

        def watch(self, plural: str, label_selector: str, resource_version: str,
                  timeout: int) -> Iterator[tuple[str, Obj]]:
            if self.expired < 2:
                self.expired += 1
                # changes made while no watch is open are only seen by a new list
                self.create(plural, {"metadata": {"name": f"made-{self.expired}"},
                                     "spec": {}})
                raise Gone("too old resource version")
            yield from super().watch(plural, label_selector, resource_version, timeout)

    api = ExpiringApi()
    seen: list[tuple[str, str]] = []
    inf = Informer(api, VOLUMES, handler=lambda k, o: seen.append((k, o["metadata"]["name"])))
    inf.start()
    try:
        assert inf.wait_for(lambda s: "made-2" in s, 10)
        assert ("SYNC", "made-1") in seen and ("SYNC", "made-2") in seen
    finally:
        inf.stop()

"""A pool that cannot start leaves the others serving; Probe reports process health only.

Servicers over in-memory pools: one whose ``start`` raises, one whose ``check`` fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from csi._proto import csi_pb2
from csi.controller import ControllerService
from csi.errors import Unavailable, status_code
from csi.identity import IdentityService
from csi.kube import NODES
from csi.locks import KeyedTryLock
from csi.metrics import PoolCollector
from csi.node import NodeService
from csi.pools import PoolDown, PoolFailure, PoolSet
from csi.pools.base import new_id
from csi.system import System
from csi.wiring import node_events
from tests.unit.fakes import GiB, MemoryPool
from tests.unit.test_kube import Cluster, MemoryKubeApi, create_at, on, request

CAP = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))  # type: ignore[arg-type]
CTX: Any = None  # the servicers under test never touch the context


class BrokenPool(MemoryPool):
    """A pool whose start raises until ``fixed``; ``unhealthy`` makes check() fail."""

    def __init__(self, name: str = "bad") -> None:
        super().__init__(name)
        self.fixed = False
        self.unhealthy = False
        self.starts = 0
        self.stops = 0

    def start(self) -> None:
        self.starts += 1
        if not self.fixed:
            raise Unavailable(f"pool {self.name!r}: device-mapper is missing")

    def stop(self) -> None:
        self.stops += 1

    def check(self) -> None:
        if self.unhealthy:
            raise Unavailable(f"pool {self.name!r}: thin pool is 100% full")


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture
def pools() -> Iterator[tuple[PoolSet, MemoryPool, BrokenPool]]:
    good, bad = MemoryPool("good"), BrokenPool("bad")
    ps = PoolSet([good, bad], retry_first=0.05, retry_max=0.2)
    ps.start()
    yield ps, good, bad
    ps.stop()


def code(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except PoolDown as err:
        return status_code(err), str(err)
    return grpc.StatusCode.OK, ""


def test_a_failed_start_is_recorded_and_the_other_pools_serve(
        pools: tuple[PoolSet, MemoryPool, BrokenPool]) -> None:
    ps, good, bad = pools
    failure = ps.failure("bad")
    assert failure is not None and "device-mapper is missing" in failure.error
    assert ps.failure("good") is None
    assert [p.name for p in ps] == ["good"] and [p.name for p in ps.all()] == ["good", "bad"]
    assert bad.stops >= 1, "what a failed start took is released"
    assert ps.named("good") is good
    with pytest.raises(PoolDown, match=r"pool 'bad' is not serving.*device-mapper is missing"):
        ps.named("bad")
    with pytest.raises(PoolDown):
        ps.owner(new_id("bad", "vol"))
    assert ps.owner(new_id("good", "vol")) is good
    assert ps.owner(new_id("other", "vol")) is None


def test_rpcs_of_the_failed_pool_answer_unavailable_naming_it(
        pools: tuple[PoolSet, MemoryPool, BrokenPool]) -> None:
    ps, good, _ = pools
    svc = ControllerService(ps, "node-1", KeyedTryLock())

    def create(name: str, pool: str) -> csi_pb2.CreateVolumeResponse:
        return svc.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[CAP], parameters={"pool": pool},
            capacity_range=csi_pb2.CapacityRange(required_bytes=GiB)), CTX)

    vol = create("pvc-good", "good").volume
    assert vol.volume_id in good.volumes
    status, message = code(lambda: create("pvc-bad", "bad"))
    assert status == grpc.StatusCode.UNAVAILABLE
    assert "pool 'bad'" in message and "device-mapper is missing" in message
    bad_id = new_id("bad", "vol")
    for call in (
        lambda: svc.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=bad_id), CTX),
        lambda: svc.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=bad_id), CTX),
        lambda: svc.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name="s", source_volume_id=bad_id), CTX),
        lambda: svc.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
            snapshot_id=new_id("bad", "snap")), CTX),
        lambda: svc.ListSnapshots(csi_pb2.ListSnapshotsRequest(
            snapshot_id=new_id("bad", "snap")), CTX),
    ):
        status, message = code(call)
        assert status == grpc.StatusCode.UNAVAILABLE and "device-mapper" in message
    # GetCapacity: 0 for the failed pool (no error), the good one's for the good one
    cap = svc.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"pool": "bad"}), CTX)
    assert cap.available_capacity == 0 and not cap.HasField("maximum_volume_size")
    cap = svc.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"pool": "good"}), CTX)
    assert cap.available_capacity > 0
    listed = svc.ListVolumes(csi_pb2.ListVolumesRequest(), CTX)
    assert [e.volume.volume_id for e in listed.entries] == [vol.volume_id]
    svc.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), CTX)


def test_volume_stats_of_a_failed_pool_are_an_abnormal_condition_naming_it(
        pools: tuple[PoolSet, MemoryPool, BrokenPool]) -> None:
    """The kubelet asks NodeGetVolumeStats of every mounted volume: one whose pool is down
    gets its condition (shown on the pod), not an error only the kubelet's log has."""
    ps, _, _ = pools
    node = NodeService(ps, System(), "node-1", KeyedTryLock(), ["/var/lib/kubelet"], 10)
    stats = node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=new_id("bad", "vol"), volume_path="/var/lib/kubelet/pods/x/mount"), CTX)
    assert stats.volume_condition.abnormal
    assert "pool 'bad'" in stats.volume_condition.message
    assert "device-mapper is missing" in stats.volume_condition.message
    assert not stats.usage


def test_background_retries_back_off_and_serve_the_pool_once_it_starts() -> None:
    good, bad = MemoryPool("good"), BrokenPool("bad")
    ps = PoolSet([good, bad], retry_first=0.05, retry_max=0.2)
    seen: list[tuple[str, PoolFailure | None]] = []
    ps.watch(lambda name, f: seen.append((name, f)))
    ps.start()
    try:
        wait_for(lambda: len(seen) >= 4)
        delays = [f.retry_in for _, f in seen[:4] if f is not None]
        assert delays == [0.05, 0.1, 0.2, 0.2], "doubling, capped at retry_max"
        assert [f.attempts for _, f in seen[:4] if f] == [1, 2, 3, 4]
        bad.fixed = True
        ps.retry_now()
        wait_for(lambda: ps.failure("bad") is None)
        assert seen[-1] == ("bad", None)
        assert ps.named("bad") is bad and [p.name for p in ps] == ["good", "bad"]
        attempts = bad.starts
        time.sleep(0.3)
        assert bad.starts == attempts, "a started pool is not started again"
    finally:
        ps.stop()


def test_probe_is_ready_while_a_pool_is_unhealthy_or_failed(
        pools: tuple[PoolSet, MemoryPool, BrokenPool]) -> None:
    """The new contract: Probe reports the process, not the storage (it used to answer
    ready=false when any pool's check failed)."""
    ps, _, bad = pools
    identity = IdentityService("flotilla.csi.io", ps, True)
    assert identity.Probe(csi_pb2.ProbeRequest(), CTX).ready.value  # 'bad' failed to start
    bad.unhealthy = True
    bad.fixed = True
    ps.retry_now()
    wait_for(lambda: ps.failure("bad") is None)
    with pytest.raises(Unavailable, match="100% full"):
        bad.check()
    assert identity.Probe(csi_pb2.ProbeRequest(), CTX).ready.value  # started, unhealthy


def test_probe_does_no_pool_io() -> None:
    class Exploding(MemoryPool):
        def check(self) -> None:
            raise AssertionError("Probe touched the pool")

        def capacity(self) -> Any:
            raise AssertionError("Probe touched the pool")

    ps = PoolSet([Exploding("p")])
    ps.start()
    assert IdentityService("d", ps, True).Probe(csi_pb2.ProbeRequest(), CTX).ready.value


def test_all_pools_failing_still_serves_identity_and_reports_them() -> None:
    ps = PoolSet([BrokenPool("one"), BrokenPool("two")], retry_first=60)
    ps.start()
    try:
        identity = IdentityService("flotilla.csi.io", ps, True)
        assert identity.Probe(csi_pb2.ProbeRequest(), CTX).ready.value
        manifest = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), CTX).manifest
        assert manifest["pool.one"].startswith("memory failed: pool 'one': device-mapper")
        assert "attempt 1" in manifest["pool.two"]
        assert list(ps) == []
        svc = ControllerService(ps, "node-1", KeyedTryLock())
        status, message = code(lambda: svc.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="v", volume_capabilities=[CAP]), CTX))  # the default pool, 'one'
        assert status == grpc.StatusCode.UNAVAILABLE and "pool 'one'" in message
        assert svc.GetCapacity(csi_pb2.GetCapacityRequest(), CTX).available_capacity == 0
    finally:
        ps.stop()


def test_metrics_report_the_failed_pool_down_without_touching_it(
        pools: tuple[PoolSet, MemoryPool, BrokenPool]) -> None:
    ps, _, _ = pools
    samples = {(s.name, s.labels["pool"]): s.value
               for fam in PoolCollector(ps).collect() for s in fam.samples}
    assert samples[("flotilla_pool_up", "good")] == 1
    assert samples[("flotilla_pool_up", "bad")] == 0
    assert samples[("flotilla_pool_started", "good")] == 1
    assert samples[("flotilla_pool_started", "bad")] == 0
    assert samples[("flotilla_pool_start_failed_attempts", "bad")] >= 1
    assert ("flotilla_pool_size_bytes", "bad") not in samples


def test_controller_records_events_on_its_node() -> None:
    api = MemoryKubeApi()
    bad = BrokenPool("bad")
    ps = PoolSet([bad], retry_first=0.05)
    ps.watch(node_events(api, "node-1"))
    ps.start()
    try:
        wait_for(lambda: len(api.events) >= 2)
        assert api.events[0][:2] == ("node-1", "PoolStartFailed")
        assert "device-mapper" in api.events[0][2]
        bad.fixed = True
        wait_for(lambda: api.events[-1][1] == "PoolStarted", timeout=10)
    finally:
        ps.stop()


def test_node_agent_reports_a_failed_pool_and_serves_it_once_started() -> None:
    cluster = Cluster(timeout=2.0)
    cluster.state.start(sync_timeout=5)
    try:
        good = cluster.add_node("node-a")
        bad = BrokenPool("local")  # the KubePool's name: the node's copy cannot start
        ps = PoolSet([bad], retry_first=0.05, retry_max=0.1)
        ps.start()
        from csi.kube.agent import NodeAgent

        agent = NodeAgent(cluster.api, ps, "node-b", KeyedTryLock(), capacity_interval=1.0,
                          workers=2)
        agent.start(sync_timeout=5)
        cluster.agents["node-b"] = agent
        node = cluster.api.objects[NODES]["node-b"]
        entry = node["status"]["pools"][0]
        assert entry["up"] is False and entry["started"] is False
        assert "device-mapper is missing" in entry["message"]
        wait_for(lambda: any(e[:2] == ("node-b", "PoolStartFailed")
                             for e in cluster.api.events))
        wait_for(lambda: "node-b" in cluster.state.node_pools())
        # the controller refuses at once, naming the node's start error
        with pytest.raises(Unavailable, match="device-mapper is missing"):
            create_at(on("node-b"), cluster.kpool, request("pvc-b"))
        assert cluster.kpool.capacity_on("node-b") is None  # GetCapacity: 0 there
        assert create_at(on("node-a"), cluster.kpool, request("pvc-a")).id in good.volumes
        bad.fixed = True
        wait_for(lambda: ps.failure("local") is None)
        wait_for(lambda: any(e[:2] == ("node-b", "PoolStarted") for e in cluster.api.events))
        wait_for(lambda: (cluster.state.node_pools().get("node-b", {}).get("local", {})
                          .get("started")) is True)
        assert create_at(on("node-b"), cluster.kpool, request("pvc-b")).id in bad.volumes
        ps.stop()
    finally:
        cluster.stop()


def test_nfs_mount_dir_follows_the_state_dir() -> None:
    from csi.pools import build_pool
    from csi.pools.nfs import NfsPool
    from csi.system import System

    spec: dict[str, object] = {"name": "shared", "type": "nfs", "server": "nfs.invalid",
                               "share": "/export"}
    pool = build_pool(spec, System(), "node-1-controller", "/tmp/flotilla")
    assert isinstance(pool, NfsPool)
    assert pool.mount_dir == "/tmp/flotilla/nfs/shared"
    assert pool.instance == "node-1-controller"
    unset = build_pool(spec, System())
    assert isinstance(unset, NfsPool) and unset.mount_dir == "/var/lib/flotilla/nfs/shared"
    explicit = build_pool({**spec, "mount_dir": "/mnt/x"}, System(), state_dir="/tmp/f")
    assert isinstance(explicit, NfsPool) and explicit.mount_dir == "/mnt/x"

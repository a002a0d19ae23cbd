"""Concurrency: one name raced by 32 callers, and a bounded mixed storm over 100 volumes."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from csi._proto import csi_pb2
from tests.helpers import CSIClient, MiB, loops_backed_by, mount_cap, mounts_under
from tests.reliability.conftest import Rig

pytestmark = pytest.mark.root

CAP = mount_cap("xfs")
SIZE = 320 * MiB
#: codes a storm may legitimately see: busy ids, ordering races, in-use volumes
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION}


def test_32_creates_of_one_name_make_one_volume(rig: Rig) -> None:
    rig.driver.start()
    channels = [grpc.insecure_channel(f"unix://{rig.driver.socket}") for _ in range(32)]
    barrier = threading.Barrier(32)
    req = csi_pb2.CreateVolumeRequest(name="contended", volume_capabilities=[CAP],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE))

    def call(i: int) -> str:
        client = CSIClient(channels[i])
        barrier.wait()
        try:
            return str(client.controller.CreateVolume(req).volume.volume_id)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.ABORTED, err.details()
            return "ABORTED"

    try:
        with ThreadPoolExecutor(32) as ex:
            results = list(ex.map(call, range(32)))
    finally:
        for ch in channels:
            ch.close()
    winners = {r for r in results if r != "ABORTED"}
    assert len(winners) == 1, Counter(results)
    assert len(rig.named("contended")) == 1
    assert rig.leftovers() == []


class Storm:
    """Random operations from several threads over a fixed set of volume names."""

    def __init__(self, client: CSIClient, rig: Rig, names: list[str], seed: int) -> None:
        self.c = client
        self.rig = rig
        self.names = names
        self.rand = random.Random(seed)
        self.codes: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.lock = threading.Lock()

    def ids(self) -> dict[str, str]:
        return {m["name"]: str(m["id"]) for m in self.rig.metas()}  # type: ignore[misc]

    def paths(self, name: str) -> tuple[str, str]:
        staging = self.rig.root / "staging" / name
        staging.mkdir(parents=True, exist_ok=True)
        return str(staging), str(self.rig.root / "pods" / name)

    def one(self, rand: random.Random) -> None:
        name = rand.choice(self.names)
        vid = self.ids().get(name, f"p:vol-{'0' * 32}")
        staging, target = self.paths(name)
        snaps = [str(m["id"]) for m in self.rig.metas("snapshots")]
        ctl, node = self.c.controller, self.c.node
        action = rand.choice(["create", "create", "snapshot", "restore", "expand", "delete",
                              "delete_snapshot", "stage", "publish", "unpublish", "unstage",
                              "list"])
        try:
            if action == "create":
                ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
                    name=name, volume_capabilities=[CAP],
                    capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE)))
            elif action == "snapshot":
                ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                    name=f"snap-{name}-{rand.randrange(3)}", source_volume_id=vid))
            elif action == "restore" and snaps:
                req = csi_pb2.CreateVolumeRequest(
                    name=f"{name}-r{rand.randrange(2)}", volume_capabilities=[CAP],
                    capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZE))
                req.volume_content_source.snapshot.snapshot_id = rand.choice(snaps)
                ctl.CreateVolume(req)
            elif action == "expand":
                ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=vid, capacity_range=csi_pb2.CapacityRange(
                        required_bytes=SIZE + rand.randrange(1, 4) * 64 * MiB)))
            elif action == "delete":
                ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
            elif action == "delete_snapshot" and snaps:
                ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=rand.choice(snaps)))
            elif action == "stage":
                node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                    volume_id=vid, staging_target_path=staging, volume_capability=CAP))
            elif action == "publish":
                node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                    volume_id=vid, staging_target_path=staging, target_path=target,
                    volume_capability=CAP))
            elif action == "unpublish":
                node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=vid, target_path=target))
            elif action == "unstage":
                node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=vid, staging_target_path=staging))
            else:
                ctl.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=10))
            code = grpc.StatusCode.OK
            detail = ""
        except grpc.RpcError as err:
            code, detail = err.code(), err.details() or ""
        with self.lock:
            self.codes[f"{action}:{code.name}"] += 1
            # a name reused with another source (a snapshot of a since-recreated volume,
            # a restore from a different snapshot) is correctly ALREADY_EXISTS
            reused = code == grpc.StatusCode.ALREADY_EXISTS and action in ("restore",
                                                                            "snapshot")
            if code not in EXPECTED and not reused:
                self.unexpected.append(f"{action} {name}: {code.name} {detail}")

    def run(self, seconds: float, threads: int) -> None:
        deadline = time.monotonic() + seconds

        def worker(seed: int) -> None:
            rand = random.Random(seed)
            while time.monotonic() < deadline:
                self.one(rand)

        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(worker, [self.rand.randrange(1 << 30) for _ in range(threads)]))


def test_mixed_storm_keeps_every_invariant(rig: Rig) -> None:
    c = rig.driver.start()
    names = [f"storm-{i:03d}" for i in range(100)]
    storm = Storm(c, rig, names, seed=int(os.environ.get("FLOTILLA_STORM_SEED", "7")))
    storm.run(seconds=40, threads=8)
    print(f"storm: {sum(storm.codes.values())} calls: {dict(sorted(storm.codes.items()))}")
    assert not storm.unexpected, storm.unexpected[:20]
    assert sum(v for k, v in storm.codes.items() if k.endswith(":OK")) > 100

    # invariants: storage == what the driver reports; accounting == sum of objects
    assert rig.leftovers() == []
    listed = {}
    token = ""
    while True:
        page = c.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=7,
                                                                   starting_token=token))
        listed.update({e.volume.volume_id: e.volume.capacity_bytes for e in page.entries})
        token = page.next_token
        if not token:
            break
    metas = {str(m["id"]): int(m["size"]) for m in rig.metas()}  # type: ignore[call-overload]
    assert listed == metas
    for vid, size in metas.items():
        assert rig.image(vid).stat().st_size == size
    st = os.statvfs(rig.pool)
    available = c.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
    assert available == int(st.f_blocks * st.f_frsize * 10.0) - sum(metas.values())
    names_seen = [m["name"] for m in rig.metas()]
    assert len(names_seen) == len(set(names_seen)), "a name exists twice"
    snaps = rig.metas("snapshots")
    assert len({s["name"] for s in snaps}) == len(snaps)

    # tear everything down through the API: it all still works
    for name in {*names, *(str(n) for n in names_seen)}:
        staging, target = storm.paths(name)
        vid = storm.ids().get(name)
        if vid is None:
            continue
        c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid,
                                                                      target_path=target))
        c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=staging))
        c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    for s in rig.metas("snapshots"):
        c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=str(s["id"])))
    assert rig.metas() == [] and rig.metas("snapshots") == []
    assert c.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity > 0
    assert mounts_under(str(rig.root)) == []
    assert loops_backed_by(str(rig.pool)) == []


def test_parallel_lifecycles_never_refuse_the_final_delete(rig: Rig) -> None:
    """8 pods' worth of create -> stage -> publish -> unpublish -> unstage -> delete at once:
    NodeUnstageVolume returns only once its loop device is gone, so DeleteVolume never
    finds the volume still attached (concurrent losetup scans hold devices open)."""
    c = rig.driver.start()

    def lifecycle(i: int) -> list[str]:
        refused = []
        for round_ in range(4):
            name = f"life-{i}-{round_}"
            vid = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                name=name, volume_capabilities=[CAP],
                capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE))).volume.volume_id
            staging = rig.root / "staging" / name
            staging.mkdir(parents=True)
            target = rig.root / "pods" / name
            c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=str(staging), volume_capability=CAP))
            c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=vid, staging_target_path=str(staging), target_path=str(target),
                volume_capability=CAP))
            c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=vid, target_path=str(target)))
            c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=vid, staging_target_path=str(staging)))
            try:
                c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
            except grpc.RpcError as err:
                refused.append(f"{name}: {err.code().name} {err.details()}")
        return refused

    with ThreadPoolExecutor(8) as ex:
        refused = [r for rs in ex.map(lifecycle, range(8)) for r in rs]
    assert refused == []
    assert rig.metas() == [] and rig.leftovers() == []
    assert loops_backed_by(str(rig.pool)) == []

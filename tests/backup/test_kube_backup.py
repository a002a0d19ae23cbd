"""Distributed mode with backups, on the in-memory API server of the unit tests: the node
that holds a snapshot backs it up (readyToUse false, then true), a volume from it is
placed on the scheduler's node, whose agent restores it from the target; deleting the
snapshot deletes the backup."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.backup import engine
from csi.backup.manager import BackupManager
from csi.backup.pool import BackedUpPool
from csi.backup.targets import DirTarget
from csi.kube.agent import NodeAgent
from csi.kube.pool import KubePool
from csi.locks import KeyedTryLock
from csi.pools import PoolSet
from csi.pools.base import Placement, Snapshot, Source, Volume, VolumeRequest
from tests.unit.test_kube import Cluster, MemoryPool, create_at

MiB = 1 << 20


class ImagePool(MemoryPool):
    """MemoryPool whose volumes and snapshots are files (what the backup reads/writes)."""

    backups = True

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        folder.mkdir()

    def file(self, object_id: str) -> Path:
        return self.folder / object_id.split(":", 1)[1]

    def create_volume(self, req: VolumeRequest) -> Volume:
        vol = super().create_volume(req)
        if not self.file(vol.id).exists():
            with open(self.file(vol.id), "wb") as f:
                f.truncate(vol.size)
        return vol

    def create_snapshot(self, name: str, source_volume_id: str,
                        parameters: dict[str, str]) -> Snapshot:
        snap = super().create_snapshot(name, source_volume_id, parameters)
        if not self.file(snap.id).exists():
            self.file(snap.id).write_bytes(self.file(source_volume_id).read_bytes())
        return snap

    @contextlib.contextmanager
    def read_snapshot(self, snapshot_id: str) -> Iterator[str]:
        yield str(self.file(snapshot_id))

    def attach(self, volume_id: str) -> str:
        return str(self.file(volume_id))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Cluster, dict[str, ImagePool], DirTarget]]:
    c = Cluster(timeout=10)
    c.state.start(sync_timeout=5)
    target = DirTarget("nas", str(tmp_path / "target"))
    pools: dict[str, ImagePool] = {}
    managers = []
    for node in ("node-a", "node-b"):
        pool = pools[node] = ImagePool(tmp_path / node)
        backups = BackupManager({"nas": target}, str(tmp_path / f"{node}-state"), node)
        managers.append(backups)
        agent = NodeAgent(c.api, PoolSet([BackedUpPool(pool, backups)]), node, KeyedTryLock(),
                          capacity_interval=1.0, workers=2)
        backups.on_done = agent.backup_done  # as csi.wiring.node_agent does
        agent.start(sync_timeout=5)
        c.agents[node] = agent
    # the controller's view of the target (csi.wiring.controller_pools)
    catalog = BackupManager({"nas": target}, str(tmp_path / "controller-state"), "ctl")
    managers.append(catalog)
    c.kpool = KubePool(ImagePool(tmp_path / "template"), c.state, catalog)
    yield c, pools, target
    c.stop()
    for m in managers:
        m.stop()


def on(node: str) -> Placement:
    return Placement(preferred=(node,), requisite=("node-a", "node-b"))


def test_backup_and_restore_on_the_other_node(
        rig: tuple[Cluster, dict[str, ImagePool], DirTarget]) -> None:
    c, pools, target = rig
    req = VolumeRequest(name="pvc-1", size=64 * MiB, required=64 * MiB, limit=0,
                        fs_type="ext4", block=False)
    vol = create_at(on("node-a"), c.kpool, req)
    image = pools["node-a"].file(vol.id)
    with open(image, "r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(9 * MiB))

    snap = c.kpool.create_snapshot("snap-1", vol.id, {"backupTarget": "nas"})
    deadline = time.monotonic() + 20
    while not snap.ready:
        assert time.monotonic() < deadline, "the backup never made the snapshot ready"
        time.sleep(0.05)
        snap = c.kpool.create_snapshot("snap-1", vol.id, {"backupTarget": "nas"})
    assert target.exists(engine.manifest_key(snap.id))
    m = engine.read_manifest(target, snap.id)
    assert m.node == "node-a" and m.source_volume_id == vol.id and len(m.chunks) == 3

    # the scheduler picked node-b, which does not hold the snapshot: restored from there
    restore = VolumeRequest(name="pvc-2", size=64 * MiB, required=64 * MiB, limit=0,
                            fs_type="ext4", block=False, source=Source("snapshot", snap.id))
    restored = create_at(on("node-b"), c.kpool, restore)
    assert c.kpool.node_of(restored.id) == "node-b"
    assert restored.source == Source("snapshot", snap.id)
    assert restored.id in pools["node-b"].volumes
    got = pools["node-b"].file(restored.id).read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(image.read_bytes()).digest()

    # a restore onto the snapshot's own node clones it locally (no target read)
    local = create_at(on("node-a"), c.kpool, VolumeRequest(
        name="pvc-3", size=64 * MiB, required=64 * MiB, limit=0, fs_type="ext4",
        block=False, source=Source("snapshot", snap.id)))
    assert c.kpool.node_of(local.id) == "node-a"

    c.kpool.delete_snapshot(snap.id)
    assert not target.exists(engine.manifest_key(snap.id))
    deadline = time.monotonic() + 10
    while list(target.list("chunks/")):
        assert time.monotonic() < deadline, "chunks were not collected"
        time.sleep(0.05)

"""Crash injection: SIGKILL the driver at named points inside each operation, restart it,
retry the call, and check that it converged to exactly one complete object with nothing
leaked and no other data touched."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from csi._proto import csi_pb2
from tests.helpers import CSIClient, GiB, MiB, loops_backed_by, mount_cap, mounts_under
from tests.reliability.conftest import Rig

pytestmark = pytest.mark.root

CAP = mount_cap("ext4")
Op = Callable[[CSIClient, dict[str, str], Rig], None]


def snap_source(snapshot_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def create_req(name: str, size: int = GiB,
               source: csi_pb2.VolumeContentSource | None = None) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[CAP],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=size))
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return req


def staging(rig: Rig, name: str) -> str:
    path = rig.root / "staging" / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def stage(c: CSIClient, rig: Rig, vid: str, name: str) -> str:
    path = staging(rig, name)
    c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=path, volume_capability=CAP))
    return path


# ---- operations under test: each must be safe to call again after a crash -------------

def op_create(c: CSIClient, ids: dict[str, str], rig: Rig) -> None:
    c.controller.CreateVolume(create_req("fresh"))


def op_restore(c: CSIClient, ids: dict[str, str], rig: Rig) -> None:
    c.controller.CreateVolume(create_req("restored", 2 * GiB, snap_source(ids["keep-snap"])))


def op_clone(c: CSIClient, ids: dict[str, str], rig: Rig) -> None:
    src = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(
        volume_id=ids["keep"]))
    c.controller.CreateVolume(create_req("cloned", GiB, src))


def op_snapshot(c: CSIClient, ids: dict[str, str], rig: Rig) -> None:
    c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="busy-snap", source_volume_id=ids["busy"]))


def op_expand(c: CSIClient, ids: dict[str, str], rig: Rig) -> None:
    c.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=ids["growme"], capacity_range=csi_pb2.CapacityRange(required_bytes=3 * GiB)))


def op_delete(c: CSIClient, ids: dict[str, str], rig: Rig) -> None:
    c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=ids["victim"]))


def op_delete_snapshot(c: CSIClient, ids: dict[str, str], rig: Rig) -> None:
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=ids["victim-snap"]))


def op_stage(c: CSIClient, ids: dict[str, str], rig: Rig) -> None:
    stage(c, rig, ids["stageme"], "stageme")


def op_publish(c: CSIClient, ids: dict[str, str], rig: Rig) -> None:
    c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=ids["busy"], staging_target_path=staging(rig, "busy"),
        target_path=str(rig.root / "pods" / "busy"), volume_capability=CAP))


CASES: list[tuple[str, Op]] = [
    ("filepool.volumes.meta-written", op_create),
    ("filepool.volumes.image-in-place", op_create),
    ("filepool.volumes.committed", op_create),
    ("filepool.create.cloned", op_restore),
    ("filepool.volumes.meta-written", op_restore),
    ("filepool.volumes.image-in-place", op_restore),
    ("filepool.create.cloned", op_clone),
    ("filepool.volumes.image-in-place", op_clone),
    ("filepool.snapshot.frozen", op_snapshot),
    ("filepool.snapshots.meta-written", op_snapshot),
    ("filepool.snapshots.image-in-place", op_snapshot),
    ("filepool.snapshots.committed", op_snapshot),
    ("filepool.expand.truncated", op_expand),
    ("filepool.volumes.removed.json", op_delete),
    ("filepool.snapshots.removed.json", op_delete_snapshot),
    ("node.stage.attached", op_stage),
    ("node.stage.formatted", op_stage),
    ("node.stage.mounted", op_stage),
    ("node.publish.target-created", op_publish),
]


def baseline(rig: Rig) -> dict[str, str]:
    """Objects every case starts from, made by a driver without crash points."""
    c = rig.driver.start()
    ids = {}
    for name in ("keep", "busy", "growme", "victim", "stageme"):
        ids[name] = c.controller.CreateVolume(create_req(name)).volume.volume_id
    keep = stage(c, rig, ids["keep"], "keep")
    with open(os.path.join(keep, "data"), "wb") as f:
        f.write(os.urandom(8 * MiB))
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=ids["keep"], staging_target_path=keep))
    for snap, vol in (("keep-snap", "keep"), ("victim-snap", "victim")):
        ids[snap] = c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=snap, source_volume_id=ids[vol])).snapshot.snapshot_id
    busy = stage(c, rig, ids["busy"], "busy")
    with open(os.path.join(busy, "before"), "wb") as f:
        f.write(os.urandom(MiB))
    assert rig.driver.stop() == 0
    return ids


def writable(path: str) -> bool:
    """Can we write and sync a file there within 20 s (a frozen filesystem hangs)?"""
    proc = subprocess.run(["timeout", "20", "sh", "-c", f"echo ok > '{path}/probe' && sync -f "
                           f"'{path}/probe'"], check=False, capture_output=True)
    return proc.returncode == 0


@pytest.mark.parametrize(("point", "op"), CASES, ids=[f"{p}-{o.__name__[3:]}" for p, o in CASES])
def test_kill_and_retry_converges(rig: Rig, point: str, op: Op) -> None:
    ids = baseline(rig)
    digests = {k: rig.digest(ids[k]) for k in ("keep", "keep-snap")}

    rig.driver.env = {"FLOTILLA_CRASH_AT": point}
    c = rig.driver.start()
    with pytest.raises(grpc.RpcError) as err:
        op(c, ids, rig)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (
        f"crash point {point} was not reached: {err.value.details()}")
    assert rig.driver.proc is not None
    assert rig.driver.proc.wait(timeout=30) == -9
    rig.driver.proc = None
    rig.driver._close()

    rig.driver.env = {}
    c = rig.driver.start()
    op(c, ids, rig)  # the CO's retry
    op(c, ids, rig)  # and once more: idempotent

    assert rig.leftovers() == []
    for name in ("fresh", "restored", "cloned", "keep", "busy", "growme"):
        assert len(rig.named(name)) <= 1, f"{name} exists twice"
    for name, want in (("fresh", op_create), ("restored", op_restore), ("cloned", op_clone)):
        if op is want:
            (meta,) = rig.named(name)
            assert rig.image(str(meta["id"])).stat().st_size == meta["size"]
    if op is op_snapshot:
        assert len(rig.named("busy-snap", "snapshots")) == 1
    if op is op_expand:
        (meta,) = rig.named("growme")
        assert meta["size"] == 3 * GiB
        assert rig.image(ids["growme"]).stat().st_size == 3 * GiB
    if op is op_delete:
        assert rig.named("victim") == [] and not rig.image(ids["victim"]).exists()
        assert rig.named("victim-snap", "snapshots"), "deleting a volume took its snapshot"
    if op is op_delete_snapshot:
        assert rig.named("victim-snap", "snapshots") == []
    if op is op_stage:
        assert os.path.ismount(staging(rig, "stageme"))
        assert len(loops_backed_by(str(rig.image(ids["stageme"])))) == 1
    if op is op_publish:
        assert os.path.ismount(rig.root / "pods" / "busy")
    # the busy volume's filesystem is usable: not left frozen, data intact
    assert writable(staging(rig, "busy")), "filesystem left frozen after the crash"
    assert os.path.getsize(os.path.join(staging(rig, "busy"), "before")) == MiB
    assert {k: rig.digest(ids[k]) for k in digests} == digests, "untouched data changed"

    # everything can still be torn down cleanly
    target = rig.root / "pods" / "busy"
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=ids["busy"], target_path=str(target)))
    for name in ("busy", "stageme"):
        c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=ids[name], staging_target_path=staging(rig, name)))
    assert mounts_under(str(rig.root)) == []
    assert loops_backed_by(str(rig.pool)) == []
    assert rig.driver.stop() == 0


# Points of pools that need a kernel this host lacks (device-mapper, nfsd). No tier sets
# FLOTILLA_CRASH_AT for them yet (issue 21); they are named here so that this list can only
# shrink: a new point anywhere else must be exercised by CASES.
NOT_EXERCISED = {"lvmthin.create.snapshotted", "lvmthin.expand.tagged",
                 "nfs.create.copied", "nfs.snapshot.copied"}


def test_every_crash_point_is_exercised() -> None:
    src = Path(__file__).resolve().parents[2] / "csi"
    literal = re.compile(r'crashpoint\("([^"]+)"\)')
    declared = {m for path in src.rglob("*.py") for m in literal.findall(path.read_text())}
    assert {"node.stage.attached", "filepool.create.cloned"} <= declared, "scan found nothing"
    # the object store's commit and removal steps, for filepool volumes and snapshots
    store = (src / "pools" / "store.py").read_text()
    steps = re.findall(r'crashpoint\(f"\{self\.crash_prefix\}\.\{kind\}\.([^"]+)"', store)
    assert sorted(steps) == ["committed", "image-in-place", "meta-written", "removed.json"]
    declared |= {f"filepool.{kind}.{step}" for kind in ("volumes", "snapshots")
                 for step in steps}
    tested = {p for p, _ in CASES}
    assert declared >= NOT_EXERCISED, f"stale names: {NOT_EXERCISED - declared}"
    assert not NOT_EXERCISED & tested, "exercised now: drop from NOT_EXERCISED"
    assert sorted(declared - tested - NOT_EXERCISED) == []

"""A pool filled from inside a volume: ENOSPC there, everything else intact, new volumes
refused, metrics say so, and deleting data gives the space back."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest

from csi._proto import csi_pb2
from tests.conftest import require_root
from tests.helpers import CSIClient, DriverProcess, GiB, MiB, loop_filesystem, mount_cap

pytestmark = pytest.mark.root

CAP = mount_cap("ext4")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith(name + "{") and 'pool="p"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_full_pool(workdir: Path) -> None:
    require_root()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with loop_filesystem(workdir, "xfs", size=GiB, name="small") as fs:
        root = workdir / "kubelet"
        driver = DriverProcess(workdir, [{"name": "p", "type": "filepool",
                                          "path": str(fs / "pool"), "overprovision_ratio": 4.0,
                                          "max_used_percent": 90}],
                               allowed_roots=[str(root)],
                               extra_args=("--metrics-address", f"127.0.0.1:{port}"))
        c = driver.start()
        try:
            run(c, root, port)
        finally:
            assert driver.stop() == 0


def run(c: CSIClient, root: Path, port: int) -> None:
    ctl, node = c.controller, c.node

    def create(name: str, size: int, snap: str = "") -> str:
        req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[CAP],
                                          capacity_range=csi_pb2.CapacityRange(
                                              required_bytes=size))
        if snap:
            req.volume_content_source.snapshot.snapshot_id = snap
        return str(ctl.CreateVolume(req).volume.volume_id)

    def stage(vid: str, name: str) -> Path:
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(path), volume_capability=CAP))
        return path

    def unstage(vid: str, path: Path) -> None:
        node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=str(path)))

    keep = create("keep", 256 * MiB)
    kpath = stage(keep, "keep")
    (kpath / "data").write_bytes(os.urandom(32 * MiB))
    digest = sha(kpath / "data")
    snap = ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="keep-snap", source_volume_id=keep)).snapshot.snapshot_id

    filler = create("filler", 2 * GiB)
    fpath = stage(filler, "filler")
    failure = None
    for i in range(40):  # at most 2.5 GiB into a 1 GiB pool
        try:
            with open(fpath / f"fill-{i}", "wb") as f:
                for _ in range(64):
                    f.write(os.urandom(MiB))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            failure = err
            break
    assert failure is not None, "filling the pool never failed"
    assert failure.errno == errno.ENOSPC, failure

    # new volumes are refused, naming the limit; capacity and metrics say why
    with pytest.raises(grpc.RpcError) as refused:
        create("refused", 64 * MiB)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_used_percent" in (refused.value.details() or "")
    assert ctl.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity == 0
    used, size = metric(port, "flotilla_pool_used_bytes"), metric(port, "flotilla_pool_size_bytes")
    assert used / size > 0.9
    assert metric(port, "flotilla_pool_available_bytes") == 0

    # the other volume and the snapshot are intact
    unstage(keep, kpath)
    kpath = stage(keep, "keep")
    assert sha(kpath / "data") == digest

    # deleting data (online discard punches the holes) gives the space back
    for p in fpath.glob("fill-*"):
        p.unlink()
    os.sync()
    unstage(filler, fpath)
    assert metric(port, "flotilla_pool_used_bytes") / size < 0.5
    restored = create("restored", 256 * MiB, snap)
    rpath = stage(restored, "restored")
    assert sha(rpath / "data") == digest
    for vid, path in ((restored, rpath), (keep, kpath)):
        unstage(vid, path)
    for vid in (restored, keep, filler):
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap))

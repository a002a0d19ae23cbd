"""The nfs pool through the driver on a real NFS server: ReadWriteMany publishes,
read-only publishes, a stale handle remounted, and a dead server that never blocks the
driver. Needs an NFS server (``FLOTILLA_NFS_SERVER`` ...): the VM tier runs kernel nfsd
and sets it; ``FLOTILLA_NFSD_CONTROL=1`` lets the dead-server test stop and restart nfsd.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi._proto import csi_pb2
from tests.conftest import require_root
from tests.helpers import CSIClient, DriverProcess, MiB, mount_cap, mounts_under

pytestmark = pytest.mark.root

RWX = csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER


@dataclass
class Nfs:
    client: CSIClient
    driver: DriverProcess
    root: Path
    export_dir: Path


@pytest.fixture
def nfs(workdir: Path) -> Iterator[Nfs]:
    require_root()
    if not os.environ.get("FLOTILLA_NFS_SERVER"):
        pytest.skip("needs an NFS server (FLOTILLA_NFS_SERVER/_SHARE/_EXPORT_DIR); the VM "
                    "tier runs kernel nfsd for these tests")
    sub = f"node-{uuid.uuid4().hex[:8]}"
    export_dir = Path(os.environ["FLOTILLA_NFS_EXPORT_DIR"]) / sub
    export_dir.mkdir()
    root = workdir / "kubelet"
    root.mkdir()
    driver = DriverProcess(workdir, [{
        "name": "shared", "type": "nfs", "server": os.environ["FLOTILLA_NFS_SERVER"],
        "share": posixpath.join(os.environ["FLOTILLA_NFS_SHARE"], sub),
        "mount_dir": str(workdir / "export"), "mount_timeout": 20}],
        allowed_roots=[str(root)])
    try:
        yield Nfs(driver.start(), driver, root, export_dir)
    finally:
        driver.stop()
        shutil.rmtree(export_dir, ignore_errors=True)


def create(n: Nfs, name: str, mode: int = RWX) -> str:
    return str(n.client.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_cap(mode=mode)],
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB))).volume.volume_id)


def publish(n: Nfs, vid: str, name: str, readonly: bool = False,
            flags: tuple[str, ...] = ()) -> str:
    staging = n.root / "staging" / name
    staging.mkdir(parents=True, exist_ok=True)
    cap = mount_cap(mode=RWX, flags=flags)
    n.client.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=cap))
    target = str(n.root / "pods" / name)
    n.client.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), target_path=target,
        volume_capability=cap, readonly=readonly))
    return target


def unpublish(n: Nfs, vid: str, name: str) -> None:
    n.client.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=vid, target_path=str(n.root / "pods" / name)))
    n.client.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vid, staging_target_path=str(n.root / "staging" / name)))


def test_read_write_many(nfs: Nfs) -> None:
    vid = create(nfs, "shared")
    a = publish(nfs, vid, "pod-a")
    b = publish(nfs, vid, "pod-b", flags=("noatime",))
    ro = publish(nfs, vid, "pod-ro", readonly=True)
    publish(nfs, vid, "pod-a")  # repeated: no-op
    Path(a, "hello").write_text("from a")
    assert Path(b, "hello").read_text() == "from a"
    assert Path(ro, "hello").read_text() == "from a"
    with pytest.raises(OSError) as err:
        Path(ro, "nope").write_text("x")
    assert err.value.errno == errno.EROFS
    stats = nfs.client.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vid, volume_path=b))
    assert stats.usage[0].total > 0 and not stats.volume_condition.abnormal
    with pytest.raises(grpc.RpcError) as blk:
        nfs.client.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="blk", volume_capabilities=[csi_pb2.VolumeCapability(
                block=csi_pb2.VolumeCapability.BlockVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(mode=RWX))]))
    assert blk.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filesystem volumes only" in (blk.value.details() or "")
    for name in ("pod-a", "pod-b", "pod-ro"):
        unpublish(nfs, vid, name)
        assert not os.path.exists(nfs.root / "pods" / name)
    nfs.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert not (nfs.export_dir / "volumes" / vid.split("-", 1)[1]).exists()


def test_stale_handle_is_detected_and_remounted(nfs: Nfs) -> None:
    vid = create(nfs, "stale")
    target = publish(nfs, vid, "pod")
    Path(target, "f").write_text("before")
    vdir = nfs.export_dir / "volumes" / vid.split("-", 1)[1]
    # the server replaces the directory: the client's handle goes stale (ESTALE)
    shutil.rmtree(vdir)
    vdir.mkdir()
    vdir.chmod(0o777)
    stats = nfs.client.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vid, volume_path=target))
    assert stats.volume_condition.abnormal, "a stale handle was reported healthy"
    publish(nfs, vid, "pod")  # the CO's retry: the stale mount is replaced
    Path(target, "g").write_text("after")
    assert (vdir / "g").read_text() == "after"
    stats = nfs.client.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vid, volume_path=target))
    assert not stats.volume_condition.abnormal
    unpublish(nfs, vid, "pod")
    nfs.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))


def nfsd(threads: int) -> None:
    subprocess.run(["rpc.nfsd", str(threads)], check=True, timeout=60)


def test_dead_server_never_blocks_the_driver(nfs: Nfs) -> None:
    if os.environ.get("FLOTILLA_NFSD_CONTROL") != "1":
        pytest.skip("stopping the NFS server needs FLOTILLA_NFSD_CONTROL=1 (a server this "
                    "test may stop: the VM tier's own nfsd)")
    hung = create(nfs, "hung")
    target = publish(nfs, hung, "hung")
    Path(target, "f").write_text("x")
    nfsd(0)  # the server stops answering; the hard mount now hangs
    try:
        started = time.monotonic()
        stats = nfs.client.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=hung, volume_path=target), timeout=60)
        assert stats.volume_condition.abnormal
        assert time.monotonic() - started < 30, "stats waited on the dead server"
        # other calls keep flowing while that mount is dead
        done = threading.Event()

        def probe() -> None:
            nfs.client.identity.Probe(csi_pb2.ProbeRequest(), timeout=60)
            nfs.client.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(),
                                                timeout=60)
            done.set()

        threading.Thread(target=probe, daemon=True).start()
        assert done.wait(40), "the driver stopped answering while a server was down"
        started = time.monotonic()
        nfs.client.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=hung, target_path=target), timeout=90)
        assert time.monotonic() - started < 60
        assert target not in mounts_under(str(nfs.root))
    finally:
        nfsd(8)
    # the server is back: the volume can be published again and its data is there
    target = publish(nfs, hung, "hung")
    assert Path(target, "f").read_text() == "x"
    unpublish(nfs, hung, "hung")
    nfs.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=hung))

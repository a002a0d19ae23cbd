"""Node service on real loop devices, filesystems and mounts, through real gRPC."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi._proto import csi_pb2
from tests.conftest import require_root
from tests.helpers import (
    CSIClient,
    DriverProcess,
    GiB,
    MiB,
    block_cap,
    loop_filesystem,
    loops_backed_by,
    mount_cap,
    run,
)

pytestmark = pytest.mark.root


@dataclass
class Env:
    client: CSIClient
    driver: DriverProcess
    root: Path  # allowed root for staging/target paths
    pool_path: Path


@pytest.fixture
def env(workdir: Path) -> Iterator[Env]:
    require_root()
    with loop_filesystem(workdir, "xfs", size=16 * GiB, name="host") as mnt:
        root = workdir / "kubelet"
        root.mkdir()
        driver = DriverProcess(workdir, [{"name": "p", "type": "filepool",
                                          "path": str(mnt / "pool")}],
                               allowed_roots=[str(root)])
        client = driver.start()
        try:
            yield Env(client, driver, root, mnt / "pool")
        finally:
            assert driver.stop() == 0


def create(env: Env, name: str, size: int = GiB, cap: csi_pb2.VolumeCapability | None = None,
           source: csi_pb2.VolumeContentSource | None = None,
           **params: str) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[cap or mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=size), parameters=params)
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return env.client.controller.CreateVolume(req).volume


def stage(env: Env, vid: str, cap: csi_pb2.VolumeCapability, name: str) -> str:
    path = env.root / "staging" / name
    path.mkdir(parents=True, exist_ok=True)
    env.client.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(path), volume_capability=cap))
    return str(path)


def publish(env: Env, vid: str, cap: csi_pb2.VolumeCapability, staging: str, name: str,
            readonly: bool = False) -> str:
    target = env.root / "pods" / name
    env.client.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=staging, target_path=str(target),
        volume_capability=cap, readonly=readonly))
    return str(target)


def unpublish(env: Env, vid: str, target: str) -> None:
    env.client.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=vid, target_path=target))


def unstage(env: Env, vid: str, staging: str) -> None:
    env.client.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vid, staging_target_path=staging))


def delete(env: Env, vid: str) -> None:
    env.client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))


def fs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def expect_code(code: grpc.StatusCode, fn: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.code() == code, info.value.details()
    return info.value


def has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))
    return False


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_mount_lifecycle(env: Env, fs_type: str) -> None:
    cap = mount_cap(fs_type)
    vol = create(env, f"life-{fs_type}", cap=cap)
    staging = stage(env, vol.volume_id, cap, "s")
    stage(env, vol.volume_id, cap, "s")  # repeated: no-op
    target = publish(env, vol.volume_id, cap, staging, "t")
    publish(env, vol.volume_id, cap, staging, "t")  # repeated: no-op
    Path(target, "hello").write_text("world")
    ro = publish(env, vol.volume_id, cap, staging, "ro", readonly=True)
    assert Path(ro, "hello").read_text() == "world"
    with pytest.raises(OSError) as err:
        Path(ro, "nope").write_text("x")
    assert err.value.errno == errno.EROFS
    # same target, incompatible request (read-only now): ALREADY_EXISTS
    expect_code(grpc.StatusCode.ALREADY_EXISTS, publish, env, vol.volume_id, cap, staging,
                "t", True)
    stats = env.client.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=target))
    units = {u.unit: u for u in stats.usage}
    assert units[csi_pb2.VolumeUsage.BYTES].total > 0.8 * GiB
    assert units[csi_pb2.VolumeUsage.INODES].used > 0
    assert not stats.volume_condition.abnormal
    for t in (target, ro):
        unpublish(env, vol.volume_id, t)
        unpublish(env, vol.volume_id, t)  # repeated: no-op
        assert not os.path.exists(t), "NodeUnpublishVolume must remove the target"
    unstage(env, vol.volume_id, staging)
    unstage(env, vol.volume_id, staging)
    assert not os.path.ismount(staging)
    assert loops_backed_by(str(env.pool_path)) == []
    # data survives unstage/stage
    staging = stage(env, vol.volume_id, cap, "s")
    assert Path(staging, "hello").read_text() == "world"
    unstage(env, vol.volume_id, staging)
    delete(env, vol.volume_id)


def test_block_lifecycle(env: Env) -> None:
    cap = block_cap()
    vol = create(env, "blk", size=64 * MiB, cap=cap)
    staging = stage(env, vol.volume_id, cap, "bs")
    target = publish(env, vol.volume_id, cap, staging, "bt")
    publish(env, vol.volume_id, cap, staging, "bt")
    fd = os.open(target, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 64 * MiB
        os.pwrite(fd, b"x" * 4096, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    stats = env.client.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=target))
    assert stats.usage[0].total == 64 * MiB
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, env.client.controller.DeleteVolume,
                csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    unpublish(env, vol.volume_id, target)
    assert not os.path.exists(target)
    unstage(env, vol.volume_id, staging)
    delete(env, vol.volume_id)


def test_snapshot_of_a_busy_filesystem_is_consistent(env: Env) -> None:
    """Writers keep going while the snapshot freezes the filesystem around the clone."""
    cap = mount_cap("ext4")
    vol = create(env, "busy", cap=cap)
    staging = stage(env, vol.volume_id, cap, "busy")
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            with open(os.path.join(staging, f"f{i % 50}"), "wb") as f:
                f.write(os.urandom(256 * 1024))
            i += 1

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        snaps = [env.client.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=f"busy-{i}", source_volume_id=vol.volume_id)).snapshot for i in range(3)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    unstage(env, vol.volume_id, staging)
    for i, snap in enumerate(snaps):
        src = csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
            snapshot_id=snap.snapshot_id))
        restored = create(env, f"busy-restored-{i}", cap=cap, source=src)
        img = env.pool_path / "volumes" / (restored.volume_id.split("-", 1)[1] + ".img")
        check = run("e2fsck", "-fn", str(img), check=False)
        assert check.returncode == 0, f"snapshot {i} is not clean:\n{check.stdout}"
        delete(env, restored.volume_id)
        env.client.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
            snapshot_id=snap.snapshot_id))
    delete(env, vol.volume_id)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_restore_into_larger_volume_grows_filesystem(env: Env, fs_type: str) -> None:
    cap = mount_cap(fs_type)
    vol = create(env, f"src-{fs_type}", size=GiB, cap=cap)
    staging = stage(env, vol.volume_id, cap, "src")
    data = os.urandom(MiB)
    Path(staging, "data").write_bytes(data)
    snap = env.client.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=f"snap-{fs_type}", source_volume_id=vol.volume_id)).snapshot
    unstage(env, vol.volume_id, staging)
    src = csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
        snapshot_id=snap.snapshot_id))
    big = create(env, f"big-{fs_type}", size=3 * GiB, cap=cap, source=src)
    assert big.capacity_bytes == 3 * GiB
    assert big.content_source.snapshot.snapshot_id == snap.snapshot_id
    bstaging = stage(env, big.volume_id, cap, "big")
    assert Path(bstaging, "data").read_bytes() == data
    assert fs_size(bstaging) > 2.5 * GiB, "filesystem was not grown to the larger volume"
    unstage(env, big.volume_id, bstaging)
    delete(env, big.volume_id)
    delete(env, vol.volume_id)


def expand(env: Env, vid: str, size: int, path: str) -> int:
    resp = env.client.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=size)))
    assert resp.capacity_bytes == size and resp.node_expansion_required
    node = env.client.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vid, volume_path=path,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size)))
    return int(node.capacity_bytes)


def test_xfs_online_growth(env: Env) -> None:
    cap = mount_cap("xfs")
    vol = create(env, "grow-xfs", cap=cap)
    staging = stage(env, vol.volume_id, cap, "gx")
    target = publish(env, vol.volume_id, cap, staging, "gx")
    before = fs_size(target)
    assert expand(env, vol.volume_id, 2 * GiB, target) == 2 * GiB
    assert fs_size(target) > before + 0.9 * GiB
    unpublish(env, vol.volume_id, target)
    unstage(env, vol.volume_id, staging)
    delete(env, vol.volume_id)


def test_ext4_online_growth(env: Env) -> None:
    if not has_cap_sys_resource():
        pytest.skip("no CAP_SYS_RESOURCE: the kernel refuses online resize2fs (EPERM) "
                    "here; privileged node plugins have it, and the VM tier runs this test")
    cap = mount_cap("ext4")
    vol = create(env, "grow-ext4", cap=cap)
    staging = stage(env, vol.volume_id, cap, "ge")
    target = publish(env, vol.volume_id, cap, staging, "ge")
    before = fs_size(target)
    assert expand(env, vol.volume_id, 2 * GiB, target) == 2 * GiB
    assert fs_size(target) > before + 0.9 * GiB, "ext4 did not grow online"
    unpublish(env, vol.volume_id, target)
    unstage(env, vol.volume_id, staging)
    delete(env, vol.volume_id)


def test_ext4_growth_refused_online_happens_at_next_stage(env: Env) -> None:
    if has_cap_sys_resource():
        pytest.skip("CAP_SYS_RESOURCE is held: online ext4 growth succeeds, so the "
                    "deferred path (taken where the capability is missing) is not reached")
    cap = mount_cap("ext4")
    vol = create(env, "defer-ext4", cap=cap)
    staging = stage(env, vol.volume_id, cap, "de")
    before = fs_size(staging)
    assert expand(env, vol.volume_id, 2 * GiB, staging) == 2 * GiB
    assert fs_size(staging) == before  # refused online (EPERM): deferred, not an error
    unstage(env, vol.volume_id, staging)
    staging = stage(env, vol.volume_id, cap, "de")
    assert fs_size(staging) > before + 0.9 * GiB, "ext4 was not grown at the next stage"
    unstage(env, vol.volume_id, staging)
    delete(env, vol.volume_id)


def test_vanished_backing_image_is_an_abnormal_condition(env: Env) -> None:
    cap = mount_cap("ext4")
    vol = create(env, "vanish", cap=cap)
    staging = stage(env, vol.volume_id, cap, "vanish")
    img = env.pool_path / "volumes" / (vol.volume_id.split("-", 1)[1] + ".img")
    img.unlink()
    stats = env.client.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=staging))
    assert stats.volume_condition.abnormal
    got = env.client.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
        volume_id=vol.volume_id))
    assert got.status.volume_condition.abnormal
    assert "unreadable" in got.status.volume_condition.message
    unstage(env, vol.volume_id, staging)
    delete(env, vol.volume_id)


def test_paths_outside_roots_are_refused(env: Env, workdir: Path) -> None:
    cap = mount_cap()
    vol = create(env, "roots", cap=cap)
    for bad in ["/etc", str(workdir / "elsewhere"), str(env.root / ".." / "x")]:
        err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, env.client.node.NodeStageVolume,
                          csi_pb2.NodeStageVolumeRequest(volume_id=vol.volume_id,
                                                         staging_target_path=bad,
                                                         volume_capability=cap))
        assert "staging_target_path" in (err.details() or "")
    assert loops_backed_by(str(env.pool_path)) == []
    delete(env, vol.volume_id)


def test_checksums_survive_driver_restart(env: Env) -> None:
    cap = mount_cap("xfs")
    vol = create(env, "restart", cap=cap)
    staging = stage(env, vol.volume_id, cap, "r")
    target = publish(env, vol.volume_id, cap, staging, "r")
    Path(target, "data").write_bytes(os.urandom(4 * MiB))
    digest = hashlib.sha256(Path(target, "data").read_bytes()).hexdigest()
    assert env.driver.stop() == 0
    env.client = env.driver.start()
    assert hashlib.sha256(Path(target, "data").read_bytes()).hexdigest() == digest
    publish(env, vol.volume_id, cap, staging, "r")  # still a no-op after restart
    unpublish(env, vol.volume_id, target)
    unstage(env, vol.volume_id, staging)
    delete(env, vol.volume_id)
    assert subprocess.run(["findmnt", staging], capture_output=True,
                          check=False).returncode != 0


def test_deleted_data_goes_back_to_the_pool(env: Env) -> None:
    cap = mount_cap("ext4")
    vol = create(env, "trim", cap=cap)
    staging = stage(env, vol.volume_id, cap, "trim")
    img = env.pool_path / "volumes" / (vol.volume_id.split("-", 1)[1] + ".img")
    with open(os.path.join(staging, "big"), "wb") as f:
        for _ in range(128):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    full = img.stat().st_blocks * 512
    assert full >= 128 * MiB
    os.unlink(os.path.join(staging, "big"))
    os.sync()
    emptied = img.stat().st_blocks * 512
    assert emptied < full - 100 * MiB, f"image still holds {emptied} of {full} bytes"
    unstage(env, vol.volume_id, staging)
    delete(env, vol.volume_id)


@pytest.mark.parametrize("block", [False, True])
def test_unstage_while_published_is_refused(env: Env, block: bool) -> None:
    """Otherwise the publish would keep the filesystem alive on a detached device and the
    next stage would mount it a second time through a new one."""
    cap = block_cap() if block else mount_cap("xfs")
    vol = create(env, f"busy-{block}", size=512 * MiB, cap=cap)
    staging = stage(env, vol.volume_id, cap, "pub")
    target = publish(env, vol.volume_id, cap, staging, "pub")
    err = expect_code(grpc.StatusCode.FAILED_PRECONDITION, unstage, env, vol.volume_id, staging)
    assert "still published" in (err.details() or "")
    assert os.path.ismount(target)
    unpublish(env, vol.volume_id, target)
    unstage(env, vol.volume_id, staging)
    assert loops_backed_by(str(env.pool_path)) == []
    delete(env, vol.volume_id)

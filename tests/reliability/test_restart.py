"""Restart the node plugin under load: mounts stay, stats/unpublish/unstage still work,
and a vanished backing device is an abnormal condition, not a crash."""

from __future__ import annotations

import os
import threading

import pytest

from csi._proto import csi_pb2
from tests.helpers import CSIClient, block_cap, loops_backed_by, mount_cap, mounts_under
from tests.reliability.conftest import Rig

pytestmark = pytest.mark.root


def publish_all(c: CSIClient, rig: Rig) -> dict[str, tuple[str, csi_pb2.VolumeCapability,
                                                          str, str]]:
    vols = {}
    for name, cap in (("ext4", mount_cap("ext4")), ("xfs", mount_cap("xfs")),
                      ("raw", block_cap())):
        vid = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[cap])).volume.volume_id
        staging = rig.root / "staging" / name
        staging.mkdir(parents=True)
        target = rig.root / "pods" / name
        c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=cap))
        c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), target_path=str(target),
            volume_capability=cap))
        vols[name] = (vid, cap, str(staging), str(target))
    return vols


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_restart_with_volumes_published(rig: Rig, how: str) -> None:
    c = rig.driver.start()
    vols = publish_all(c, rig)
    stop = threading.Event()
    errors: list[BaseException] = []
    written = {"ext4": 0, "xfs": 0}

    def writer(name: str) -> None:
        target = vols[name][3]
        try:
            while not stop.is_set():
                with open(os.path.join(target, f"f{written[name] % 20}"), "wb") as f:
                    f.write(os.urandom(256 * 1024))
                    os.fsync(f.fileno())
                written[name] += 1
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in written]
    for t in threads:
        t.start()
    try:
        if how == "SIGKILL":
            rig.driver.kill()
        else:
            assert rig.driver.stop() == 0
        before = dict(written)
        c = rig.driver.start()
        threading.Event().wait(1.0)
        assert all(written[n] > before[n] for n in written), "writes stalled after restart"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    for name, (vid, _cap, _staging, target) in vols.items():
        assert os.path.ismount(target), f"{name} lost its mount"
        stats = c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=vid, volume_path=target))
        assert not stats.volume_condition.abnormal, (name, stats.volume_condition.message)
        assert stats.usage[0].total > 0
    # a vanished backing device: reported, not a crash
    raw_vid, _, _, raw_target = vols["raw"]
    rig.image(raw_vid).unlink()
    stats = c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=raw_vid, volume_path=raw_target))
    assert stats.volume_condition.abnormal
    for vid, _, staging, target in vols.values():
        c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=target))
        c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=staging))
        c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert mounts_under(str(rig.root)) == []
    assert loops_backed_by(str(rig.pool)) == []
    assert rig.metas() == []
    assert rig.leftovers() == []

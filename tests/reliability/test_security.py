"""Security: a private socket, secrets never logged, metrics without ids."""

from __future__ import annotations

import grp
import os
import socket
import stat
import urllib.request
from collections.abc import Callable

import grpc
import pytest

from csi._proto import csi_pb2
from tests.helpers import CSIClient, mount_cap
from tests.reliability.conftest import Rig

pytestmark = pytest.mark.root

SECRET = "Tr0ub4dor-and-3"


@pytest.mark.parametrize("group", ["disk", "65532"])
def test_socket_group(rig: Rig, group: str) -> None:
    """By name, or by number (the chart's pod group, which need not exist in the image)."""
    rig.driver.argv += ["--socket-group", group]
    rig.driver.start()
    st = os.stat(rig.driver.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == (int(group) if group.isdigit() else grp.getgrnam(group).gr_gid)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_never_reach_logs_and_metrics_carry_no_ids(rig: Rig, fmt: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rig.driver.argv += ["--log-format", fmt, "--log-level", "DEBUG",
                        "--metrics-address", f"127.0.0.1:{port}"]
    c: CSIClient = rig.driver.start()
    secrets = {"password": SECRET, SECRET: SECRET}
    cap = mount_cap()
    staging = rig.root / "staging"
    staging.mkdir()
    target = str(rig.root / "pods" / "t")
    ctl, node = c.controller, c.node
    vol = ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="secretive", volume_capabilities=[cap], secrets=secrets)).volume
    vid = vol.volume_id
    calls: list[Callable[[], object]] = [
        lambda: ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="secretive", volume_capabilities=[cap], secrets=secrets)),
        lambda: ctl.CreateVolume(csi_pb2.CreateVolumeRequest(  # an error path too
            name="", volume_capabilities=[cap], secrets=secrets)),
        lambda: ctl.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vid, volume_capabilities=[cap], secrets=secrets)),
        lambda: ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name="s", source_volume_id=vid, secrets=secrets)),
        lambda: ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(secrets=secrets)),
        lambda: ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, secrets=secrets,
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 << 30))),
        lambda: node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=cap,
            secrets=secrets)),
        lambda: node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), target_path=target,
            volume_capability=cap, secrets=secrets)),
        lambda: node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=target, secrets=secrets)),
        lambda: node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=target)),
        lambda: node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging))),
        lambda: ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
            snapshot_id=ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries[0]
            .snapshot.snapshot_id, secrets=secrets)),
        lambda: ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid, secrets=secrets)),
    ]
    for call in calls:
        try:
            call()
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert rig.driver.stop() == 0
    log = rig.driver.log.read_text()
    assert "NodeStageVolume" in log and "DeleteVolume" in log  # the calls were logged
    assert SECRET not in log, "a secret reached the log"
    text = metrics.decode()
    assert "flotilla_pool_size_bytes" in text
    assert "vol-" not in text and "snap-" not in text and vid not in text
    assert SECRET not in text

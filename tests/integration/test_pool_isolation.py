"""A real driver with a working filepool beside pools that cannot start: the good one
serves, the bad ones answer UNAVAILABLE naming themselves and their start error, and a
bad pool that becomes startable is served after a background retry."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi._proto import csi_pb2
from csi.pools.base import new_id
from tests.conftest import require_root
from tests.helpers import REPO, CSIClient, DriverProcess, GiB, loop_filesystem, mount_cap
from tests.integration.test_driver import free_port

pytestmark = pytest.mark.root


@pytest.fixture
def xfs(workdir: Path) -> Iterator[Path]:
    require_root()
    with loop_filesystem(workdir, "xfs", size=4 * GiB, name="host") as mnt:
        yield mnt


def rpc_error(fn: object, req: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn(req)  # type: ignore[operator]
    return err.value


def test_good_pool_serves_beside_pools_that_cannot_start(xfs: Path, workdir: Path) -> None:
    blocker = xfs / "not-a-directory"
    blocker.write_text("a file where the pool's parent directory should be\n")
    port = free_port()
    driver = DriverProcess(workdir, [
        {"name": "good", "type": "filepool", "path": str(xfs / "good")},
        {"name": "blocked", "type": "filepool", "path": str(blocker / "pool")},
        # this host has no device-mapper and no such volume group: lvmthin cannot start
        {"name": "thin", "type": "lvmthin", "volume_group": "flotilla-test-missing",
         "thin_pool": "tp", "lock_dir": str(workdir / "lock")},
    ], extra_args=("--metrics-address", f"127.0.0.1:{port}"))
    c: CSIClient = driver.start()
    try:
        assert c.identity.Probe(csi_pb2.ProbeRequest()).ready.value
        # volumes on the good pool work
        vol = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="v-good", volume_capabilities=[mount_cap()], parameters={"pool": "good"},
            capacity_range=csi_pb2.CapacityRange(required_bytes=64 << 20))).volume
        assert vol.volume_id.startswith("good:")
        snap = c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name="s-good", source_volume_id=vol.volume_id)).snapshot
        assert snap.ready_to_use
        # the bad pools' calls get a clear, retryable error naming pool and cause
        for pool, cause in (("blocked", "Not a directory"), ("thin", "flotilla-test-missing")):
            err = rpc_error(c.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
                name=f"v-{pool}", volume_capabilities=[mount_cap()],
                parameters={"pool": pool}))
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert f"pool {pool!r} is not serving" in err.details()
            assert cause in err.details()
            err = rpc_error(c.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(
                volume_id=new_id(pool, "vol")))
            assert err.code() == grpc.StatusCode.UNAVAILABLE and cause in err.details()
            # the kubelet's volume stats: an abnormal condition naming the cause
            stats = c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=new_id(pool, "vol"), volume_path=str(workdir)))
            assert stats.volume_condition.abnormal and cause in stats.volume_condition.message
            cap = c.controller.GetCapacity(csi_pb2.GetCapacityRequest(
                parameters={"pool": pool}))
            assert cap.available_capacity == 0
        assert c.controller.GetCapacity(csi_pb2.GetCapacityRequest(
            parameters={"pool": "good"})).available_capacity > 0
        listed = c.controller.ListVolumes(csi_pb2.ListVolumesRequest())
        assert [e.volume.volume_id for e in listed.entries] == [vol.volume_id]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                      timeout=10).read().decode()
        assert 'flotilla_pool_up{pool="good",type="filepool"} 1.0' in text
        assert 'flotilla_pool_started{pool="blocked",type="filepool"} 0.0' in text
        assert 'flotilla_pool_up{pool="thin",type="lvmthin"} 0.0' in text
        out = subprocess.run([sys.executable, "-m", "csi.cli", "--endpoint",
                              f"unix://{driver.socket}", "pools"], cwd=REPO, check=False,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out
        rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
        assert "serving" in rows["good"]
        assert "failed" in rows["blocked"] and "Not a directory" in rows["blocked"]
        assert "failed" in rows["thin"] and "flotilla-test-missing" in rows["thin"]

        # the blocked pool becomes startable: a background retry (5 s) serves it
        blocker.unlink()
        blocker.mkdir()
        deadline = time.monotonic() + 30
        while True:
            try:
                late = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                    name="v-late", volume_capabilities=[mount_cap()],
                    parameters={"pool": "blocked"},
                    capacity_range=csi_pb2.CapacityRange(required_bytes=64 << 20))).volume
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() < deadline, "the pool was not retried"
                time.sleep(0.5)
        assert late.volume_id.startswith("blocked:")
        c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=late.volume_id))
        c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
            snapshot_id=snap.snapshot_id))
        c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    finally:
        assert driver.stop() == 0
    log = driver.log.read_text()
    assert "pool blocked (filepool) cannot start (attempt 1)" in log
    assert "pool thin (lvmthin) cannot start (attempt 1)" in log
    assert "pool blocked (filepool) started after" in log
    assert not os.path.exists(workdir / "lock" / "flotilla-lvmthin-flotilla-test-missing-tp"
                              ".lock"), "lvmthin took no lock without its volume group"

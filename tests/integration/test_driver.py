"""The ``flotilla`` process end to end over gRPC: bad input, concurrency, metrics,
readiness, start-up errors, the embedded default and the demo."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from csi._proto import csi_pb2
from csi.pools.base import new_id
from tests.conftest import require_root
from tests.helpers import (
    REPO,
    CSIClient,
    DriverProcess,
    GiB,
    MiB,
    block_cap,
    loop_filesystem,
    loops_backed_by,
    mount_cap,
    mounts_under,
)

pytestmark = pytest.mark.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def xfs(workdir: Path) -> Iterator[Path]:
    require_root()
    with loop_filesystem(workdir, "xfs", size=8 * GiB, name="host") as mnt:
        yield mnt


@pytest.fixture
def started(xfs: Path, workdir: Path) -> Iterator[tuple[CSIClient, DriverProcess, int]]:
    port = free_port()
    driver = DriverProcess(workdir, [
        {"name": "p", "type": "filepool", "path": str(xfs / "pool"),
         "overprovision_ratio": 2.0},
        {"name": "second", "type": "filepool", "path": str(xfs / "second")},
    ], extra_args=("--metrics-address", f"127.0.0.1:{port}", "--log-format", "json"))
    client = driver.start()
    try:
        yield client, driver, port
    finally:
        assert driver.stop() == 0


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if ".flotilla.lock"
                  not in p.name)


def code_of(fn: Callable[..., object], req: object) -> grpc.StatusCode:
    try:
        fn(req)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


#: tgkill(2), which sends a signal to one thread of another process
TGKILL = {"x86_64": 234, "aarch64": 131}


def test_sigterm_taken_by_any_thread_stops_the_driver(
        started: tuple[CSIClient, DriverProcess, int]) -> None:
    """The kernel hands a process-directed SIGTERM to any thread that does not block it
    (a kubelet's or a test's `kill`); Python runs the handler in the main thread, which
    must wake up for it. Sent to one of gRPC's threads on purpose, it must still drain
    and exit 0 (a main thread blocked on a lock with no timeout never woke: a flaky
    teardown in CI)."""
    machine = os.uname().machine
    if machine not in TGKILL:
        pytest.skip(f"the tgkill syscall number is not known here for {machine}")
    _, driver, _ = started
    assert driver.proc is not None
    pid = driver.proc.pid
    others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert others, "the driver runs gRPC's threads beside its main thread"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(TGKILL[machine], pid, others[-1], signal.SIGTERM) == 0, \
        os.strerror(ctypes.get_errno())
    assert driver.proc.wait(timeout=15) == 0
    assert "received SIGTERM: draining" in driver.log.read_text()


def test_bad_input_is_refused_and_changes_nothing(started: tuple[CSIClient, DriverProcess, int],
                                                  xfs: Path) -> None:
    c, _, _ = started
    ctl, node = c.controller, c.node
    good = ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="good", volume_capabilities=[mount_cap()])).volume
    assert good.capacity_bytes == GiB  # 0 = unspecified -> the pool's default size
    before = tree(xfs)
    cr = csi_pb2.CapacityRange
    IA, OOR = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE
    cases: list[tuple[Callable[..., object], object, grpc.StatusCode]] = [
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(volume_capabilities=[mount_cap()]), IA),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="x" * 129, volume_capabilities=[mount_cap()]), IA),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(name="nul\0name",
                                                       volume_capabilities=[mount_cap()]), IA),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(name="nocaps"), IA),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="param", volume_capabilities=[mount_cap()], parameters={"colour": "red"}),
         IA),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="pool", volume_capabilities=[mount_cap()], parameters={"pool": "nope"}), IA),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="fs", volume_capabilities=[mount_cap()], parameters={"fsType": "ntfs"}), IA),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="multi", volume_capabilities=[mount_cap(mode=5)]), IA),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="neg", volume_capabilities=[mount_cap()],
            capacity_range=cr(required_bytes=-1)), OOR),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="limit", volume_capabilities=[mount_cap()],
            capacity_range=cr(required_bytes=2 * GiB, limit_bytes=GiB)), OOR),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="huge", volume_capabilities=[mount_cap()],
            capacity_range=cr(required_bytes=2**63 - 1)), OOR),
        (ctl.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="tinyxfs", volume_capabilities=[mount_cap("xfs")],
            capacity_range=cr(limit_bytes=10 * MiB)), OOR),
        (ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id="../../etc"), IA),
        (ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id="a/b"), IA),
        (ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=""), IA),
        (ctl.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name="s", source_volume_id="a\0"),
         IA),
        (ctl.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
            name="s", source_volume_id=good.volume_id, parameters={"x": "y"}), IA),
        (ctl.ListVolumes, csi_pb2.ListVolumesRequest(starting_token="bogus"),
         grpc.StatusCode.ABORTED),
        (ctl.ListVolumes, csi_pb2.ListVolumesRequest(max_entries=-1), IA),
        (ctl.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
            volume_id=good.volume_id), IA),
        (ctl.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
            volume_id=good.volume_id, capacity_range=cr(required_bytes=2**62)), OOR),
        (node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=good.volume_id, staging_target_path="/etc/x",
            volume_capability=mount_cap()), IA),
        (node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
            volume_id=good.volume_id, staging_target_path="relative",
            target_path="/x", volume_capability=mount_cap()), IA),
    ]
    for fn, req, want in cases:
        assert code_of(fn, req) == want, req
    assert tree(xfs) == before, "a rejected call changed the pool"
    # unknown (well-formed) ids: deletion is OK, lookups are NOT_FOUND
    ghost = new_id("p", "vol")
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=ghost))
    ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=new_id("p", "snap")))
    assert code_of(ctl.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(
        volume_id=ghost)) == grpc.StatusCode.NOT_FOUND
    assert code_of(ctl.GetSnapshot, csi_pb2.GetSnapshotRequest(
        snapshot_id=new_id("p", "snap"))) == grpc.StatusCode.NOT_FOUND
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=good.volume_id))


def test_one_of_many_concurrent_creates_wins(started: tuple[CSIClient, DriverProcess, int]
                                             ) -> None:
    c, _, _ = started
    req = csi_pb2.CreateVolumeRequest(name="race", volume_capabilities=[mount_cap()],
                                      capacity_range=csi_pb2.CapacityRange(
                                          required_bytes=64 * MiB))

    def call(_: int) -> str:
        try:
            return str(c.controller.CreateVolume(req).volume.volume_id)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.ABORTED, err.details()
            return "ABORTED"

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(32)))
    ids = {r for r in results if r != "ABORTED"}
    assert len(ids) == 1, results
    listed = c.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    assert [e.volume.volume_id for e in listed] == list(ids)
    c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=ids.pop()))


def test_pools_capacity_and_names(started: tuple[CSIClient, DriverProcess, int]) -> None:
    c, _, _ = started
    ctl = c.controller
    first = ctl.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
    assert first > 0
    other = csi_pb2.Topology(segments={"topology.flotilla.csi.io/node": "elsewhere"})
    assert ctl.GetCapacity(csi_pb2.GetCapacityRequest(
        accessible_topology=other)).available_capacity == 0
    # the ratio is 2.0 on an 8 GiB filesystem: 40 GiB cannot be provisioned
    try:
        ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="too-big", volume_capabilities=[block_cap()],
            capacity_range=csi_pb2.CapacityRange(required_bytes=40 * GiB)))
        raise AssertionError("overprovisioning was not refused")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overprovision_ratio" in (err.details() or "")
    vol = ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="v", volume_capabilities=[block_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))).volume
    assert ctl.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity <= first - GiB
    assert vol.accessible_topology[0].segments["topology.flotilla.csi.io/node"] == "node-1"
    # the same name in another pool is a different volume: ALREADY_EXISTS
    try:
        ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="v", volume_capabilities=[block_cap()], parameters={"pool": "second"}))
        raise AssertionError("same name in another pool was accepted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    in_second = ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="w", volume_capabilities=[block_cap()], parameters={"pool": "second"})).volume
    assert in_second.volume_id.startswith("second:")
    assert in_second.volume_context["pool"] == "second"
    for v in (vol, in_second):
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))


def test_metrics_and_logs(started: tuple[CSIClient, DriverProcess, int]) -> None:
    c, driver, port = started
    vol = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="metered", volume_capabilities=[mount_cap()])).volume
    c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(driver.workdir / "stage"),
        volume_capability=mount_cap(), secrets={"password": "hunter2-secret"}))
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(driver.workdir / "stage")))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert ('csi_plugin_operations_seconds_bucket{driver_name="flotilla.csi.io",'
            'grpc_status_code="OK",le="0.001",method_name="CreateVolume"}') in text
    assert 'flotilla_pool_volumes{pool="p",type="filepool"} 1.0' in text
    for name in ("size", "used", "provisioned"):
        assert f'flotilla_pool_{name}_bytes{{pool="p",type="filepool"}}' in text
    assert 'flotilla_pool_snapshots{pool="p",type="filepool"} 0.0' in text
    c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    log = driver.log.read_text()
    assert "hunter2" not in log, "a secret reached the log"
    assert '"method": "NodeStageVolume"' in log and '"code": "OK"' in log


def test_socket_is_private_and_probe_ignores_an_unusable_pool(
        started: tuple[CSIClient, DriverProcess, int], xfs: Path) -> None:
    c, driver, port = started
    assert stat.S_IMODE(os.stat(driver.socket).st_mode) == 0o600
    assert c.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    info = c.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "flotilla.csi.io" and info.vendor_version
    caps = c.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    kinds = {cap.service.type for cap in caps.capabilities if cap.HasField("service")}
    assert kinds == {csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE,
                     csi_pb2.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    (xfs / "second" / "tmp").rmdir()
    # Probe reports the process, not the storage (it answered ready=false here before,
    # and the livenessprobe restarted the plugin): the unusable pool shows in its metric
    assert c.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    url = f"http://127.0.0.1:{port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'flotilla_pool_up{pool="second",type="filepool"} 0.0' in text
    assert 'flotilla_pool_up{pool="p",type="filepool"} 1.0' in text
    (xfs / "second" / "tmp").mkdir()
    assert c.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'flotilla_pool_up{pool="second",type="filepool"} 1.0' in text


def test_a_pool_without_reflink_is_reported_and_the_process_serves(workdir: Path) -> None:
    """The only pool cannot start: the process serves anyway (it exited 2 before), Probe
    is ready, and the pool's calls answer UNAVAILABLE with the start error's advice."""
    require_root()
    with loop_filesystem(workdir, "ext4", size=GiB, name="ext4") as mnt:
        driver = DriverProcess(workdir, [{"name": "p", "type": "filepool",
                                          "path": str(mnt / "pool")}])
        c = driver.start()
        try:
            assert c.identity.Probe(csi_pb2.ProbeRequest()).ready.value
            with pytest.raises(grpc.RpcError) as err:
                c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                    name="v", volume_capabilities=[mount_cap()]))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loop_image_size" in err.value.details()
            assert "reflink" in err.value.details()
        finally:
            assert driver.stop() == 0
        assert "cannot start (attempt 1)" in driver.log.read_text()


def test_embedded_default_pool_creates_its_own_xfs_image(workdir: Path) -> None:
    """No --pool-config: a filepool under <state-dir>/pools/default, on its own XFS image
    when the host filesystem (ext4 here) has no reflink."""
    require_root()
    with loop_filesystem(workdir, "ext4", size=32 * GiB, name="host") as mnt:
        state = mnt / "state"
        sock = workdir / "default.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi.server", "--endpoint", f"unix://{sock}",
             "--state-dir", str(state)], cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            channel = grpc.insecure_channel(f"unix://{sock}")
            grpc.channel_ready_future(channel).result(timeout=60)
            client = CSIClient(channel)
            assert client.identity.Probe(csi_pb2.ProbeRequest()).ready.value
            vol = client.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                name="d", volume_capabilities=[mount_cap()])).volume
            assert vol.volume_id.startswith("default:")
            assert (state / "pools" / "default.xfs").exists()
            assert str(state / "pools" / "default") in mounts_under(str(state))
            client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
                volume_id=vol.volume_id))
            channel.close()
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) == 0
            assert proc.stderr is not None
            proc.stderr.close()
        subprocess.run(["umount", str(state / "pools" / "default")], check=True)
        for loop in loops_backed_by(str(state)):
            subprocess.run(["losetup", "-d", f"/dev/{loop}"], check=True)


def test_demo_walks_a_volume_through_its_life(workdir: Path) -> None:
    require_root()
    with loop_filesystem(workdir, "ext4", size=32 * GiB, name="host") as mnt:
        out = subprocess.run(
            [sys.executable, "-m", "csi.cli", "demo", "--state-dir", str(mnt / "state"),
             "--remove-pool"], cwd=REPO, capture_output=True, text=True, timeout=300,
            check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        for step in ("create volume", "write 64 MiB", "snapshot", "restore", "expand",
                     "restored checksum matches", "driver exit code 0"):
            assert step in out.stdout, out.stdout
        assert mounts_under(str(mnt / "state")) == []
        assert loops_backed_by(str(mnt / "state")) == []

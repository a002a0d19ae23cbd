"""``flotillactl``: talk to a running driver, or run the standalone demo."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from csi._proto import csi_pb2, csi_pb2_grpc
from csi.config import DEFAULT_STATE_DIR

T = TypeVar("T")
GiB = 1 << 30
MiB = 1 << 20
DEFAULT_ENDPOINT = "unix:///run/flotilla/csi.sock"


class Client:
    def __init__(self, endpoint: str, timeout: float = 120.0) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


# ---- inspection commands ------------------------------------------------------------

def cmd_probe(client: Client, args: argparse.Namespace) -> int:
    info = client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    ready = client.identity.Probe(csi_pb2.ProbeRequest())
    print(f"{info.name} {info.vendor_version}: {'ready' if ready.ready.value else 'NOT ready'}")
    return 0 if ready.ready.value else 1


def cmd_volumes(client: Client, args: argparse.Namespace) -> int:
    token = ""
    print(f"{'VOLUME ID':<48} {'SIZE':>10}  {'POOL':<12} CONDITION")
    while True:
        resp = client.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=100, starting_token=token))
        for e in resp.entries:
            cond = e.status.volume_condition
            print(f"{e.volume.volume_id:<48} {_human(e.volume.capacity_bytes):>10}  "
                  f"{e.volume.volume_context.get('pool', ''):<12} "
                  f"{'ABNORMAL: ' + cond.message if cond.abnormal else 'ok'}")
        token = resp.next_token
        if not token:
            return 0


def cmd_snapshots(client: Client, args: argparse.Namespace) -> int:
    token = ""
    print(f"{'SNAPSHOT ID':<48} {'SIZE':>10}  SOURCE VOLUME")
    while True:
        resp = client.controller.ListSnapshots(
            csi_pb2.ListSnapshotsRequest(max_entries=100, starting_token=token))
        for e in resp.entries:
            s = e.snapshot
            print(f"{s.snapshot_id:<48} {_human(s.size_bytes):>10}  {s.source_volume_id}")
        token = resp.next_token
        if not token:
            return 0


def cmd_pools(client: Client, args: argparse.Namespace) -> int:
    """Each configured pool: serving (with its available capacity) or failed (with the
    error its start gave). Exit 1 when any pool is failed."""
    from csi.identity import MANIFEST_POOL_PREFIX

    info = client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    failed = 0
    print(f"{'POOL':<20} {'TYPE':<10} {'STATE':<8} {'AVAILABLE':>10}  MESSAGE")
    for key, value in sorted(info.manifest.items()):
        if not key.startswith(MANIFEST_POOL_PREFIX):
            continue
        name = key[len(MANIFEST_POOL_PREFIX):]
        kind, _, rest = value.partition(" ")
        state, _, message = rest.partition(": ")
        available = "-"
        if state == "serving":
            try:
                cap = client.controller.GetCapacity(
                    csi_pb2.GetCapacityRequest(parameters={"pool": name}))
                available = _human(cap.available_capacity)
            except grpc.RpcError as err:  # a node plugin serves no Controller service
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    message = f"{err.code().name}: {err.details()}"
        else:
            failed += 1
        print(f"{name:<20} {kind:<10} {state:<8} {available:>10}  {message}")
    return 1 if failed else 0


def cmd_capacity(client: Client, args: argparse.Namespace) -> int:
    params = {"pool": args.pool} if args.pool else {}
    resp = client.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters=params))
    print(f"available: {_human(resp.available_capacity)} ({resp.available_capacity} bytes)")
    return 0


# ---- demo ---------------------------------------------------------------------------

class Demo:
    """Start ``flotilla --mode all`` on its embedded default pool and walk a volume
    through create, write, snapshot, restore, expand and delete."""

    def __init__(self, state_dir: str, remove_pool: bool) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.remove_pool = remove_pool
        self.socket = os.path.join(self.state_dir, "demo", "csi.sock")
        self.work = os.path.join(self.state_dir, "demo")
        self.proc: subprocess.Popen[bytes] | None = None
        self.steps: list[tuple[str, float]] = []
        self.cleanups: list[Callable[[], None]] = []

    def step(self, title: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        result = fn()
        elapsed = time.monotonic() - start
        self.steps.append((title, elapsed))
        print(f"  {elapsed * 1000:9.1f} ms  {title}", flush=True)
        return result

    def start_driver(self) -> Client:
        os.makedirs(self.work, exist_ok=True)
        log = open(os.path.join(self.work, "driver.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csi.server", "--mode", "all", "--node-id", "demo-node",
             "--endpoint", f"unix://{self.socket}", "--state-dir", self.state_dir],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 120
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise SystemExit(f"flotilla exited {self.proc.returncode}; see "
                                 f"{self.work}/driver.log")
            if time.monotonic() > deadline:
                raise SystemExit("flotilla did not start within 120 s")
            time.sleep(0.05)
        return Client(f"unix://{self.socket}")

    def stop_driver(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self.proc = None
        return code

    def run(self) -> int:
        print(f"Flotilla demo: standalone driver, embedded default pool under "
              f"{self.state_dir}/pools/default")
        client = self.step("start flotilla --mode all (embedded default pool)",
                           self.start_driver)
        try:
            self._walk(client)
        finally:
            for undo in reversed(self.cleanups):
                with contextlib.suppress(Exception):
                    undo()
            client.close()
            code = self.step("stop flotilla (SIGTERM, drain in-flight calls)",
                             self.stop_driver)
            if self.remove_pool:
                self._remove_pool()
        total = sum(t for _, t in self.steps)
        print(f"done: {len(self.steps)} steps in {total:.2f} s; driver exit code {code}")
        return 0 if code == 0 else 1

    def _walk(self, c: Client) -> None:
        ctl, node = c.controller, c.node
        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="xfs"),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
        probe = self.step("probe", lambda: c.identity.Probe(csi_pb2.ProbeRequest()))
        assert probe.ready.value, "driver is not ready"

        vol = self.step("create volume demo-vol (1 GiB, xfs)", lambda: ctl.CreateVolume(
            csi_pb2.CreateVolumeRequest(name="demo-vol", volume_capabilities=[cap],
                                        capacity_range=csi_pb2.CapacityRange(
                                            required_bytes=GiB))).volume)
        self.cleanups.append(lambda: ctl.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)))
        target = self._mount(c, vol.volume_id, cap, "demo-vol")
        data = os.path.join(target, "data.bin")

        def write() -> str:
            with open(data, "wb") as f:
                for i in range(64):
                    f.write(hashlib.sha256(str(i).encode()).digest() * (MiB // 32))
                f.flush()
                os.fsync(f.fileno())
            return _sha256(data)

        digest = self.step("write 64 MiB into the volume", write)
        snap = self.step("snapshot demo-snap (filesystem frozen around a reflink)",
                         lambda: ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                             name="demo-snap", source_volume_id=vol.volume_id)).snapshot)
        self.cleanups.append(lambda: ctl.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)))

        def overwrite() -> None:
            with open(data, "r+b") as f:
                f.write(b"\0" * (8 * MiB))
                os.fsync(f.fileno())

        self.step("overwrite the first 8 MiB of the original", overwrite)
        restored = self.step("restore demo-snap into demo-restored (2 GiB, larger)",
                             lambda: ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
                                 name="demo-restored", volume_capabilities=[cap],
                                 capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB),
                                 volume_content_source=csi_pb2.VolumeContentSource(
                                     snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                                         snapshot_id=snap.snapshot_id)))).volume)
        self.cleanups.append(lambda: ctl.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=restored.volume_id)))
        rtarget = self._mount(c, restored.volume_id, cap, "demo-restored")
        same = self.step("verify the restored data matches the snapshot",
                         lambda: _sha256(os.path.join(rtarget, "data.bin")) == digest)
        print(f"             restored checksum {'matches' if same else 'DIFFERS'}; "
              f"filesystem size {_human(_fs_size(rtarget))}")
        assert same, "restored data differs from the snapshot"

        def expand() -> int:
            ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vol.volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=3 * GiB)))
            node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
                volume_id=vol.volume_id, volume_path=target,
                capacity_range=csi_pb2.CapacityRange(required_bytes=3 * GiB)))
            return _fs_size(target)

        size = self.step("expand demo-vol online to 3 GiB (controller + node)", expand)
        print(f"             mounted filesystem is now {_human(size)}")
        self.step("unpublish, unstage and delete both volumes and the snapshot",
                  self._undo_all)

    def _undo_all(self) -> None:
        while self.cleanups:
            self.cleanups.pop()()

    def _mount(self, c: Client, volume_id: str, cap: csi_pb2.VolumeCapability,
               name: str) -> str:
        staging = os.path.join(self.work, "staging", name)
        target = os.path.join(self.work, "target", name)
        os.makedirs(staging, exist_ok=True)
        self.step(f"stage {name} (attach loop device, mkfs on first use, mount)",
                  lambda: c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                      volume_id=volume_id, staging_target_path=staging,
                      volume_capability=cap)))
        self.cleanups.append(lambda: c.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id,
                                             staging_target_path=staging)))
        self.step(f"publish {name} (bind mount)", lambda: c.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id, staging_target_path=staging, target_path=target,
                volume_capability=cap)))
        self.cleanups.append(lambda: c.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)))
        return target

    def _remove_pool(self) -> None:
        """Unmount and delete the embedded default pool (tests; leaves no trace)."""
        path = os.path.join(self.state_dir, "pools", "default")
        image = path + ".xfs"
        subprocess.run(["umount", path], check=False, capture_output=True)
        for line in subprocess.run(["losetup", "-j", image], capture_output=True,
                                   text=True, check=False).stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
        shutil.rmtree(os.path.join(self.state_dir, "pools"), ignore_errors=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def _fs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


@contextlib.contextmanager
def _client(endpoint: str) -> Iterator[Client]:
    client = Client(endpoint, timeout=10)
    try:
        yield client
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flotillactl", description="Flotilla admin CLI")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the standalone driver and walk a volume "
                          "through create, write, snapshot, restore, expand, delete")
    demo.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    demo.add_argument("--remove-pool", action="store_true",
                      help="unmount and delete the default pool afterwards")
    sub.add_parser("probe", help="plugin name, version and readiness")
    sub.add_parser("pools", help="each pool: serving (available capacity) or failed "
                   "(its start error); exit 1 when one is failed")
    sub.add_parser("volumes", help="list volumes")
    sub.add_parser("snapshots", help="list snapshots")
    capp = sub.add_parser("capacity", help="available capacity")
    capp.add_argument("--pool", default="")
    from csi.backup import cli as backup_cli

    backup_cli.add_parser(sub)
    args = p.parse_args(argv)
    if args.command == "demo":
        return Demo(args.state_dir, args.remove_pool).run()
    if args.command == "backup":
        return backup_cli.run(args)
    commands = {"probe": cmd_probe, "pools": cmd_pools, "volumes": cmd_volumes,
                "snapshots": cmd_snapshots, "capacity": cmd_capacity}
    try:
        with _client(args.endpoint) as client:
            return commands[args.command](client, args)
    except grpc.FutureTimeoutError:
        print(f"cannot reach a driver at {args.endpoint}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"{err.code().name}: {err.details()}", file=sys.stderr)
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            print(f"the driver at {args.endpoint} does not serve `{args.command}`: a "
                  "--mode node plugin has no Controller service (ask the controller's "
                  "socket, or read flotilla_pool_volumes in the node's metrics)",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

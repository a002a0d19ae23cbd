"""Shared test helpers: loop-backed filesystems, a flotilla process, a CSI client.

Everything created here is cleaned up by the caller's fixture: mounts unmounted, loop
devices detached, processes stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from csi._proto import csi_pb2, csi_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
GiB = 1 << 30
MiB = 1 << 20


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


@contextlib.contextmanager
def loop_filesystem(workdir: Path, fstype: str, size: int = 4 * GiB,
                    name: str = "fs", options: str = "") -> Iterator[Path]:
    """A sparse image formatted ``fstype``, loop-mounted at ``workdir/name``."""
    image = workdir / f"{name}.img"
    mnt = workdir / name
    mnt.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    mkfs = {
        "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
        "btrfs": ["mkfs.btrfs", "-q"],
        "ext4": ["mkfs.ext4", "-q", "-F"],
    }[fstype]
    run(*mkfs, str(image))
    dev = run("losetup", "--find", "--show", str(image)).stdout.strip()
    try:
        run("mount", *(["-o", options] if options else []), dev, str(mnt))
        try:
            yield mnt
        finally:
            run("umount", str(mnt), check=False)
    finally:
        run("losetup", "--detach", dev, check=False)
        image.unlink(missing_ok=True)


def loops_backed_by(prefix: str) -> list[str]:
    """Loop devices whose backing file is under ``prefix`` (leak checks)."""
    found = []
    for entry in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = entry.read_text().strip()
        except OSError:  # detached while we looked
            continue
        if backing.startswith(prefix):
            found.append(entry.parent.parent.name)
    return found


def mounts_under(prefix: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


@dataclass
class CSIClient:
    channel: grpc.Channel

    def __post_init__(self) -> None:
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)


def mount_cap(fs_type: str = "", mode: int = 1, flags: tuple[str, ...] = ()
              ) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


def block_cap(mode: int = 1) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


class DriverProcess:
    """``flotilla`` started as a real process on a Unix socket."""

    def __init__(self, workdir: Path, pools: list[dict[str, object]], mode: str = "all",
                 node_id: str = "node-1", extra_args: tuple[str, ...] = (),
                 allowed_roots: list[str] | None = None) -> None:
        self.env: dict[str, str] = {}  # extra environment for the next start()
        self.workdir = workdir
        self.socket = workdir / "csi.sock"
        self.config = workdir / "pools.yaml"
        self.log = workdir / "driver.log"
        self.state = workdir / "state"
        roots = allowed_roots if allowed_roots is not None else [str(workdir)]
        self.config.write_text(yaml.safe_dump({"pools": pools, "allowed_roots": roots}))
        self.argv = [sys.executable, "-m", "csi.server", "--mode", mode,
                     "--endpoint", f"unix://{self.socket}", "--node-id", node_id,
                     "--pool-config", str(self.config), "--state-dir", str(self.state),
                     *extra_args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self, timeout: float = 30.0) -> CSIClient:
        logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self._logf = logf
        self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT,
                                     cwd=REPO, env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"flotilla exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"flotilla did not create {self.socket}")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        return CSIClient(self.channel)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (crash tests)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._close()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # its threads' stacks go to the log
            time.sleep(1)
            self.proc.kill()
            self.proc.wait()
            code = -9
            sys.stderr.write(f"flotilla ignored SIGTERM for {timeout:.0f}s; log tail:\n"
                             f"{self.log.read_text()[-6000:]}\n")
        self._close()
        return code

    def _close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self._logf.close()
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)

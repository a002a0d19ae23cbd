"""Pool harnesses for the contract suite: one per pool type (and backing filesystem).

A harness builds a started :class:`~csi.pools.base.Pool` on real storage, can build a
second instance on the same storage (restart), reads and writes a volume's data, and
lists what a half-finished operation might leave behind. ``test_pool_contract.py`` runs
the same tests against every harness this host can run; pool types that need a kernel
feature the host lacks run in the VM tier, which sets ``FLOTILLA_POOL_TYPES``.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from csi.pools import build_pool
from csi.pools.base import Pool
from csi.system import LVM_CONFIG, System
from tests.helpers import GiB, MiB, loop_filesystem, run


class PoolHarness(abc.ABC):
    name: str = ""
    #: volume sizes in tests are multiples of this
    unit: int = 4 * MiB

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.system = System()
        self.pools: list[Pool] = []

    @abc.abstractmethod
    def spec(self, **options: object) -> dict[str, object]:
        """The pool's config entry."""

    @abc.abstractmethod
    def setup(self) -> contextlib.AbstractContextManager[None]:
        """Prepare the backing storage for the test's duration."""

    def make(self, **options: object) -> Pool:
        pool = build_pool(self.spec(**options), self.system)
        pool.start()
        self.pools.append(pool)
        return pool

    def restart(self, pool: Pool, **options: object) -> Pool:
        pool.stop()
        return self.make(**options)

    def write(self, pool: Pool, volume_id: str, offset: int, data: bytes) -> None:
        device = pool.attach(volume_id)
        fd = os.open(device, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, pool: Pool, volume_id: str, offset: int, length: int) -> bytes:
        device = pool.attach(volume_id)
        fd = os.open(device, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def detach_all(self, pool: Pool) -> None:
        for vol in pool.list_volumes():
            pool.detach(vol.id)

    def teardown(self) -> None:
        for pool in self.pools:
            with contextlib.suppress(Exception):
                self.detach_all(pool)
            pool.stop()

    def child_env(self) -> dict[str, str]:
        """Environment a child process needs to build the same pool (kill tests)."""
        return {}

    @abc.abstractmethod
    def leftovers(self) -> list[str]:
        """Temporary or orphaned artefacts of half-finished operations."""


class FilePoolHarness(PoolHarness):
    def __init__(self, workdir: Path, fstype: str) -> None:
        super().__init__(workdir)
        self.fstype = fstype
        self.name = f"filepool-{fstype}"
        self.mnt: Path | None = None

    @contextlib.contextmanager
    def _setup(self) -> Iterator[None]:
        with loop_filesystem(self.workdir, self.fstype, name=f"host-{self.fstype}") as mnt:
            self.mnt = mnt
            try:
                yield
            finally:
                self.teardown()

    def setup(self) -> contextlib.AbstractContextManager[None]:
        return self._setup()

    def spec(self, **options: object) -> dict[str, object]:
        assert self.mnt is not None
        return {"name": "contract", "type": "filepool", "path": str(self.mnt / "pool"),
                **options}

    def leftovers(self) -> list[str]:
        assert self.mnt is not None
        pool = self.mnt / "pool"
        found = [str(p) for p in (pool / "tmp").iterdir()]
        for kind in ("volumes", "snapshots"):
            names = {p.name for p in (pool / kind).iterdir()}
            found += [f"{kind}/{n}" for n in names
                      if (n.endswith(".img") and n[:-4] + ".json" not in names)
                      or ".tmp-" in n]
        return found


def device_mapper_available() -> bool:
    """Can this kernel run LVM thin pools here (device-mapper control node opens)?"""
    if shutil.which("lvm") is None:
        return False
    try:
        fd = os.open("/dev/mapper/control", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def lvm(*args: str, check: bool = True) -> str:
    """Run an lvm command with the driver's udev-free settings (test set-up only)."""
    return run("lvm", args[0], f"--config={LVM_CONFIG}", *args[1:], check=check).stdout


def wait_for_lvm_commands(vg: str, timeout: float = 120.0) -> None:
    """Wait until no lvm process works on ``vg``. A SIGKILLed pool process leaves its
    running lvm child alive (commands run in their own session); its change lands when
    that child finishes, so a restarted pool must not read the VG before."""
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0]) == b"lvm" and any(
                    vg.encode() in a for a in argv[1:]):
                busy.append(entry.name)
        if not busy:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"lvm commands on {vg} still running: pids {busy}")
        time.sleep(0.05)


class LvmThinHarness(PoolHarness):
    """A fresh VG with a thin pool per test, on ``FLOTILLA_LVM_DEVICE`` (a scratch disk,
    wiped: the VM tier passes one) or on a loop device over a sparse file in the workdir."""

    name = "lvmthin"
    unit = 4 * MiB  # the VG's extent size
    thin_pool = "tp"

    def __init__(self, workdir: Path, pool_size: int = 2 * GiB) -> None:
        super().__init__(workdir)
        self.vg = f"fltest{uuid.uuid4().hex[:8]}"
        self.pool_size = pool_size

    @contextlib.contextmanager
    def _setup(self) -> Iterator[None]:
        with lvm_thin_pool(self.workdir, self.vg, self.thin_pool, self.pool_size):
            try:
                yield
            finally:
                self.teardown()
                wait_for_lvm_commands(self.vg)

    def setup(self) -> contextlib.AbstractContextManager[None]:
        return self._setup()

    def spec(self, **options: object) -> dict[str, object]:
        return {"name": "contract", "type": "lvmthin", "volume_group": self.vg,
                "thin_pool": self.thin_pool, **options}

    def make(self, **options: object) -> Pool:
        wait_for_lvm_commands(self.vg)
        return super().make(**options)

    def leftovers(self) -> list[str]:
        """LVs of the pool whose tags are incomplete or whose size is short of its tag."""
        wait_for_lvm_commands(self.vg)
        rows = System().lvm_report("lvs", ["lv_name", "lv_size", "lv_tags"], [self.vg])
        found = []
        for row in rows:
            if not row["lv_name"].startswith("fl-contract-"):
                continue
            tags = dict(t.partition("=")[::2] for t in row["lv_tags"].split(",") if t)
            needed = {"fl.v", "fl.name", "fl.size", "fl.created"}
            if not needed <= set(tags) or int(row["lv_size"]) < int(tags["fl.size"]):
                found.append(f"{row['lv_name']} {row['lv_size']} {row['lv_tags']}")
        return found


@contextlib.contextmanager
def lvm_thin_pool(workdir: Path, vg: str, thin_pool: str, size: int) -> Iterator[str]:
    """A VG ``vg`` with thin pool ``thin_pool`` of ``size`` data bytes, removed after.
    Yields the physical volume's device."""
    device = os.environ.get("FLOTILLA_LVM_DEVICE")
    image = workdir / f"{vg}.img"
    loop = None
    if not device:
        with open(image, "wb") as f:
            f.truncate(size + 1 * GiB)
        loop = run("losetup", "--find", "--show", str(image)).stdout.strip()
        device = loop
    try:
        run("wipefs", "--all", "--quiet", device)
        lvm("pvcreate", "--yes", "--force", "--force", device)
        lvm("vgcreate", vg, device)
        lvm("lvcreate", "--type", "thin-pool", "--size", f"{size}b", "--name", thin_pool, vg)
        yield device
    finally:
        wait_for_lvm_commands(vg)
        lvm("vgremove", "--force", "--force", vg, check=False)
        lvm("pvremove", "--force", "--force", "--yes", device, check=False)
        if loop is not None:
            run("losetup", "--detach", loop, check=False)
        image.unlink(missing_ok=True)


HARNESSES = {
    "filepool-xfs": lambda w: FilePoolHarness(w, "xfs"),
    "filepool-btrfs": lambda w: FilePoolHarness(w, "btrfs"),
    "lvmthin": LvmThinHarness,
}


def enabled_harnesses() -> list[str]:
    """Harnesses to run: ``FLOTILLA_POOL_TYPES`` (comma list) or those the host can run
    (lvmthin where the kernel has device-mapper; elsewhere the VM tier runs it)."""
    wanted = os.environ.get("FLOTILLA_POOL_TYPES")
    if wanted:
        return [w.strip() for w in wanted.split(",") if w.strip()]
    return ["filepool-xfs", "filepool-btrfs", "nfs-local",
            *(["lvmthin"] if device_mapper_available() else []),
            *(["nfs"] if os.environ.get("FLOTILLA_NFS_SERVER") else [])]


def _nfs(local: bool) -> Callable[[Path], PoolHarness]:
    def make(workdir: Path) -> PoolHarness:
        from tests.integration.nfs_harness import NfsHarness  # it builds on this module

        return NfsHarness(workdir, local=local)

    return make


HARNESSES["nfs-local"] = _nfs(local=True)
HARNESSES["nfs"] = _nfs(local=False)

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
from collections.abc import Iterator
from pathlib import Path

from csi.pools import build_pool
from csi.pools.base import Pool
from csi.system import System
from tests.helpers import MiB, loop_filesystem


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
                      if n.endswith(".img") and n[:-4] + ".json" not in names]
        return found


HARNESSES = {
    "filepool-xfs": lambda w: FilePoolHarness(w, "xfs"),
    "filepool-btrfs": lambda w: FilePoolHarness(w, "btrfs"),
}


def enabled_harnesses() -> list[str]:
    """Harnesses to run: ``FLOTILLA_POOL_TYPES`` (comma list) or those the host can run."""
    wanted = os.environ.get("FLOTILLA_POOL_TYPES")
    if wanted:
        return [w.strip() for w in wanted.split(",") if w.strip()]
    return ["filepool-xfs", "filepool-btrfs"]

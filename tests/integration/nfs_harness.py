"""Harnesses for the ``nfs`` pool.

* ``nfs``: a real NFS server named by ``FLOTILLA_NFS_SERVER`` / ``FLOTILLA_NFS_SHARE`` /
  ``FLOTILLA_NFS_EXPORT_DIR`` (the server's local directory of the share) — the VM tier
  runs kernel nfsd exporting a reflink XFS and sets them.
* ``nfs-local``: the same pool logic on a host without NFS: the injected System turns the
  pool's ``server:/share`` mount into a bind mount of a local reflink XFS. It proves the
  tree copying, metadata and crash safety; the network itself is proven by ``nfs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from csi.pools.base import Pool
from csi.system import TIMEOUT_MOUNT, MountInfo, System
from tests.helpers import loop_filesystem
from tests.integration.pool_harness import PoolHarness

SHARE = "/srv/flotilla-export"


class BindAsNfsSystem(System):
    """Mounts ``<server>:<share>[/sub]`` by binding ``<root>[/sub]`` and reports such
    binds as that NFS source (host tests only)."""

    def __init__(self, root: Path, server: str) -> None:
        super().__init__()
        self.root = root
        self.server = server
        root_mount = System().mount_at(str(root))
        assert root_mount is not None, root
        self.root_device = root_mount.source

    def mount_at(self, path: str) -> MountInfo | None:
        m = super().mount_at(path)
        if m is not None and m.source == self.root_device and m.mount_point != str(self.root):
            sub = "" if m.root == "/" else m.root
            return dataclasses.replace(m, source=f"{self.server}:{SHARE}{sub}", fstype="nfs4")
        return m

    def mount(self, source: str, target: str, fstype: str | None = None,
              options: Sequence[str] = (), timeout: float = TIMEOUT_MOUNT) -> None:
        if fstype != "nfs":
            super().mount(source, target, fstype, options, timeout)
            return
        path = source.split(":", 1)[1]
        assert path.startswith(SHARE), source
        self.bind_mount(str(self.root) + path[len(SHARE):], target, readonly="ro" in options)


class NfsHarness(PoolHarness):
    def __init__(self, workdir: Path, local: bool, mount_options: str = "") -> None:
        super().__init__(workdir)
        self.local = local
        self.mount_options = mount_options
        self.name = "nfs-local" if local else "nfs"
        self.export_dir: Path | None = None
        self.share = SHARE
        self.server = "nfs.invalid"

    @contextlib.contextmanager
    def _setup(self) -> Iterator[None]:
        if self.local:
            with loop_filesystem(self.workdir, "xfs", name="export",
                                 options=self.mount_options) as mnt:
                self.export_dir = mnt
                self.system = BindAsNfsSystem(mnt, self.server)
                try:
                    yield
                finally:
                    self.teardown()
            return
        self.server = os.environ["FLOTILLA_NFS_SERVER"]
        base_share = os.environ["FLOTILLA_NFS_SHARE"]
        base_dir = Path(os.environ["FLOTILLA_NFS_EXPORT_DIR"])
        sub = f"t{uuid.uuid4().hex[:8]}"  # a fresh directory of the export per test
        (base_dir / sub).mkdir()
        self.export_dir, self.share = base_dir / sub, posixpath.join(base_share, sub)
        try:
            yield
        finally:
            self.teardown()
            shutil.rmtree(base_dir / sub, ignore_errors=True)

    def setup(self) -> contextlib.AbstractContextManager[None]:
        return self._setup()

    def spec(self, **options: object) -> dict[str, object]:
        return {"name": "contract", "type": "nfs", "server": self.server, "share": self.share,
                "mount_dir": str(self.workdir / "nfs-mount"), **options}

    def _file(self, pool: Pool, volume_id: str) -> str:
        return os.path.join(pool.volume_dir(volume_id), "data")  # type: ignore[attr-defined]

    def write(self, pool: Pool, volume_id: str, offset: int, data: bytes) -> None:
        fd = os.open(self._file(pool, volume_id), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, pool: Pool, volume_id: str, offset: int, length: int) -> bytes:
        fd = os.open(self._file(pool, volume_id), os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def child_env(self) -> dict[str, str]:
        if self.local:
            return {"FLOTILLA_TEST_NFS_BIND": f"{self.export_dir}|{self.server}"}
        return {}

    def leftovers(self) -> list[str]:
        assert self.export_dir is not None
        # each process's scratch directory .tmp/<owner>/ (beside its lock file)
        found = [str(p) for d in (self.export_dir / ".tmp").iterdir() if d.is_dir()
                 for p in d.iterdir()]
        found += [str(p) for p in (self.export_dir / ".tmp").iterdir()
                  if not p.is_dir() and not p.name.endswith(".lock")]
        for kind in ("volumes", ".snapshots"):
            names = {p.name for p in (self.export_dir / kind).iterdir()}
            found += [f"{kind}/{n}" for n in names
                      if (not n.endswith(".json") and f"{n}.json" not in names)
                      or ".tmp-" in n]
        return found


NFS_HARNESSES = {
    "nfs-local": lambda w: NfsHarness(w, local=True),
    "nfs": lambda w: NfsHarness(w, local=False),
}


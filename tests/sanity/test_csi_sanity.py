"""The official csi-sanity (kubernetes-csi/csi-test) against ``flotilla --mode all``.

One run per access type (mount, block) for every pool this host can serve. Pool
configurations come from ``sanity_pools()``; the VM tier runs this same file inside a
guest with ``FLOTILLA_SANITY_POOLS`` naming pools that need its kernel.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.helpers import DriverProcess, GiB, loop_filesystem
from tests.integration.pool_harness import device_mapper_available, lvm_thin_pool

pytestmark = [pytest.mark.root, pytest.mark.sanity]

SUMMARY = re.compile(r"Ran (\d+) of (\d+) Specs.*?(\d+) Passed \| (\d+) Failed \| "
                     r"(\d+) Pending \| (\d+) Skipped", re.S)


def csi_sanity_binary() -> str:
    gobin = subprocess.run(["go", "env", "GOPATH"], capture_output=True, text=True,
                           check=False).stdout.strip()
    for candidate in (os.environ.get("CSI_SANITY"), shutil.which("csi-sanity"),
                      os.path.join(gobin, "bin", "csi-sanity") if gobin else None):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError("csi-sanity is not installed: run `scripts/setup.sh --test` "
                         "(it builds csi-sanity v5.4.0 with go install)")


@contextlib.contextmanager
def filepool_on(fstype: str, workdir: Path) -> Iterator[list[dict[str, object]]]:
    with loop_filesystem(workdir, fstype, size=64 << 30, name=f"host-{fstype}") as mnt:
        yield [{"name": "sanity", "type": "filepool", "path": str(mnt / "pool"),
                "overprovision_ratio": 100.0}]


@contextlib.contextmanager
def lvmthin_on(workdir: Path) -> Iterator[list[dict[str, object]]]:
    """A thin pool in a fresh VG (on FLOTILLA_LVM_DEVICE or a loop device)."""
    vg = f"flsanity{uuid.uuid4().hex[:8]}"
    with lvm_thin_pool(workdir, vg, "tp", 8 * GiB):
        yield [{"name": "sanity", "type": "lvmthin", "volume_group": vg, "thin_pool": "tp",
                "overprovision_ratio": 100.0}]


@contextlib.contextmanager
def nfs_on(workdir: Path) -> Iterator[list[dict[str, object]]]:
    """A fresh directory of the NFS export named by FLOTILLA_NFS_SERVER / _SHARE /
    _EXPORT_DIR (the VM tier runs kernel nfsd)."""
    sub = f"sanity-{uuid.uuid4().hex[:8]}"
    export_dir = Path(os.environ["FLOTILLA_NFS_EXPORT_DIR"]) / sub
    export_dir.mkdir()
    try:
        yield [{"name": "sanity", "type": "nfs", "server": os.environ["FLOTILLA_NFS_SERVER"],
                "share": posixpath.join(os.environ["FLOTILLA_NFS_SHARE"], sub),
                "mount_dir": str(workdir / "nfs-export"), "mount_timeout": 30}]
    finally:
        shutil.rmtree(export_dir, ignore_errors=True)


PoolSetup = Callable[[Path], contextlib.AbstractContextManager[list[dict[str, object]]]]
SANITY_POOLS: dict[str, PoolSetup] = {
    "filepool-xfs": lambda w: filepool_on("xfs", w),
    "filepool-btrfs": lambda w: filepool_on("btrfs", w),
    "lvmthin": lvmthin_on,
    "nfs": nfs_on,
}
#: access types each pool serves (nfs is filesystem-only by design)
ACCESS_TYPES = {"nfs": ("mount",)}


def sanity_pools() -> list[str]:
    wanted = os.environ.get("FLOTILLA_SANITY_POOLS")
    if wanted:
        return [w.strip() for w in wanted.split(",") if w.strip()]
    # lvmthin where the kernel has device-mapper; elsewhere the VM tier runs it
    return ["filepool-xfs", *(["lvmthin"] if device_mapper_available() else [])]


def run_csi_sanity(endpoint: str, workdir: Path, access_type: str,
                   extra: tuple[str, ...] = ()) -> tuple[str, dict[str, int]]:
    """Run csi-sanity; return its output and the counts of its summary line."""
    mountdir = workdir / "sanity-target"
    stagedir = workdir / "sanity-staging"
    argv = [csi_sanity_binary(), "-csi.endpoint", endpoint,
            "-csi.mountdir", str(mountdir), "-csi.stagingdir", str(stagedir),
            "-csi.testvolumeaccesstype", access_type,
            "-csi.testvolumesize", str(1 << 30),
            "-ginkgo.no-color", "-ginkgo.timeout", "30m", *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=2400, check=False,
                          cwd=workdir)
    out = proc.stdout + proc.stderr
    (workdir / f"csi-sanity-{access_type}.log").write_text(out)
    m = SUMMARY.search(out)
    assert m, f"csi-sanity printed no summary (exit {proc.returncode}):\n{out[-4000:]}"
    counts = dict(zip(("ran", "total", "passed", "failed", "pending", "skipped"),
                      map(int, m.groups()), strict=True))
    return out, counts


@pytest.mark.parametrize(("pool_kind", "access_type"), [
    (pool, access) for pool in sanity_pools()
    for access in ACCESS_TYPES.get(pool, ("mount", "block"))])
def test_csi_sanity(pool_kind: str, access_type: str, workdir: Path,
                    driver_factory: Callable[..., DriverProcess]) -> None:
    require_root()
    with SANITY_POOLS[pool_kind](workdir) as pools:
        driver = driver_factory(pools, node_id="sanity-node")
        driver.start()
        try:
            out, counts = run_csi_sanity(f"unix://{driver.socket}", workdir, access_type)
        finally:
            assert driver.stop() == 0, "flotilla did not exit 0 on SIGTERM"
    print(f"csi-sanity {pool_kind} {access_type}: {counts}")
    failures = re.findall(r"\[FAIL\] (.*)", out)
    assert counts["failed"] == 0, f"csi-sanity failures: {failures}\n{out[-6000:]}"
    assert counts["passed"] >= 60, f"csi-sanity ran too few specs: {counts}"

"""nfs pool specifics on the host (the pool logic through the injected bind-mount System):
quotas, on_delete, clone versus copy, and what it refuses. The network itself (kernel nfsd,
CLONE over NFSv4.2, stale mounts) is tested in the VM tier."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.errors import InvalidArgument
from csi.pools import build_pool
from csi.pools.base import Source, VolumeRequest
from tests.conftest import require_root
from tests.helpers import MiB, loop_filesystem
from tests.integration.nfs_harness import NfsHarness

pytestmark = pytest.mark.root


def xfs_quota_supported(workdir: Path) -> bool:
    """Was this kernel built with XFS quota support (CONFIG_XFS_QUOTA)? Try a mount."""
    try:
        with loop_filesystem(workdir, "xfs", size=320 * MiB, name="quota-probe",
                             options="prjquota"):
            return True
    except subprocess.CalledProcessError:
        return False


@pytest.fixture
def harness(workdir: Path) -> Iterator[NfsHarness]:
    require_root()
    h = NfsHarness(workdir, local=True)
    with h.setup():
        yield h


@pytest.fixture
def quota_harness(workdir: Path) -> Iterator[NfsHarness]:
    require_root()
    if not xfs_quota_supported(workdir):
        pytest.skip("this kernel has no XFS quota support (CONFIG_XFS_QUOTA); the VM "
                    "tier's Debian kernel runs this test")
    h = NfsHarness(workdir, local=True, mount_options="prjquota")
    with h.setup():
        yield h


def req(name: str, size: int, source: Source | None = None, block: bool = False) -> VolumeRequest:
    return VolumeRequest(name=name, size=size, required=size, limit=0, fs_type="",
                         block=block, source=source)


def fill(path: str, mib: int) -> OSError | None:
    try:
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return err
    return None


def test_xfs_project_quota_enforces_the_size(quota_harness: NfsHarness) -> None:
    harness = quota_harness
    assert harness.export_dir is not None
    pool = harness.make(quota_path=str(harness.export_dir))
    vol = pool.create_volume(req("quota", 64 * MiB))
    vdir = pool.volume_dir(vol.id)  # type: ignore[attr-defined]
    err = fill(os.path.join(vdir, "big"), 100)
    assert err is not None and err.errno in (errno.EDQUOT, errno.ENOSPC), err
    os.unlink(os.path.join(vdir, "big"))
    pool.expand_volume(vol.id, 256 * MiB)
    assert fill(os.path.join(vdir, "big"), 100) is None
    # a restore carries its own quota
    snap = pool.create_snapshot("s", vol.id, {})
    restored = pool.create_volume(req("restored", 256 * MiB, Source("snapshot", snap.id)))
    rdir = pool.volume_dir(restored.id)  # type: ignore[attr-defined]
    err = fill(os.path.join(rdir, "more"), 200)
    assert err is not None and err.errno in (errno.EDQUOT, errno.ENOSPC), err


def test_quota_path_must_be_the_share_on_prjquota_xfs(harness: NfsHarness,
                                                      workdir: Path) -> None:
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(Exception, match="is not the directory exported"):
        harness.make(quota_path=str(elsewhere))


@pytest.mark.parametrize("mode", ["retain", "archive"])
def test_on_delete_keeps_the_data(harness: NfsHarness, mode: str) -> None:
    assert harness.export_dir is not None
    pool = harness.make(on_delete=mode)
    vol = pool.create_volume(req("kept", 64 * MiB))
    harness.write(pool, vol.id, 0, b"precious")
    pool.delete_volume(vol.id)
    assert pool.get_volume(vol.id) is None
    kept = list((harness.export_dir / ("retained" if mode == "retain" else "archived"))
                .glob("*/data"))
    assert [p.read_bytes() for p in kept] == [b"precious"]
    assert harness.leftovers() == []


def test_clone_and_copy_are_counted(harness: NfsHarness) -> None:
    pool = harness.make()
    vol = pool.create_volume(req("src", 64 * MiB))
    for i in range(3):
        harness.write(pool, vol.id, 0, b"x" * MiB)
        os.symlink("data", os.path.join(pool.volume_dir(vol.id), f"link{i}"))  # type: ignore[attr-defined]
    os.makedirs(os.path.join(pool.volume_dir(vol.id), "sub", "deeper"))  # type: ignore[attr-defined]
    pool.create_snapshot("snap", vol.id, {})
    extra = pool.capacity().extra
    assert extra["flotilla_nfs_cloned_files"] == 1  # the local XFS can reflink
    copier = harness.restart(pool, clone="copy")
    copier.create_snapshot("snap2", vol.id, {})
    extra = copier.capacity().extra
    assert extra["flotilla_nfs_copied_files"] == 1 and extra["flotilla_nfs_cloned_files"] == 0
    snap_dir = Path(copier.store.path("snapshots", copier.find_snapshot("snap2").id))  # type: ignore[attr-defined,union-attr]
    assert (snap_dir / "link2").readlink() == Path("data")
    assert (snap_dir / "sub" / "deeper").is_dir()


def test_block_volumes_are_refused(harness: NfsHarness) -> None:
    pool = harness.make()
    with pytest.raises(InvalidArgument, match="filesystem volumes only"):
        pool.create_volume(req("blk", 64 * MiB, block=True))
    assert pool.list_volumes() == []


def test_a_second_pool_on_the_export_sees_new_objects(harness: NfsHarness,
                                                      workdir: Path) -> None:
    """Distributed mode: the controller's pool creates, a node's pool (started earlier,
    own mount of the same export) must find the volume to publish it."""
    controller = harness.make()
    node = harness.make(mount_dir=str(workdir / "node-mount"))
    vol = controller.create_volume(req("late", 64 * MiB))
    snap = controller.create_snapshot("late-snap", vol.id, {})
    assert node.get_volume(vol.id) == vol
    assert node.get_snapshot(snap.id) == snap
    assert node.get_volume(f"contract:vol-{'0' * 32}") is None


def test_each_process_has_its_own_scratch_space(harness: NfsHarness, workdir: Path) -> None:
    """A second pool instance starting on the export (another node plugin, a second
    controller replica, a restart of either) does not delete a tree the first one is
    building: each removes only its own .tmp/<owner>/ at start."""
    assert harness.export_dir is not None
    tmp = harness.export_dir / ".tmp"
    controller = build_pool(harness.spec(), harness.system, "node-1-controller")
    controller.start()
    harness.pools.append(controller)
    src = controller.create_volume(req("src", 64 * MiB))
    with open(os.path.join(controller.volume_dir(src.id), "data"), "w") as f:  # type: ignore[attr-defined]
        f.write("payload")
    started: list[str] = []
    real_copy = controller.copy_tree  # type: ignore[attr-defined]

    def copy_then_start_others(s: str, d: str) -> dict[str, int]:
        counts: dict[str, int] = real_copy(s, d)
        assert os.path.exists(os.path.join(d, "data"))  # the clone being built
        # meanwhile: a node plugin, and a second process with the same instance
        for n, instance in enumerate(("node-2-node", "node-1-controller")):
            other = build_pool(harness.spec(mount_dir=str(workdir / f"other-{n}")),
                               harness.system, instance)
            other.start()
            harness.pools.append(other)
            started.append(other.store.dirs["tmp"])  # type: ignore[attr-defined]
        assert os.path.exists(os.path.join(d, "data")), "another start removed the tree"
        return counts

    controller.copy_tree = copy_then_start_others  # type: ignore[attr-defined]
    clone = controller.create_volume(req("clone", 64 * MiB, Source("volume", src.id)))
    with open(os.path.join(controller.volume_dir(clone.id), "data")) as f:  # type: ignore[attr-defined]
        assert f.read() == "payload"
    assert [os.path.basename(p) for p in started] == ["node-2-node", "node-1-controller.2"]
    owners = sorted(p.name for p in tmp.iterdir())
    assert owners == ["node-1-controller", "node-1-controller.2", "node-1-controller.2.lock",
                      "node-1-controller.lock", "node-2-node", "node-2-node.lock"]


def test_a_restart_removes_only_its_own_leftovers(harness: NfsHarness) -> None:
    assert harness.export_dir is not None
    tmp = harness.export_dir / ".tmp"
    pool = build_pool(harness.spec(), harness.system, "node-1-controller")
    pool.start()
    harness.pools.append(pool)
    mine = tmp / "node-1-controller" / f"vol-{'a' * 32}"
    mine.mkdir()
    theirs = tmp / "node-2-controller" / f"vol-{'b' * 32}"
    theirs.mkdir(parents=True)
    legacy = tmp / f"vol-{'c' * 32}"  # built by a version before per-owner scratch
    legacy.mkdir()
    pool.stop()
    pool.start()  # as after a crash: its own half-built tree goes, nobody else's
    assert not mine.exists()
    assert theirs.exists() and legacy.exists()

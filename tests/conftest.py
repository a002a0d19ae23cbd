from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import DriverProcess, loop_filesystem, loops_backed_by, mounts_under

NEEDS_ROOT = "needs root for loop devices and mounts (run the tests as root, as CI does)"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory under /var/tmp (a tmpfs /tmp may not hold sparse images),
    checked for leaked mounts and loop devices afterwards."""
    base = Path("/var/tmp/flotilla-tests")
    base.mkdir(parents=True, exist_ok=True)
    real = Path(tempfile.mkdtemp(dir=base))
    yield real
    leaked_mounts = mounts_under(str(real))
    leaked_loops = loops_backed_by(str(real))
    force_clean(real)
    shutil.rmtree(real, ignore_errors=True)
    assert not leaked_mounts, f"test leaked mounts: {leaked_mounts}"
    assert not leaked_loops, f"test leaked loop devices: {leaked_loops}"


def force_clean(path: Path) -> None:
    """Unmount (deepest first) and detach whatever a failed test left under ``path``."""
    # collect the loop devices first: once their filesystem is lazily unmounted, their
    # backing paths no longer name ``path`` and they could not be found any more
    loops = loops_backed_by(str(path))
    for mnt in sorted(mounts_under(str(path)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    for loop in loops:
        subprocess.run(["losetup", "-d", f"/dev/{loop}"], check=False, capture_output=True)


@pytest.fixture(params=["xfs", "btrfs"])
def reflink_fs(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Path]:
    """A loop-mounted reflink-capable filesystem (XFS reflink=1 or btrfs)."""
    require_root()
    with loop_filesystem(workdir, request.param, name=f"host-{request.param}") as mnt:
        yield mnt


@pytest.fixture
def driver_factory(workdir: Path) -> Iterator[Callable[..., DriverProcess]]:
    started: list[DriverProcess] = []

    def make(pools: list[dict[str, object]], **kwargs: object) -> DriverProcess:
        d = DriverProcess(workdir, pools, **kwargs)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()
